"""Generalized distillation (Lopez-Paz et al., 2016): learning using privileged information.

A teacher g(V(X), T(Z)) that saw the report produces soft labels; the image-only
student f(V(X)) is trained with

    (1 - lam) * L(f, Y) + lam * L(f, g^tau),

where g^tau = softmax(g / tau) (multi-class) or sigmoid(g / tau) (multi-label).
The student's logits are *not* tempered, and there is no tau^2 rescaling
(that is Hinton-style distillation, not generalized distillation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from radjax.losses import _common as C
from radjax.losses.classification import bce_with_logits, cross_entropy, multilabel_bce


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      labels: jax.Array, lam: float | jax.Array,
                      temperature: float | jax.Array, multilabel: bool = False,
                      label_mask: jax.Array | None = None) -> jax.Array:
  """Generalized distillation loss; the teacher receives no gradient.

  Args:
    student_logits: [B, C] (multi-class) or [B, K] (multi-label).
    teacher_logits: same shape; wrapped in stop_gradient.
    labels: int [B] class ids (multi-class) or {0, 1} float [B, K] (multi-label).
    lam: scalar in [0, 1], weight of the teacher (soft) term.
    temperature: scalar tau > 0 applied to the teacher logits only.
    multilabel: choose sigmoid/BCE (True) or softmax/CE (False).
    label_mask: optional, 1 = label observed: [B] (multi-class), [B] or [B, K]
      (multi-label). Unobserved labels leave the hard term (mean over observed
      entries). The soft term always averages over every example and label: the
      teacher's prediction exists whether or not the label does.

  Returns:
    float32 scalar.
  """
  fn = "distillation_loss"
  layout = "[B, K]" if multilabel else "[B, C]"
  C.check_rank(fn, "student_logits", student_logits, 2, layout)
  C.check_same_shape(fn, ("student_logits", "teacher_logits"),
                     (student_logits, teacher_logits))
  batch = C.shape_of(student_logits)[:1]
  if multilabel:
    C.check_same_shape(fn, ("student_logits", "labels"), (student_logits, labels))
    C.label_mask_like(fn, label_mask, student_logits, "student_logits", allow_rows=True)
  else:
    C.check_leading(fn, "labels", labels, batch, "student_logits")
    C.check_integer(fn, "labels", labels)
    if label_mask is not None:
      C.check_leading(fn, "label_mask", label_mask, batch, "student_logits")
  dtype = C.compute_dtype(student_logits, teacher_logits)
  lam = C.scalar(fn, "lam", lam, dtype)
  tau = C.scalar(fn, "temperature", temperature, dtype)
  student = jnp.asarray(student_logits, dtype)
  teacher = jax.lax.stop_gradient(jnp.asarray(teacher_logits, dtype)) / tau

  if multilabel:
    hard = multilabel_bce(student, labels, label_mask)
    soft = jnp.mean(bce_with_logits(student, jax.nn.sigmoid(teacher)))
  else:
    hard = cross_entropy(student, labels, label_mask)
    log_p = jax.nn.log_softmax(student, axis=-1)
    soft = jnp.mean(-jnp.sum(jax.nn.softmax(teacher, axis=-1) * log_p, axis=-1))
  return (1 - lam) * hard + lam * soft
