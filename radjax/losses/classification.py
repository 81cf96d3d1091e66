"""Classification losses: multi-class cross-entropy, multi-label BCE with label masks,
and the CheXpert uncertain-label policy.

Label conventions (radjax batch contract): multi-label targets are float [B, K]
with 1 = positive, 0 = negative; `label_mask` [B, K] is 1 where the label is
observed. Raw CheXpert-style labels additionally use -1 = uncertain and NaN =
blank (not mentioned); `apply_uncertain_policy` turns those into 0/1 labels plus
a mask.

Uncertain-label policy (Irvin et al., CheXpert, 2019):
  - "ignore" (default, U-Ignore): uncertain labels are unobserved (mask 0), so they
    contribute no gradient. This is the safe default: it neither invents positives
    nor negatives, and the rest of the image's labels still train.
  - "ones" (U-Ones): uncertain -> positive (the report hedges about a finding that
    is usually present; better for e.g. atelectasis, oedema in CheXpert).
  - "zeros" (U-Zeros): uncertain -> negative.
Blank (NaN) labels are always unobserved, whatever the policy: "not mentioned" is
not evidence of absence for a prognostic or rare label.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from radjax.losses import _common as C

UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")


def apply_uncertain_policy(labels: Any, label_mask: Any = None,
                           policy: str = "ignore") -> tuple[Any, Any]:
  """Resolve uncertain (-1) and blank (NaN) labels; see the module docstring.

  Args:
    labels: float [..., K] with values in {1, 0, -1, NaN} (other finite values,
      e.g. soft labels, pass through unchanged).
    label_mask: same shape, 1 = observed, or None (all observed unless NaN).
    policy: "ignore" | "ones" | "zeros".

  Returns:
    (labels, label_mask), both float32 of the input shape; labels are finite
    (0 where unobserved). NumPy inputs give NumPy outputs (usable in the host
    input pipeline), anything else gives jax arrays (usable under jit).
  """
  fn = "apply_uncertain_policy"
  if policy not in UNCERTAIN_POLICIES:
    raise ValueError(f"{fn}: `policy` must be one of {UNCERTAIN_POLICIES}, got {policy!r}")
  host = isinstance(labels, np.ndarray) and (label_mask is None or
                                             isinstance(label_mask, np.ndarray))
  xp = np if host else jnp
  labels = xp.asarray(labels, xp.float32)
  if label_mask is None:
    mask = xp.ones(labels.shape, xp.float32)
  else:
    C.check_same_shape(fn, ("labels", "label_mask"), (labels, label_mask))
    mask = xp.asarray(label_mask, xp.float32)
  blank = xp.isnan(labels)
  uncertain = labels == -1
  mask = xp.where(blank, 0.0, mask)
  if policy == "ignore":
    mask = xp.where(uncertain, 0.0, mask)
    labels = xp.where(uncertain, 0.0, labels)
  else:
    labels = xp.where(uncertain, 1.0 if policy == "ones" else 0.0, labels)
  labels = xp.where(blank | (mask == 0), 0.0, labels)
  return labels.astype(xp.float32), mask.astype(xp.float32)


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise binary cross-entropy with logits; targets in [0, 1] (soft allowed).

  Stable for any logit: -(y log sig(x) + (1-y) log sig(-x)) via log_sigmoid.
  """
  return -(targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits))


def multilabel_bce(logits: jax.Array, labels: jax.Array,
                   label_mask: jax.Array | None = None) -> jax.Array:
  """Binary cross-entropy with logits, averaged over observed (example, label) entries.

  Args:
    logits: [B, K] (any float dtype).
    labels: [B, K] float in {0, 1} (soft values allowed). NaN labels are treated
      as unobserved (blank) even without a mask.
    label_mask: optional [B, K] (or [B]: whole example) with 1 = observed.

  Returns:
    float32 scalar; 0 if nothing is observed.
  """
  fn = "multilabel_bce"
  C.check_rank(fn, "logits", logits, 2, "[B, K]")
  C.check_same_shape(fn, ("logits", "labels"), (logits, labels))
  mask = C.label_mask_like(fn, label_mask, logits, "logits", allow_rows=True)
  dtype = C.compute_dtype(logits)
  x = jnp.asarray(logits, dtype)
  y = jnp.asarray(labels, dtype)
  observed = ~jnp.isnan(y)
  if mask is not None:
    observed &= mask != 0
  # Zero the unobserved targets before the loss so a NaN/-1 there cannot leak
  # into the gradient through the where below.
  y = jnp.where(observed, y, 0)
  return C.masked_mean(bce_with_logits(x, y), observed)


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_mask: jax.Array | None = None) -> jax.Array:
  """Multi-class cross-entropy with integer labels, mean over observed examples.

  Args:
    logits: [B, C]; labels: int [B] in [0, C); label_mask: optional [B], 1 = observed.

  Returns:
    float32 scalar; 0 if no example is observed.
  """
  fn = "cross_entropy"
  C.check_rank(fn, "logits", logits, 2, "[B, C]")
  C.check_leading(fn, "labels", labels, C.shape_of(logits)[:1], "logits")
  C.check_integer(fn, "labels", labels)
  if label_mask is not None:
    C.check_leading(fn, "label_mask", label_mask, C.shape_of(logits)[:1], "logits")
  x = jnp.asarray(logits, C.compute_dtype(logits))
  return C.masked_mean(C.token_cross_entropy(x, labels), label_mask)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Cross-entropy against a target distribution: mean_b -sum_c t_bc log softmax(x_b)_c.

  Args:
    logits: [B, C]; targets: [B, C] probabilities (rows sum to 1).
  """
  fn = "soft_cross_entropy"
  C.check_rank(fn, "logits", logits, 2, "[B, C]")
  C.check_same_shape(fn, ("logits", "targets"), (logits, targets))
  dtype = C.compute_dtype(logits, targets)
  log_p = jax.nn.log_softmax(jnp.asarray(logits, dtype), axis=-1)
  return jnp.mean(-jnp.sum(jnp.asarray(targets, dtype) * log_p, axis=-1))

