"""Non-finite guard and config-change refusal (in-process, 1 CPU device)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import nnx

import toy
from radjax.train import checkpoint, loop


def _train(workdir, **overrides):
  config = toy.toy_config(**overrides)
  config.lock()
  return loop.train(config, str(workdir), method=toy.ToyMethod(), make_loader=toy.make_loader)


def test_absurd_lr_stops_naming_step_and_metric(tmp_path):
  with pytest.raises(loop.NonFiniteError) as info:
    _train(tmp_path, **{"optim.lr": 1e30, "optim.clip_norm": 0.0, "train.checkpoint_every": 1,
                        "train.log_every": 5})
  msg = str(info.value)
  bad_step = int(msg.split(" at step ")[1].split()[0])
  assert msg.startswith("non-finite ") and bad_step >= 2, msg
  metric = msg[len("non-finite "):].split(" at step")[0]
  assert metric in ("loss", "grad_norm", "param_norm"), msg
  steps = checkpoint.Checkpointer(str(tmp_path)).all_steps()
  assert steps and max(steps) < bad_step, (steps, msg)
  assert f"last good checkpoint is step {max(steps)}" in msg
  # The last good checkpoint restores and holds finite params.
  model, config = checkpoint.load_pretrained(str(tmp_path), method=toy.ToyMethod())
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)
  assert config.optim.lr == 1e30


def test_changed_config_refuses_to_resume(tmp_path):
  _train(tmp_path, **{"train.steps": 4})
  with pytest.raises(loop.ConfigMismatchError) as info:
    _train(tmp_path, **{"train.steps": 4, "optim.lr": 0.5, "model.embed_dim": 64, "mesh.data": 1})
  msg = str(info.value)
  # Only the key that changed is listed (embed_dim is set to its value; mesh is operational).
  assert msg.split("differing keys: ")[1].split(" (")[0] == "optim.lr", msg
  assert "saved=0.003 now=0.5" in msg
  # Operational keys (logging, mesh, checkpoint cadence) may change freely.
  res = _train(tmp_path, **{"train.steps": 4, "train.log_every": 2, "train.progress": True})
  assert res["resumed_from"] == 4 and res["step"] == 4
  # allow_config_change lets the run go on with the new config (here: 2 more steps).
  res = _train(tmp_path, **{"train.steps": 6, "train.allow_config_change": True})
  assert res["resumed_from"] == 4 and res["step"] == 6
  assert math.isfinite(res["train/loss"])
