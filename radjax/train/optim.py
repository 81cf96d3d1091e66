"""Optimiser: AdamW with linear warm-up + cosine decay, global-norm clipping, EMA.

Gradient accumulation is not an optax wrapper here: the train step scans over
microbatches and applies one update per step (radjax/train/loop.py), so
``step`` always counts optimizer updates and the schedule needs no rescaling.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Path components (lower-cased) that mark normalisation layers or their parameters.
_NO_DECAY_NAMES = {"bias", "scale", "temperature", "logit_scale", "logit_bias", "gamma", "beta"}
_NORM_RE = re.compile(r"(norm|^ln(_?\d+)?$|^bn(_?\d+)?$|^ln_|_ln$)")


def _component(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def decays(path: tuple, leaf: Any) -> bool:
  """True if weight decay applies to this parameter.

  Skipped: biases, norm layers (LayerNorm/BatchNorm/RMSNorm scales and biases),
  scalars/temperatures and any parameter with fewer than two dims.
  """
  if getattr(leaf, "ndim", 0) < 2 or not jnp.issubdtype(leaf.dtype, jnp.floating):
    return False
  names = [_component(k).lower() for k in path]
  if names and names[-1] == "value":  # nnx.Variable leaves end in `.value`
    names = names[:-1]
  if any(n in _NO_DECAY_NAMES for n in names[-1:]):
    return False
  return not any(_NORM_RE.search(n) for n in names)


def decay_mask(params: Any) -> Any:
  """Pytree of bools (same structure as ``params``): which leaves get weight decay."""
  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(optim_cfg: Any, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to ``optim.lr`` over ``optim.warmup_steps``, then cosine to 0 at ``total_steps``."""
  lr = float(optim_cfg.lr)
  warmup = max(int(optim_cfg.warmup_steps), 0)
  total = max(int(total_steps), 1)
  if warmup >= total:
    return optax.linear_schedule(0.0, lr, transition_steps=max(warmup, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total, end_value=0.0)


def make_optimizer(optim_cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (decoupled weight decay on the :func:`decay_mask` subset) after global-norm clipping.

  Returns (transformation, learning-rate schedule). ``optim.clip_norm <= 0`` disables clipping.
  """
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  parts = []
  if float(optim_cfg.clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
  parts.append(optax.adamw(
      learning_rate=schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2),
      eps=float(optim_cfg.get("eps", 1e-8)),  # .get: configs predating the field
      weight_decay=float(optim_cfg.weight_decay), mask=decay_mask))
  return optax.chain(*parts), schedule


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
  """ema <- decay * ema + (1 - decay) * params, leaf-wise (float32)."""
  return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)
