"""Masked-modelling losses: MAE/MRM patch reconstruction and masked-token (MLM) prediction.

Both average over the *masked* positions only (what the model could not see);
an all-zero mask gives 0, not NaN, so a batch that happens to mask nothing is safe.
The token loss also serves captioning (next-token CE with the text mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from radjax.losses import _common as C

# MAE's per-patch target normalisation epsilon (He et al., 2022).
TARGET_NORM_EPS = 1e-6


def normalize_patches(target: jax.Array, eps: float = TARGET_NORM_EPS) -> jax.Array:
  """Standardise each patch by its own statistics: (t - mean) / sqrt(var + eps) over the last axis.

  var is the population variance (ddof=0), as jnp.var; MAE's PyTorch code uses
  torch.var's unbiased default, which differs by a factor D/(D-1).
  """
  mean = jnp.mean(target, axis=-1, keepdims=True)
  var = jnp.var(target, axis=-1, keepdims=True)
  return (target - mean) * jax.lax.rsqrt(var + eps)


def masked_reconstruction_loss(pred: jax.Array, target: jax.Array, mask: jax.Array,
                               normalize_target: bool = False) -> jax.Array:
  """MAE-style reconstruction loss.

  Args:
    pred: [B, N, D] predicted patch values (N patches of D = p*p*C pixels).
    target: [B, N, D] true patch values.
    mask: [B, N], 1 where the patch was masked (hidden from the encoder).
    normalize_target: standardise each target patch first (`normalize_patches`).

  Returns:
    Scalar: per-patch MSE (mean over D), averaged over masked patches; 0 if none.
  """
  fn = "masked_reconstruction_loss"
  C.check_rank(fn, "pred", pred, 3, "[B, N, D]")
  C.check_same_shape(fn, ("pred", "target"), (pred, target))
  C.check_leading(fn, "mask", mask, C.shape_of(pred)[:2], "pred")
  dtype = C.compute_dtype(pred, target)
  p = jnp.asarray(pred, dtype)
  t = jnp.asarray(target, dtype)
  if normalize_target:
    t = normalize_patches(t)
  per_patch = jnp.mean(jnp.square(p - t), axis=-1)
  return C.masked_mean(per_patch, mask)


def masked_token_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Cross-entropy over masked token positions (MLM / MRM text branch / captioning).

  Args:
    logits: [B, L, V] vocabulary logits.
    targets: int [B, L] token ids; values at unmasked positions are ignored (may be
      any integer, e.g. -100).
    mask: [B, L], 1 at positions that count.

  Returns:
    Scalar: mean CE over positions with mask 1; 0 if none.
  """
  fn = "masked_token_loss"
  C.check_rank(fn, "logits", logits, 3, "[B, L, V]")
  C.check_leading(fn, "targets", targets, C.shape_of(logits)[:2], "logits")
  C.check_integer(fn, "targets", targets)
  C.check_leading(fn, "mask", mask, C.shape_of(logits)[:2], "logits")
  x = jnp.asarray(logits, C.compute_dtype(logits))
  return C.masked_mean(C.token_cross_entropy(x, targets), mask)
