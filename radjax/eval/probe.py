"""Linear probes on frozen image features (scikit-learn logistic regression).

Used to evaluate a pre-trained image encoder without fine-tuning it: features of
the labelled training subset train one L2-regularised logistic regression per
label (multi-label / binary) or one multinomial model (multi-class); the test
features are scored with it.

Choices, and why:
- Features are standardised with statistics of the *training* features only, so
  one C grid suits encoders whose feature scales differ by orders of magnitude.
- C (inverse regularisation strength) is chosen per label by stratified k-fold
  cross-validation over ``Cs`` (AUROC for binary labels, log loss for
  multi-class) when every class has at least ``cv_folds`` observed training
  examples; otherwise (the smallest training-set sizes) it falls back to the
  fixed ``default_C = 0.1``: features are high-dimensional relative to tens of
  examples, so a fairly strong prior is the safer default. Pass ``C=`` to fix it
  everywhere.
- A label with a single observed class in training cannot be learned; its test
  score is the training prevalence (a constant: AUROC 0.5), not an error, because
  this happens legitimately for rare labels at small n.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

__all__ = ["linear_probe", "DEFAULT_CS", "DEFAULT_C"]

DEFAULT_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
DEFAULT_C = 0.1
_TASK_KINDS = ("multilabel", "binary", "multiclass")


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  mean = train.mean(axis=0)
  std = train.std(axis=0)
  # Constant features would divide by zero; leaving them centred (all zero) is harmless.
  std = np.where(std > 1e-12, std, 1.0)
  return (train - mean) / std, (test - mean) / std


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, seed: int):
  from sklearn.linear_model import LogisticRegression

  model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
  with warnings.catch_warnings():
    # lbfgs non-convergence at max_iter on separable toy data is not actionable here.
    warnings.simplefilter("ignore", category=UserWarning)
    from sklearn.exceptions import ConvergenceWarning
    warnings.simplefilter("ignore", category=ConvergenceWarning)
    model.fit(x, y)
  return model


def _choose_c(x: np.ndarray, y: np.ndarray, cs: Sequence[float], folds: int, max_iter: int, seed: int,
              multiclass: bool) -> float | None:
  """Best C by stratified CV, or None when some class has fewer than ``folds`` examples."""
  from sklearn.metrics import log_loss, roc_auc_score
  from sklearn.model_selection import StratifiedKFold

  _, class_counts = np.unique(y, return_counts=True)
  if folds < 2 or class_counts.min() < folds or len(cs) < 2:
    return None
  classes = np.unique(y)
  skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
  splits = list(skf.split(x, y))
  best_c, best_score = None, -np.inf
  for c in cs:
    fold_scores = []
    for tr, va in splits:
      model = _fit(x[tr], y[tr], c, max_iter, seed)
      if multiclass:
        proba = np.zeros((len(va), len(classes)))
        proba[:, np.searchsorted(classes, model.classes_)] = model.predict_proba(x[va])
        fold_scores.append(-log_loss(y[va], proba, labels=classes))
      else:
        fold_scores.append(roc_auc_score(y[va], model.decision_function(x[va])))
    score = float(np.mean(fold_scores))
    # Strict '>' keeps the smallest C among ties: prefer the simpler model.
    if score > best_score:
      best_c, best_score = c, score
  return best_c


def linear_probe(train_feats: Any, train_labels: Any, train_mask: Any | None, test_feats: Any, *,
                 task_kind: str = "multilabel", n_classes: int | None = None, C: float | None = None,
                 Cs: Sequence[float] = DEFAULT_CS, default_C: float = DEFAULT_C, cv_folds: int = 3,
                 max_iter: int = 1000, seed: int = 0, return_info: bool = False):
  """Trains logistic-regression probes on ``train_feats`` and scores ``test_feats``.

  Args:
    train_feats: float [N, D] frozen features of the labelled training examples.
    train_labels: multilabel / binary: 0/1 [N, K] (binary also accepts [N]);
      multiclass: int class ids [N] (or one-hot [N, C]).
    train_mask: 1 = observed, 0 = ignore; same shape as the labels ([N] for
      multiclass class ids); None = all observed.
    test_feats: float [M, D].
    task_kind: "multilabel", "binary" (K = 1 multilabel) or "multiclass".
    n_classes: multiclass only: number of classes (default: max id + 1); classes
      absent from training get probability 0.
    C: fixed inverse regularisation strength; None = cross-validate over ``Cs``
      (falling back to ``default_C`` where CV is impossible; see module doc).
    cv_folds: stratified folds for choosing C.
    max_iter: lbfgs iterations.
    seed: fold shuffling (lbfgs itself is deterministic).
    return_info: also return a dict with the chosen C per label and which labels
      fell back to the training prevalence.
  Returns:
    multilabel / binary: probabilities float64 [M, K] ([M] when the labels were
    1-D); multiclass: probabilities float64 [M, n_classes]. With ``return_info``,
    ``(scores, info)``.
  """
  if task_kind not in _TASK_KINDS:
    raise ValueError(f"task_kind must be one of {_TASK_KINDS}, got {task_kind!r}")
  xtr = np.asarray(train_feats, np.float64)
  xte = np.asarray(test_feats, np.float64)
  if xtr.ndim != 2 or xte.ndim != 2:
    raise ValueError(f"features must be 2-D [N, D]; got train {xtr.shape}, test {xte.shape}")
  if xtr.shape[1] != xte.shape[1]:
    raise ValueError(f"train features have D = {xtr.shape[1]} but test features D = {xte.shape[1]}")
  if not (np.isfinite(xtr).all() and np.isfinite(xte).all()):
    raise ValueError("features contain NaN or inf")
  xtr, xte = _standardise(xtr, xte)
  if task_kind == "multiclass":
    return _multiclass(xtr, xte, train_labels, train_mask, n_classes, C, Cs, default_C, cv_folds, max_iter, seed,
                       return_info)

  y = np.asarray(train_labels, np.float64)
  squeeze = y.ndim == 1
  if squeeze:
    y = y[:, None]
  if y.ndim != 2 or y.shape[0] != xtr.shape[0]:
    raise ValueError(f"labels must be [N, K] with N = {xtr.shape[0]} train features, "
                     f"got shape {np.shape(train_labels)}")
  if task_kind == "binary" and y.shape[1] != 1:
    raise ValueError(f"task_kind 'binary' needs one label column, got K = {y.shape[1]}")
  m = np.ones_like(y) if train_mask is None else np.asarray(train_mask, np.float64).reshape(y.shape[0], -1)
  if m.shape != y.shape:
    raise ValueError(f"train_mask shape {np.shape(train_mask)} does not match labels {np.shape(train_labels)}")
  bad = (m != 0) & (y != 0) & (y != 1)
  if bad.any():
    i, j = map(int, np.argwhere(bad)[0])
    raise ValueError(f"labels must be 0/1 where observed; labels[{i}, {j}] = {y[i, j]!r}")

  k = y.shape[1]
  scores = np.empty((xte.shape[0], k))
  info = {"C": [None] * k, "constant": [False] * k}
  for j in range(k):
    obs = m[:, j] != 0
    yj = y[obs, j].astype(int)
    if yj.size == 0 or yj.min() == yj.max():
      # No observed example, or one class only: the best image-free guess is the prevalence.
      scores[:, j] = yj.mean() if yj.size else 0.5
      info["constant"][j] = True
      continue
    c = C if C is not None else (_choose_c(xtr[obs], yj, Cs, cv_folds, max_iter, seed, multiclass=False) or default_C)
    model = _fit(xtr[obs], yj, c, max_iter, seed)
    scores[:, j] = model.predict_proba(xte)[:, list(model.classes_).index(1)]
    info["C"][j] = c
  out = scores[:, 0] if squeeze else scores
  return (out, info) if return_info else out


def _multiclass(xtr, xte, labels, mask, n_classes, C, Cs, default_C, folds, max_iter, seed, return_info):
  y = np.asarray(labels)
  if y.ndim == 2:  # one-hot -> class ids
    n_classes = n_classes or y.shape[1]
    y = y.argmax(axis=1)
  if y.ndim != 1 or y.shape[0] != xtr.shape[0]:
    raise ValueError(f"multiclass labels must be class ids [N] (or one-hot [N, C]) with N = {xtr.shape[0]}, "
                     f"got shape {np.shape(labels)}")
  if not np.all(np.equal(np.mod(y, 1), 0)) or (y < 0).any():
    raise ValueError("multiclass labels must be non-negative integer class ids")
  y = y.astype(int)
  obs = np.ones(y.shape, bool) if mask is None else np.asarray(mask).reshape(-1) != 0
  if obs.shape != y.shape:
    raise ValueError(f"train_mask shape {np.shape(mask)} does not match labels {y.shape}")
  n_classes = int(n_classes or (y.max() + 1))
  if y.max() >= n_classes:
    raise ValueError(f"class id {int(y.max())} >= n_classes = {n_classes}")
  yo = y[obs]
  scores = np.zeros((xte.shape[0], n_classes))
  info: dict[str, Any] = {"C": None, "constant": False}
  present = np.unique(yo)
  if present.size < 2:
    if yo.size:
      scores[:] = np.bincount(yo, minlength=n_classes) / yo.size
    else:
      scores[:] = 1.0 / n_classes
    info["constant"] = True
  else:
    c = C if C is not None else (_choose_c(xtr[obs], yo, Cs, folds, max_iter, seed, multiclass=True) or default_C)
    model = _fit(xtr[obs], yo, c, max_iter, seed)
    scores[:, model.classes_] = model.predict_proba(xte)
    info["C"] = c
  return (scores, info) if return_info else scores
