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

A head minimises its logistic (or distillation) loss plus an L2 penalty on the
weights by full-batch L-BFGS in one jitted ``lax.scan``: the objective is convex, so
the fit is the optimum, not a point along an optimiser's path that moves with the
initialisation (with AdamW and no penalty, three head seeds on the same 2000
examples gave mortality AUROCs with a standard deviation of 0.031). The penalty defaults to
scikit-learn's (C = 1), the same rule for every method; it can be fixed, or
cross-validated on the hard labels (:func:`choose_l2`). A distilled student uses
the penalty of its linear twin, so ``lam=0`` is still exactly the linear head. The
study cross-validates the teacher's penalty (``study.teacher_l2``): the teacher's fit
is what its soft targets are worth, and on ~2800 image + report columns C = 1 overfits.
An image-only teacher (``text_feats`` with no columns) gives self-distillation, the
control that separates the report's contribution from what soft targets do alone.
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
  # The weight penalty: () = scikit-learn's default (C = 1: l2 = 1 / labelled entries); one value =
  # that penalty; several = the one with the best cross-validated log loss.
  l2: tuple[float, ...] = ()
  cv_folds: int = 3
  steps: int = 100  # L-BFGS iterations
  seed: int = 0     # fold assignment (of the penalty's cross-validation and the teacher's cross-fitting)


@dataclasses.dataclass
class LinearHead:
  """A logistic head on standardised features: logits = ((x - mean) / std) @ w + b."""
  mean: np.ndarray  # [D]
  std: np.ndarray   # [D]
  w: np.ndarray     # [D, K]
  b: np.ndarray     # [K]
  l2: float = 0.0   # the penalty it was fitted with

  def logits(self, feats: np.ndarray) -> np.ndarray:
    """feats [N, D] -> logits [N, K] (float32)."""
    x = (np.asarray(feats, np.float32) - self.mean) / self.std
    return x @ self.w + self.b


def _solve(x, labels, label_mask, teacher_logits, lam, temperature, l2, steps):
  """argmin over (w, b) of distillation_loss (a mean over the N x K label entries) + l2/2 |w|^2,
  from zeros. Returns (params, final objective)."""
  d, k = x.shape[1], labels.shape[1]
  params = {"w": jnp.zeros((d, k)), "b": jnp.zeros((k,))}

  def objective(p):
    logits = x @ p["w"] + p["b"]
    fit = distillation_loss(logits, teacher_logits, labels, lam, temperature, multilabel=True,
                            label_mask=label_mask)
    return fit + 0.5 * l2 * jnp.sum(jnp.square(p["w"]))

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry, _):
    p, state = carry
    value, grad = value_and_grad(p, state=state)
    updates, state = solver.update(grad, state, p, value=value, grad=grad, value_fn=objective)
    return (optax.apply_updates(p, updates), state), value

  (params, _), values = jax.lax.scan(step, (params, solver.init(params)), None, length=steps)
  return params, values[-1]


_fit = jax.jit(_solve, static_argnames=("steps",))


SINGLE_SPLIT_FROM = 500


@functools.partial(jax.jit, static_argnames=("steps",))
def _held_out_loss(x, labels, label_mask, held, l2, *, steps):
  """Mean log loss on the ``held`` examples (bool [N]) of the hard-label head fitted on the others."""
  held = held[:, None].astype(label_mask.dtype)
  params, _ = _solve(x, labels, label_mask * (1 - held), jnp.zeros_like(labels), 0.0, 1.0, l2, steps)
  weight = label_mask * held
  losses = optax.sigmoid_binary_cross_entropy(x @ params["w"] + params["b"], labels)
  return jnp.sum(losses * weight) / jnp.maximum(weight.sum(), 1)


def choose_l2(x: np.ndarray, labels: np.ndarray, label_mask: np.ndarray, config: HeadConfig) -> float:
  """The penalty of ``config.l2`` (see :class:`HeadConfig`): with several values, the one with the
  lowest cross-validated log loss (the larger one on ties; the largest when there are fewer examples
  than folds).

  Every fold keeps the full matrix and masks its held-out rows, so all fits share one compiled
  program (a vmapped L-BFGS was slower: its line searches run in lockstep). From
  ``SINGLE_SPLIT_FROM`` examples on, only the first fold is held out: a held-out third of that
  many examples ranks the penalties stably, and the large fits dominate a study's time."""
  grid = sorted(float(v) for v in config.l2)
  n = x.shape[0]
  if not grid:
    # The loss is a mean over labelled entries, so this is sum-of-losses + |w|^2 / 2 (C = 1).
    return 1.0 / max(float(np.sum(label_mask)), 1.0)
  if len(grid) == 1:
    return grid[0]
  if n < config.cv_folds or config.cv_folds < 2:
    return grid[-1]
  fold_of = np.random.default_rng(config.seed).permutation(n) % config.cv_folds
  folds = range(1 if n >= SINGLE_SPLIT_FROM else config.cv_folds)
  x, labels, label_mask = jnp.asarray(x), jnp.asarray(labels), jnp.asarray(label_mask)
  losses = [np.mean([float(_held_out_loss(x, labels, label_mask, jnp.asarray(fold_of == f), jnp.float32(l2),
                                          steps=config.steps)) for f in folds])
            for l2 in grid]
  losses = np.asarray(losses)
  return grid[int(np.flatnonzero(losses <= losses.min() + 1e-6)[-1])]


