"""Fine-tuning heads on frozen features, with the report as privileged information.

``linear`` fine-tuning is a logistic head f on frozen image features V(X).
``distill`` first fits a teacher g on [V(X), T(Z)] (image features and report
features) for the same labelled examples, then fits the image-only student f with
:func:`radjax.losses.distillation_loss` against g's tempered outputs. With
``lam=0`` the student objective is exactly the linear head's, so the two
fine-tunings differ only in what the report contributes.

The teacher's soft targets for the training examples are cross-fitted: each
example's target comes from a teacher fitted on the other folds. A teacher scored
on its own training examples has simply memorised their labels (report features
are high-dimensional and n is small), and its "soft" targets would be the hard
labels again.

Heads are fitted by full-batch AdamW in one jitted ``lax.scan``: the feature
matrices of a study cell (tens to a few thousand rows) fit in memory, and one
compiled program per shape keeps the study grid fast on a CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from radjax.losses import distillation_loss


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  steps: int = 300
  lr: float = 0.05
  weight_decay: float = 1e-2
  seed: int = 0


@dataclasses.dataclass
class LinearHead:
  """A logistic head on standardised features: logits = ((x - mean) / std) @ w + b."""
  mean: np.ndarray  # [D]
  std: np.ndarray   # [D]
  w: np.ndarray     # [D, K]
  b: np.ndarray     # [K]

  def logits(self, feats: np.ndarray) -> np.ndarray:
    """feats [N, D] -> logits [N, K] (float32)."""
    x = (np.asarray(feats, np.float32) - self.mean) / self.std
    return x @ self.w + self.b


@functools.partial(jax.jit, static_argnames=("steps", "lr", "weight_decay"))
def _fit(x, labels, label_mask, teacher_logits, lam, temperature, key, *, steps, lr, weight_decay):
  d, k = x.shape[1], labels.shape[1]
  params = {"w": jax.random.normal(key, (d, k)) * 0.01, "b": jnp.zeros((k,))}
  # Decay the weights, not the bias.
  tx = optax.adamw(lr, weight_decay=weight_decay, mask={"w": True, "b": False})
  opt_state = tx.init(params)

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]
    return distillation_loss(logits, teacher_logits, labels, lam, temperature, multilabel=True,
                             label_mask=label_mask)

  def step(carry, _):
    p, s = carry
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), loss

  (params, _), losses = jax.lax.scan(step, (params, opt_state), None, length=steps)
  return params, losses


def fit_head(feats: np.ndarray, labels: np.ndarray, label_mask: np.ndarray | None = None, *,
             teacher_logits: np.ndarray | None = None, lam: float = 0.0, temperature: float = 1.0,
             standardize: np.ndarray | None = None, config: HeadConfig = HeadConfig()) -> LinearHead:
  """Fits a multi-label logistic head, optionally distilling from a teacher.

  Args:
    feats: float [N, D] frozen features.
    labels: {0, 1} float [N, K] (a binary task is K = 1).
    label_mask: [N, K], 1 = observed; None = all observed.
    teacher_logits: [N, K] logits of a report-seeing teacher on the same examples, or None.
    lam: weight of the teacher term in [0, 1]; must be 0 without a teacher.
    temperature: tau > 0 applied to the teacher logits.
    standardize: bool [D], the columns to standardise (default: all); the others are used as given.
  """
  feats = np.asarray(feats, np.float32)
  labels = np.asarray(labels, np.float32)
  if labels.ndim != 2 or feats.ndim != 2 or labels.shape[0] != feats.shape[0]:
    raise ValueError(f"fit_head: feats [N, D] and labels [N, K] expected, got {feats.shape} and {labels.shape}")
  if teacher_logits is None:
    if lam != 0.0:
      raise ValueError(f"fit_head: lam={lam} needs teacher_logits")
    teacher_logits = np.zeros_like(labels)
  if label_mask is None:
    label_mask = np.ones_like(labels)
  mean = feats.mean(0)
  # A feature constant on these examples keeps scale 1: dividing by its ~0 std would blow up every
  # later example that has it.
  std = feats.std(0)
  std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
  if standardize is not None:
    mean = np.where(standardize, mean, 0.0).astype(np.float32)
    std = np.where(standardize, std, 1.0).astype(np.float32)
  params, _ = _fit(jnp.asarray((feats - mean) / std), jnp.asarray(labels), jnp.asarray(label_mask, jnp.float32),
                   jnp.asarray(teacher_logits, jnp.float32), jnp.float32(lam), jnp.float32(temperature),
                   jax.random.key(config.seed), steps=config.steps, lr=config.lr,
                   weight_decay=config.weight_decay)
  return LinearHead(mean=mean, std=std, w=np.asarray(params["w"]), b=np.asarray(params["b"]))


def _teacher_inputs(image_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
  """[image features; report features x sqrt(D_image)]: the report block (L2-normalised TF-IDF
  rows) is scaled as a whole to the norm of a standardised image row, not standardised per
  column, where a rare n-gram would become a huge lever for memorising its few reports."""
  image_feats = np.asarray(image_feats, np.float32)
  scale = np.float32(np.sqrt(image_feats.shape[1]))
  return np.concatenate([image_feats, np.asarray(text_feats, np.float32) * scale], axis=1)


def fit_teacher(image_feats: np.ndarray, text_feats: np.ndarray, labels: np.ndarray,
                label_mask: np.ndarray | None = None, *, config: HeadConfig = HeadConfig()) -> LinearHead:
  """The teacher g(V(X), T(Z)): a logistic head on image features (standardised) and report features."""
  standardize = np.arange(image_feats.shape[1] + text_feats.shape[1]) < image_feats.shape[1]
  return fit_head(_teacher_inputs(image_feats, text_feats), labels, label_mask, standardize=standardize,
                  config=config)


def teacher_logits(teacher: LinearHead, image_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
  return teacher.logits(_teacher_inputs(image_feats, text_feats))


def crossfit_teacher_logits(image_feats: np.ndarray, text_feats: np.ndarray, labels: np.ndarray,
                            label_mask: np.ndarray | None = None, *, folds: int = 5,
                            config: HeadConfig = HeadConfig()) -> np.ndarray:
  """Out-of-fold teacher logits [N, K] for the training examples (see module docstring).

  ``folds`` <= 1 (or fewer examples than folds) scores the teacher on its own training set.
  """
  n = labels.shape[0]
  if folds <= 1 or n < folds:
    teacher = fit_teacher(image_feats, text_feats, labels, label_mask, config=config)
    return teacher_logits(teacher, image_feats, text_feats)
  mask = np.ones_like(labels) if label_mask is None else label_mask
  fold_of = np.random.default_rng(config.seed).permutation(n) % folds
  out = np.zeros(labels.shape, np.float32)
  for k in range(folds):
    held, fit = fold_of == k, fold_of != k
    teacher = fit_teacher(image_feats[fit], text_feats[fit], labels[fit], mask[fit], config=config)
    out[held] = teacher_logits(teacher, image_feats[held], text_feats[held])
  return out
