"""Two processes x 4 CPU devices (launch/local.py, jax.distributed + gloo) vs one process x 8
devices; and restoring an 8-device checkpoint on 1 device."""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import pytest

import _train_util as tu
import toy
from radjax.parallel import mesh as mesh_lib
from radjax.train import checkpoint, state as state_lib, optim

MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
ARGS = ["--config.train.steps=12", "--config.train.checkpoint_every=4"] + MESH


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("single8"))
  dump = os.path.join(workdir, "params.npz")
  rc, out = tu.run(tu.runner_cmd(workdir, *ARGS, devices=8, dump=dump))
  assert rc == 0, out[-4000:]
  res = tu.result(out)
  # The annotated kernel really is sharded over fsdp x tensor.
  assert res["param_specs"]["image_encoder/proj/kernel"] == "P('fsdp', 'tensor')", res
  return workdir, tu.load_npz(dump)


def _launch(workdir, *extra, dump="", delay=0.0):
  return [sys.executable, tu.LAUNCHER, "--num_processes", "2", "--devices_per_process", "4", "--",
          *tu.runner_cmd(workdir, *ARGS, *extra, dump=dump, delay=delay)]


def test_two_processes_match_single_process(eight_devices, tmp_path):
  ref_workdir, ref_params = eight_devices
  workdir = str(tmp_path / "two")
  # Preempt both processes (SIGTERM to the launcher is forwarded): they agree on a step,
  # checkpoint it and exit 0 ...
  rc, out = tu.start_and_signal(_launch(workdir, delay=0.25), workdir, tu.SIGTERM, after_step=4)
  assert rc == 0, out[-4000:]
  res = tu.result(out)
  assert res["preempted"] and 4 <= res["step"] < 12, res
  assert "[p1]" in out and "RESULT" in out
  # ... and the relaunched pair restores it and finishes.
  dump = os.path.join(workdir, "params.npz")
  rc, out = tu.run(_launch(workdir, dump=dump))
  assert rc == 0, out[-4000:]
  res2 = tu.result(out)
  assert res2["resumed_from"] == res["step"] and res2["step"] == 12
  got, want = tu.train_records(workdir), tu.train_records(ref_workdir)
  assert sorted(got) == sorted(want) == list(range(1, 13))
  for step in want:
    assert got[step]["train/index_sum"] == want[step]["train/index_sum"]
    np.testing.assert_allclose(got[step]["train/loss"], want[step]["train/loss"], rtol=1e-5, atol=1e-5)
  params = tu.load_npz(dump)
  for k in ref_params:
    np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_eight_device_checkpoint_restores_on_one_device(eight_devices):
  workdir, ref_params = eight_devices
  assert jax.device_count() == 1
  # Weights only (what fine-tuning uses) ...
  model, config = checkpoint.load_pretrained(workdir, method=toy.ToyMethod())
  from flax import nnx  # pylint: disable=import-outside-toplevel
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  got = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in flat}
  assert got.keys() == ref_params.keys()
  for k in ref_params:
    assert np.array_equal(got[k], ref_params[k]), k
  assert config.mesh.tensor == 2
  # ... and the full train state (optimizer included) onto a 1-device mesh.
  config = toy.toy_config(**{"train.steps": 12})
  mesh = mesh_lib.make_mesh(config.mesh)
  tx, _ = optim.make_optimizer(config.optim, 12)
  _, abstract, _, _ = state_lib.setup(toy.ToyMethod(), config, mesh, tx, ema=False)
  ckpt = checkpoint.Checkpointer(workdir)
  state, meta = ckpt.restore(12, abstract, key_sharding=mesh_lib.replicated(mesh))
  ckpt.close()
  assert int(state["step"]) == 12 and meta["step"] == 12 and meta["data_states"] == [{"next_index": 12}]
  kernel = state["params"]["image_encoder"]["proj"]["kernel"]
  assert len(kernel.sharding.device_set) == 1
  np.testing.assert_array_equal(np.asarray(kernel), ref_params["image_encoder/proj/kernel"])
  mu = state["opt_state"][1][0].mu["image_encoder"]["proj"]["kernel"]
  assert mu.shape == kernel.shape and np.isfinite(np.asarray(mu)).all() and np.abs(np.asarray(mu)).sum() > 0