def fit_head(feats: np.ndarray, labels: np.ndarray, label_mask: np.ndarray | None = None, *,
             teacher_logits: np.ndarray | None = None, lam: float = 0.0, temperature: float = 1.0,
             standardize: np.ndarray | None = None, l2: float | None = None,
             config: HeadConfig = HeadConfig()) -> LinearHead:
  """Fits a multi-label logistic head, optionally distilling from a teacher.

  Args:
    feats: float [N, D] frozen features.
    labels: {0, 1} float [N, K] (a binary task is K = 1).
    label_mask: [N, K], 1 = observed; None = all observed.
    teacher_logits: [N, K] logits of a report-seeing teacher on the same examples, or None.
    lam: weight of the teacher term in [0, 1]; must be 0 without a teacher.
    temperature: tau > 0 applied to the teacher logits.
    standardize: bool [D], the columns to standardise (default: all); the others are used as given.
    l2: the weight penalty; None = :func:`choose_l2` from ``config.l2`` on the hard labels.
  """
  feats = np.asarray(feats, np.float32)
  labels = np.asarray(labels, np.float32)
  if labels.ndim != 2 or feats.ndim != 2 or labels.shape[0] != feats.shape[0]:
    raise ValueError(f"fit_head: feats [N, D] and labels [N, K] expected, got {feats.shape} and {labels.shape}")
  if teacher_logits is None:
    if lam != 0.0:
      raise ValueError(f"fit_head: lam={lam} needs teacher_logits")
    teacher_logits = np.zeros_like(labels)
  label_mask = np.ones_like(labels) if label_mask is None else np.asarray(label_mask, np.float32)
  mean = feats.mean(0)
  # A feature constant on these examples keeps scale 1: dividing by its ~0 std would blow up every
  # later example that has it.
  std = feats.std(0)
  std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
  if standardize is not None:
    mean = np.where(standardize, mean, 0.0).astype(np.float32)
    std = np.where(standardize, std, 1.0).astype(np.float32)
  x = (feats - mean) / std
  # With far fewer examples than features the penalised optimum lies in the row space of x:
  # w = B^T a for an orthonormal basis B [R, D] of that space, with |w| = |a|, so fitting a on x B^T
  # (R <= N columns) is exact and cheaper. B comes from the N x N Gram matrix; directions of a
  # rank-deficient x (duplicate reports) become zero rows, so the shape, and the compiled fit, is
  # always N x N.
  basis = None
  if 2 * x.shape[0] <= x.shape[1]:
    eigvals, eigvecs = np.linalg.eigh((x @ x.T).astype(np.float64))
    keep = eigvals > 1e-9 * max(eigvals.max(), 1e-30)
    scale = np.where(keep, 1 / np.sqrt(np.where(keep, eigvals, 1.0)), 0.0).astype(np.float32)
    basis = (eigvecs.astype(np.float32).T @ x) * scale[:, None]
    x = x @ basis.T
  if l2 is None:
    l2 = choose_l2(x, labels, label_mask, config)
  params, _ = _fit(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(label_mask),
                   jnp.asarray(teacher_logits, jnp.float32), jnp.float32(lam), jnp.float32(temperature),
                   jnp.float32(l2), steps=config.steps)
  w = np.asarray(params["w"])
  if basis is not None:
    w = basis.T @ w
  return LinearHead(mean=mean, std=std, w=w.astype(np.float32), b=np.asarray(params["b"]), l2=float(l2))


def _teacher_inputs(image_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
  """[image features; report features x sqrt(D_image)]: the report block (L2-normalised TF-IDF
  rows) is scaled as a whole to the norm of a standardised image row, not standardised per
  column, where a rare n-gram would become a huge lever for memorising its few reports."""
  image_feats = np.asarray(image_feats, np.float32)
  scale = np.float32(np.sqrt(image_feats.shape[1]))
  return np.concatenate([image_feats, np.asarray(text_feats, np.float32) * scale], axis=1)


def fit_teacher(image_feats: np.ndarray, text_feats: np.ndarray, labels: np.ndarray,
                label_mask: np.ndarray | None = None, *, l2: float | None = None,
                config: HeadConfig = HeadConfig()) -> LinearHead:
  """The teacher g(V(X), T(Z)): a logistic head on image features (standardised) and report features.
  ``l2``: as in :func:`fit_head` (None = cross-validated)."""
  standardize = np.arange(image_feats.shape[1] + text_feats.shape[1]) < image_feats.shape[1]
  return fit_head(_teacher_inputs(image_feats, text_feats), labels, label_mask, standardize=standardize,
                  l2=l2, config=config)


def teacher_logits(teacher: LinearHead, image_feats: np.ndarray, text_feats: np.ndarray) -> np.ndarray:
  return teacher.logits(_teacher_inputs(image_feats, text_feats))


def crossfit_teacher_logits(image_feats: np.ndarray, text_feats: np.ndarray, labels: np.ndarray,
                            label_mask: np.ndarray | None = None, *, folds: int = 5,
                            l2: float | None = None, config: HeadConfig = HeadConfig()) -> np.ndarray:
  """Out-of-fold teacher logits [N, K] for the training examples (see module docstring).

  ``folds`` <= 1 (or fewer examples than folds) scores the teacher on its own training set.
  ``l2``: the teachers' penalty (pass the full teacher's; None = cross-validated in every fold).
  """
  n = labels.shape[0]
  if folds <= 1 or n < folds:
    teacher = fit_teacher(image_feats, text_feats, labels, label_mask, l2=l2, config=config)
    return teacher_logits(teacher, image_feats, text_feats)
  mask = np.ones_like(labels) if label_mask is None else label_mask
  fold_of = np.random.default_rng(config.seed).permutation(n) % folds
  out = np.zeros(labels.shape, np.float32)
  for k in range(folds):
    held, fit = fold_of == k, fold_of != k
    teacher = fit_teacher(image_feats[fit], text_feats[fit], labels[fit], mask[fit], l2=l2, config=config)
    out[held] = teacher_logits(teacher, image_feats[held], text_feats[held])
  return out
