"""Exact resume after SIGKILL, and SIGTERM preemption (subprocesses, 1 CPU device)."""

from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest

import _train_util as tu

STEPS = ["--config.train.steps=12", "--config.train.checkpoint_every=4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  dump = os.path.join(workdir, "params.npz")
  rc, out = tu.run(tu.runner_cmd(workdir, *STEPS, dump=dump))
  assert rc == 0, out[-4000:]
  return workdir, tu.load_npz(dump)


def _assert_same_run(workdir, ref_workdir, params, ref_params):
  assert params.keys() == ref_params.keys()
  for k in ref_params:
    assert np.array_equal(params[k], ref_params[k]), f"param {k} differs after resume"
  got, want = tu.train_records(workdir), tu.train_records(ref_workdir)
  assert sorted(got) == sorted(want) == list(range(1, 13))
  for step in want:
    # index_sum: the same examples in the same order; loss: bitwise the same step.
    assert got[step]["train/index_sum"] == want[step]["train/index_sum"], step
    assert got[step]["train/loss"] == want[step]["train/loss"], step


def test_sigkill_then_rerun_resumes_bitwise(uninterrupted, tmp_path):
  ref_workdir, ref_params = uninterrupted
  workdir = str(tmp_path / "killed")
  rc, out = tu.start_and_signal(tu.runner_cmd(workdir, *STEPS, delay=0.25), workdir, tu.SIGKILL, after_step=4)
  assert rc == -9, out[-4000:]
  done = tu.finished_steps(workdir)
  assert done and max(done) < 12, done
  dump = os.path.join(workdir, "params.npz")
  rc, out = tu.run(tu.runner_cmd(workdir, *STEPS, dump=dump))
  assert rc == 0, out[-4000:]
  res = tu.result(out)
  assert res["resumed_from"] == max(done) and res["step"] == 12
  _assert_same_run(workdir, ref_workdir, tu.load_npz(dump), ref_params)


def test_sigterm_saves_and_exits_zero(uninterrupted, tmp_path):
  ref_workdir, ref_params = uninterrupted
  workdir = str(tmp_path / "preempted")
  rc, out = tu.start_and_signal(tu.runner_cmd(workdir, *STEPS, delay=0.25), workdir, tu.SIGTERM, after_step=4)
  assert rc == 0, out[-4000:]
  res = tu.result(out)
  assert res["preempted"] is True and 4 <= res["step"] < 12, res
  assert max(tu.finished_steps(workdir)) == res["step"]
  # The preemption checkpoint restores, and the continued run matches the uninterrupted one.
  dump = os.path.join(workdir, "params.npz")
  rc, out = tu.run(tu.runner_cmd(workdir, *STEPS, dump=dump))
  assert rc == 0, out[-4000:]
  assert tu.result(out)["resumed_from"] == res["step"]
  _assert_same_run(workdir, ref_workdir, tu.load_npz(dump), ref_params)


def test_unreadable_latest_checkpoint_falls_back_to_the_one_before(uninterrupted, tmp_path):
  ref_workdir, ref_params = uninterrupted
  workdir = str(tmp_path / "bitrot")
  shutil.copytree(ref_workdir, workdir)
  assert tu.finished_steps(workdir) == [4, 8, 12]
  # A changed model no older step fits either: that error, and nothing moved.
  rc, out = tu.run(tu.runner_cmd(workdir, *STEPS, "--config.model.embed_dim=32",
                                 "--config.train.allow_config_change=True"))
  assert rc != 0 and not os.path.exists(os.path.join(workdir, "unreadable_checkpoints")), out[-4000:]
  # Step 12's array files truncated (a disk error, a cut-off copy): resume from step 8, keep 12 aside.
  arrays = glob.glob(os.path.join(workdir, "checkpoints", "12", "params", "**", "d", "*"), recursive=True)
  assert arrays
  for path in arrays:
    os.truncate(path, 10)
  dump = os.path.join(workdir, "params.npz")
  rc, out = tu.run(tu.runner_cmd(workdir, *STEPS, dump=dump))
  assert rc == 0, out[-4000:]
  assert tu.result(out)["resumed_from"] == 8 and "checkpoint step 12" in out
  assert os.path.isdir(os.path.join(workdir, "unreadable_checkpoints", "12", "params"))
  assert tu.finished_steps(workdir) == [4, 8, 12]  # saved again
  _assert_same_run(workdir, ref_workdir, tu.load_npz(dump), ref_params)
