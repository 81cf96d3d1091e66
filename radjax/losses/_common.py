"""Shared checks and numerics for the loss functions (private to radjax.losses).

All checks run on static shapes, so they fire at trace time under jax.jit.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Squared-norm floor for L2 normalisation: an all-zero row maps to zeros (not NaN),
# and the gradient through jnp.maximum stays finite there.
NORM_EPS = 1e-12


def compute_dtype(*arrays: Any) -> jnp.dtype:
  """Float dtype a loss computes in: at least float32 (bf16/f16 are upcast)."""
  dt = jnp.result_type(*[jnp.asarray(a).dtype for a in arrays])
  if not jnp.issubdtype(dt, jnp.floating):
    return jnp.dtype(jnp.float32)
  return jnp.promote_types(dt, jnp.float32)


def shape_of(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(x))


def check_rank(fn: str, name: str, x: Any, rank: int, layout: str) -> None:
  if np.ndim(x) != rank:
    raise ValueError(
        f"{fn}: `{name}` must have rank {rank} {layout}, got shape {shape_of(x)}")


def check_same_shape(fn: str, names: Sequence[str], arrays: Sequence[Any]) -> None:
  shapes = [shape_of(a) for a in arrays]
  if any(s != shapes[0] for s in shapes[1:]):
    desc = ", ".join(f"`{n}` {s}" for n, s in zip(names, shapes))
    raise ValueError(f"{fn}: shapes must match, got {desc}")


def check_leading(fn: str, name: str, x: Any, expected: tuple[int, ...],
                  ref_name: str) -> None:
  """x's shape must equal `expected` (the leading dims of the `ref_name` argument)."""
  if shape_of(x) != tuple(expected):
    raise ValueError(
        f"{fn}: `{name}` must have shape {tuple(expected)} to match `{ref_name}`, "
        f"got shape {shape_of(x)}")


def check_integer(fn: str, name: str, x: Any) -> None:
  dt = jnp.asarray(x).dtype
  if not jnp.issubdtype(dt, jnp.integer):
    raise ValueError(f"{fn}: `{name}` must hold integer class ids, got dtype {dt}")


def scalar(fn: str, name: str, x: Any, dtype: jnp.dtype) -> jax.Array:
  """A hyper-parameter that may be a Python number or a traced 0-d array."""
  if np.ndim(x) != 0:
    raise ValueError(f"{fn}: `{name}` must be a scalar, got shape {shape_of(x)}")
  return jnp.asarray(x, dtype)


def label_mask_like(fn: str, label_mask: Any, ref: jax.Array, ref_name: str,
                    allow_rows: bool) -> jax.Array | None:
  """Validates a mask of ref's shape (or [B] when allow_rows) and broadcasts it to ref."""
  if label_mask is None:
    return None
  shape = shape_of(label_mask)
  if allow_rows and len(shape) == 1 and shape == shape_of(ref)[:1]:
    return jnp.broadcast_to(jnp.asarray(label_mask)[:, None], ref.shape)
  if shape != shape_of(ref):
    want = (f"{shape_of(ref)} or {shape_of(ref)[:1]}" if allow_rows
            else f"{shape_of(ref)}")
    raise ValueError(f"{fn}: `label_mask` must have shape {want} to match `{ref_name}`, "
                     f"got shape {shape}")
  return jnp.asarray(label_mask)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / ||x|| along `axis`; an all-zero vector stays zero (no NaN value or gradient)."""
  x = jnp.asarray(x)
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, NORM_EPS))


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, and 0 where den == 0 (an all-masked mean is 0, not NaN)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1), jnp.zeros_like(num))


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean of `values` over entries where `mask` is non-zero; 0 if none is.

  Args:
    values: float array of any shape.
    mask: same shape as `values` (bool/int/float weights), or None for a plain mean.

  Entries with mask 0 contribute nothing even if they are NaN/inf, because the
  selection is a `where`, not a multiplication.
  """
  values = jnp.asarray(values)
  if mask is None:
    return jnp.mean(values)
  check_same_shape("masked_mean", ("values", "mask"), (values, mask))
  m = jnp.asarray(mask).astype(values.dtype)
  num = jnp.sum(jnp.where(m != 0, values * m, 0))
  return safe_div(num, jnp.sum(m))


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-position CE: logits [..., V], int labels [...] -> [...]. Out-of-range ids
  (e.g. an ignore index of -100 at masked positions) are clamped so the gather is
  finite; callers mask those positions out."""
  v = logits.shape[-1]
  idx = jnp.clip(jnp.asarray(labels).astype(jnp.int32), 0, v - 1)
  picked = jnp.take_along_axis(logits, idx[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - picked
