"""Fast unit tests of the train/parallel building blocks (1 CPU device, in-process)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import toy
from radjax import defaults
from radjax.parallel import distributed, mesh as mesh_lib
from radjax.train import checkpoint, loop, metrics as metrics_lib, optim, state as state_lib


def test_mesh_shape_inference_and_errors():
  assert mesh_lib.mesh_shape(dict(data=-1, fsdp=2, tensor=1), 8) == (4, 2, 1)
  assert mesh_lib.mesh_shape(dict(data=2, fsdp=2, tensor=2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="does not divide the 8"):
    mesh_lib.mesh_shape(dict(data=-1, fsdp=3, tensor=1), 8)
  with pytest.raises(ValueError, match="only one axis may be -1"):
    mesh_lib.mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)
  with pytest.raises(ValueError, match="multiply to 4 but there are 8"):
    mesh_lib.mesh_shape(dict(data=2, fsdp=2, tensor=1), 8)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.size == jax.device_count()
  assert mesh_lib.batch_sharding(mesh).spec == jax.sharding.PartitionSpec(("data", "fsdp"))


def test_shard_batch_places_arrays_and_rejects_text():
  mesh = mesh_lib.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  out = mesh_lib.shard_batch({"image": np.ones((4, 2, 2, 1), np.float32), "index": np.arange(4)}, mesh)
  assert out["image"].shape == (4, 2, 2, 1) and isinstance(out["index"], jax.Array)
  secret = "no acute cardiopulmonary process"
  with pytest.raises(ValueError, match="report") as info:
    mesh_lib.shard_batch({"report": np.array([secret] * 4)}, mesh)
  assert secret not in str(info.value)


def test_weight_decay_mask_and_schedule():
  params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}, "ln_1": {"scale": jnp.ones(4)},
            "layer_norm": {"kernel": jnp.ones((2, 2))}, "bn": {"mean": jnp.ones((2, 2))},
            "logit_scale": jnp.ones(()), "pos_embedding": jnp.ones((1, 4, 2))}
  mask = optim.decay_mask(params)
  assert mask == {"dense": {"kernel": True, "bias": False}, "ln_1": {"scale": False},
                  "layer_norm": {"kernel": False}, "bn": {"mean": False}, "logit_scale": False,
                  "pos_embedding": True}
  cfg = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=10, weight_decay=0.1, b1=0.9, b2=0.999,
                                       clip_norm=1.0))
  sched = optim.learning_rate_schedule(cfg, 100)
  assert float(sched(0)) == 0.0 and np.isclose(float(sched(10)), 1e-3) and float(sched(100)) < 1e-9
  assert float(sched(5)) == pytest.approx(5e-4)
  # With zero grads only weight decay moves params: exactly the masked-in leaves move.
  cfg.warmup_steps = 0
  tx, _ = optim.make_optimizer(cfg, 100)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  assert jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates) == mask
  ema = optim.ema_update({"a": jnp.zeros(2)}, {"a": jnp.ones(2)}, 0.9)
  np.testing.assert_allclose(ema["a"], 0.1)


def test_distributed_is_noop_for_single_process(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
            "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  cfg = ml_collections.ConfigDict(dict(coordinator_address=None, num_processes=-1, process_id=-1, mode="auto"))
  assert distributed.initialize(cfg) is False
  assert distributed.initialize(None) is False
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  assert distributed.initialize(cfg) is False  # one process: nothing to coordinate
  with pytest.raises(ValueError, match="distributed.mode"):
    distributed.initialize(ml_collections.ConfigDict(dict(mode="sometimes")))


def test_config_diff_ignores_operational_keys():
  a = {"optim": {"lr": 1.0}, "train": {"log_every": 1, "steps": 3}, "mesh": {"data": -1}}
  b = {"optim": {"lr": 2.0}, "train": {"log_every": 5, "steps": 3}, "mesh": {"data": 8}, "new": 1}
  assert checkpoint.config_diff(a, b) == ["new", "optim.lr"]


def test_metric_writer_truncates_after_resume_step(tmp_path):
  w = metrics_lib.MetricWriter(str(tmp_path), tensorboard=False)
  for s in range(1, 6):
    w.write(s, {"train/loss": float(s)})
  w.write(6, {"train/loss": float("nan")})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "train/lo')  # cut short by a kill
  w.truncate_after(3)
  assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path))] == [1, 2, 3]


class _Regression:
  """MSE linear regression: a loss that decomposes over examples (unlike InfoNCE)."""
  name, uses_text = "reg", False

  def build(self, config, rngs):
    return nnx.Linear(4, 1, rngs=rngs)

  def loss(self, model, batch, key, train):
    err = model(batch["x"])[:, 0] - batch["y"]
    return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err))}


def test_gradient_accumulation_matches_full_batch():
  config = toy.toy_config()
  mesh = mesh_lib.make_mesh(config.mesh)
  tx, sched = optim.make_optimizer(config.optim, 10)
  method = _Regression()
  graphdef, _, shardings, init = state_lib.setup(method, config, mesh, tx, ema=False)
  rng = np.random.default_rng(0)
  batch = mesh_lib.shard_batch({"x": rng.normal(size=(16, 4)).astype(np.float32),
                                "y": rng.normal(size=(16,)).astype(np.float32)}, mesh)
  outs = []
  for accum in (1, 4):
    step = jax.jit(loop.make_train_step(method, graphdef, tx, sched, mesh, accum_steps=accum, ema_decay=0.0))
    state = init()
    for _ in range(3):
      state, m = step(state, batch)
    outs.append((state, m))
  (s1, m1), (s4, m4) = outs
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(s4["step"]) == 3


def test_gpu_threefry_lowering_is_set_for_the_init_only(monkeypatch):
  config = toy.toy_config()
  tx, _ = optim.make_optimizer(config.optim, 10)
  _, _, _, init = state_lib.setup(_Regression(), config, mesh_lib.make_mesh(config.mesh), tx, ema=False)
  seen = []
  original_update = jax.config.update

  def recording_update(name, value):
    if name == "jax_threefry_gpu_kernel_lowering":
      seen.append(value)
    original_update(name, value)

  monkeypatch.setattr(state_lib.jax, "default_backend", lambda: "gpu")  # the flag only changes GPU lowering
  monkeypatch.setattr(state_lib.jax.config, "update", recording_update)
  before = jax.config.jax_threefry_gpu_kernel_lowering
  state = init()
  assert seen == [True, before], "set for the init's compilation, then put back"
  assert jax.config.jax_threefry_gpu_kernel_lowering == before
  assert int(state["step"]) == 0


def test_ema_eval_and_load_pretrained(tmp_path):
  config = toy.toy_config(**{"train.steps": 4, "train.eval_every": 2, "train.eval_batches": 2,
                             "optim.ema_decay": 0.5, "train.best_metric": "eval/loss"})
  config.lock()
  res = loop.train(config, str(tmp_path), method=toy.ToyMethod(), make_loader=toy.make_loader)
  assert res["step"] == 4 and np.isfinite(res["eval/loss"]) and "eval/accuracy" in res
  records = metrics_lib.read_metrics(str(tmp_path))
  assert [r["step"] for r in records if "eval/loss" in r] == [2, 4]
  assert {"time/data_wait_s", "time/compute_s", "examples_per_s"} <= set(records[-2]) | set(records[-1])
  ema_model, _ = checkpoint.load_pretrained(str(tmp_path), method=toy.ToyMethod())
  raw_model, cfg = checkpoint.load_pretrained(str(tmp_path), method=toy.ToyMethod(), use_ema=False)
  best_model, _ = checkpoint.load_pretrained(str(tmp_path), method=toy.ToyMethod(), best=True)
  k_ema = np.asarray(ema_model.image_encoder.proj.kernel[...])
  k_raw = np.asarray(raw_model.image_encoder.proj.kernel[...])
  assert not np.array_equal(k_ema, k_raw)
  assert best_model.image_encoder.embed_dim == 64 and cfg.optim.ema_decay == 0.5
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["optim"]["ema_decay"] == 0.5


def test_config_diff_accepts_a_knob_added_later_at_its_default():
  # A run saved before radjax grew method.siglip_bias resumes while the knob is at its default
  # (-10); set to anything else, the knob is a change.
  saved = {"method": {"name": "clip"}}
  assert checkpoint.config_diff(saved, {"method": {"name": "clip", "siglip_bias": -10.0}}) == []
  assert checkpoint.config_diff(saved, {"method": {"name": "clip", "siglip_bias": -4.0}}) == ["method.siglip_bias"]


def test_with_schema_defaults_fills_knobs_and_sections_added_later():
  saved = {"method": {"name": "mrm", "text_mask_ratio": 0.5}, "extra": 1, "custom": {"a": 2}}
  filled = checkpoint.with_schema_defaults(saved)
  assert filled["method"]["text_mask_ratio"] == 0.5  # saved values win
  assert filled["method"]["text_mask_every_occurrence"] is False  # added later: its default
  assert filled["extra"] == 1 and filled["custom"] == {"a": 2}
  assert filled["optim"] == defaults.pretrain_config().optim.to_dict()  # a section it lacked


def test_config_diff_treats_a_missing_knob_or_section_as_its_default():
  current = defaults.pretrain_config().to_dict()
  assert checkpoint.config_diff({"method": {"name": current["method"]["name"]}}, current) == []
  assert checkpoint.config_diff({}, current) == []
  changed = {**current, "optim": {**current["optim"], "lr": current["optim"]["lr"] * 2}}
  assert checkpoint.config_diff({}, changed) == ["optim.lr"]
  # Absent on both sides is no difference; outside the schema, absent on one side is.
  assert checkpoint.config_diff({"study": {"a": 1}}, {"study": {"a": 1}}) == []
  assert checkpoint.config_diff({"study": {"a": 1}}, {"study": {}}) == ["study.a"]
