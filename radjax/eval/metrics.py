"""Classification metrics: AUROC, AUPRC, Brier score, operating points, percentile bootstrap, seed
summaries.

Pure numpy (scipy only for the t quantile), no hidden state: every function is a
function of its arguments, and the bootstrap is deterministic given ``seed``.

Shapes: ``N`` examples, ``K`` labels, ``B`` bootstrap resamples.

Masks mark observed labels (1) versus blank / censored / ignored ones (0), as in
the batch contract's ``label_mask``; masked-out entries are ignored entirely
(their scores may be anything, including NaN).

The core of every metric is a *weighted* implementation over a batch of weight
vectors ``w [B, N]``: a bootstrap resample drawn as an index matrix ``idx [B, N]``
is exactly the multiset of examples with multiplicities ``counts[b, i] = #{j:
idx[b, j] = i}``, so the scores need sorting once for all resamples and each
resample costs a cumulative sum. The unweighted metrics are the ``B = 1`` case
of the same code, so the point estimate and the bootstrap cannot disagree.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np

__all__ = [
    "auroc",
    "auprc",
    "multilabel_auroc",
    "multilabel_macro_auroc",
    "brier",
    "calibration_slope",
    "calibration_in_the_large",
    "OPERATING_RULES",
    "operating_threshold",
    "rates_at",
    "rates_with_ci",
    "bootstrap_ci",
    "bootstrap_indices",
    "seed_summary",
    "register_batched",
]

# Resamples are processed in chunks of about this many (resample, example) cells so
# that N = 100k examples x 1000 resamples does not need an 800 MB index matrix.
_CHUNK_CELLS = 2_000_000


# ----------------------------------------------------------------------------
# Input checking.


def _as_1d(x: Any, name: str) -> np.ndarray:
  a = np.asarray(x)
  if a.ndim != 1:
    raise ValueError(f"{name} must be 1-D [N], got shape {a.shape}")
  return a


def _check_binary(scores: Any, labels: Any, mask: Any | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns (scores float64 [N], labels bool [N], mask bool [N]) after validation."""
  s = _as_1d(scores, "scores").astype(np.float64)
  y = _as_1d(labels, "labels")
  if y.shape != s.shape:
    raise ValueError(f"labels shape {y.shape} != scores shape {s.shape}")
  m = np.ones(s.shape, bool) if mask is None else _as_1d(mask, "mask") != 0
  if m.shape != s.shape:
    raise ValueError(f"mask shape {m.shape} != scores shape {s.shape}")
  yf = y.astype(np.float64)
  bad = m & (yf != 0) & (yf != 1)
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    raise ValueError(f"labels must be 0/1 where observed; labels[{i}] = {y[i]!r}")
  nonfinite = m & ~np.isfinite(s)
  if nonfinite.any():
    i = int(np.flatnonzero(nonfinite)[0])
    raise ValueError(f"scores must be finite where observed; scores[{i}] = {s[i]!r}")
  # Masked-out scores may be NaN; give them a finite value so sorting is well defined
  # (their weight is zero, so the value does not matter).
  s = np.where(m, s, 0.0)
  return s, yf == 1, m


def _check_multilabel(scores: Any, labels: Any, mask: Any | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  s = np.asarray(scores)
  y = np.asarray(labels)
  if s.ndim != 2:
    raise ValueError(f"scores must be 2-D [N, K], got shape {s.shape}")
  if y.shape != s.shape:
    raise ValueError(f"labels shape {y.shape} != scores shape {s.shape}")
  m = np.ones(s.shape) if mask is None else np.asarray(mask)
  if m.shape != s.shape:
    raise ValueError(f"mask shape {m.shape} != scores shape {s.shape}")
  return s, y, m


# ----------------------------------------------------------------------------
# Weighted cores: one sort, B weight vectors.


def _group_sums(scores: np.ndarray, labels: np.ndarray, w: np.ndarray, descending: bool):
  """Sorts by score once and sums positive / negative weight per distinct score.

  Args:
    scores: float64 [N].
    labels: bool [N].
    w: float64 [B, N] non-negative weights (mask x bootstrap multiplicity).
    descending: sort order of the distinct scores.
  Returns:
    (pos_g, neg_g): float64 [B, G], G = number of distinct scores, in sort order.
  """
  order = np.argsort(-scores if descending else scores, kind="stable")
  s = scores[order]
  starts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))
  ws = w[:, order]
  ys = labels[order]
  pos_g = np.add.reduceat(ws * ys, starts, axis=1)
  neg_g = np.add.reduceat(ws * ~ys, starts, axis=1)
  return pos_g, neg_g


def _auroc_weighted(scores: np.ndarray, labels: np.ndarray, w: np.ndarray) -> np.ndarray:
  """AUROC for each weight row: float64 [B] (NaN where a row lacks a class).

  Mann-Whitney U with ties counted one half: U = sum over positives of (#negatives
  scoring lower + 0.5 #negatives tied), which equals the midrank formula
  sum(rank of positives) - n1 (n1 + 1) / 2 but needs no per-resample ranking.
  """
  if scores.size == 0:
    return np.full(w.shape[0], np.nan)
  pos_g, neg_g = _group_sums(scores, labels, w, descending=False)
  neg_below = np.cumsum(neg_g, axis=1) - neg_g
  u = np.sum(pos_g * (neg_below + 0.5 * neg_g), axis=1)
  denom = pos_g.sum(axis=1) * neg_g.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denom > 0, u / np.where(denom > 0, denom, 1.0), np.nan)


def _auprc_weighted(scores: np.ndarray, labels: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Average precision for each weight row: float64 [B] (NaN where a row has no positive).

  AP = sum_k (R_k - R_{k-1}) P_k over thresholds at the distinct scores, highest
  first (scikit-learn's definition: no interpolation, tied scores share one
  threshold).
  """
  if scores.size == 0:
    return np.full(w.shape[0], np.nan)
  pos_g, neg_g = _group_sums(scores, labels, w, descending=True)
  tp = np.cumsum(pos_g, axis=1)
  fp = np.cumsum(neg_g, axis=1)
  called = tp + fp
  precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
  n_pos = tp[:, -1]
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(n_pos > 0, np.sum(pos_g * precision, axis=1) / np.where(n_pos > 0, n_pos, 1.0), np.nan)


def _macro_from_columns(per_label: np.ndarray) -> np.ndarray:
  """Mean over the last axis ignoring NaN (labels with one class), NaN when all are NaN."""
  finite = np.isfinite(per_label)
  count = finite.sum(axis=-1)
  total = np.where(finite, per_label, 0.0).sum(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _multilabel_weighted(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Per-label AUROC for each weight row: float64 [B, K]."""
  k = scores.shape[1]
  out = np.empty((w.shape[0], k))
  for j in range(k):
    try:
      s, y, m = _check_binary(scores[:, j], labels[:, j], mask[:, j])
    except ValueError as e:
      raise ValueError(f"label column {j}: {e}") from None
    out[:, j] = _auroc_weighted(s, y, w * m)
  return out


# ----------------------------------------------------------------------------
# Public metrics.


def auroc(scores: Any, labels: Any, mask: Any | None = None) -> float:
  """Area under the ROC curve (rank-based Mann-Whitney U, ties count one half).

  Args:
    scores: [N] real-valued scores, higher = more likely positive.
    labels: [N] 0/1 (where observed).
    mask: optional [N]; nonzero = observed, zero = ignore the example.
  Returns:
    AUROC in [0, 1]; NaN when the observed examples hold only one class.
  """
  s, y, m = _check_binary(scores, labels, mask)
  return float(_auroc_weighted(s, y, m[None].astype(np.float64))[0])


def auprc(scores: Any, labels: Any, mask: Any | None = None) -> float:
  """Average precision (area under the precision-recall curve, step-wise).

  Matches ``sklearn.metrics.average_precision_score``. Args as ``auroc``.
  Returns NaN when no observed example is positive.
  """
  s, y, m = _check_binary(scores, labels, mask)
  return float(_auprc_weighted(s, y, m[None].astype(np.float64))[0])


def multilabel_auroc(scores: Any, labels: Any, mask: Any | None = None) -> tuple[np.ndarray, float]:
  """Per-label and macro AUROC.

  Args:
    scores: [N, K]; labels: [N, K] 0/1; mask: optional [N, K] (nonzero = observed).
  Returns:
    (per_label float64 [K] with NaN for labels whose observed examples hold one
    class, macro = mean of the non-NaN entries, NaN if there are none).
  """
  s, y, m = _check_multilabel(scores, labels, mask)
  per = _multilabel_weighted(s, y, m, np.ones((1, s.shape[0])))[0]
  return per, float(_macro_from_columns(per))


def multilabel_macro_auroc(scores: Any, labels: Any, mask: Any | None = None) -> float:
  """Macro AUROC of ``multilabel_auroc`` as a scalar (for ``bootstrap_ci``)."""
  return multilabel_auroc(scores, labels, mask)[1]


def _brier_weighted(scores: np.ndarray, labels: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Weighted mean squared error of probabilities for each weight row: float64 [B]."""
  total = w.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(total > 0, w @ (scores - labels) ** 2 / np.where(total > 0, total, 1.0), np.nan)


def brier(scores: Any, labels: Any, mask: Any | None = None) -> float:
  """Brier score: the mean of (probability - label)^2 over observed examples (lower is better;
  a constant at the prevalence p scores p (1 - p)).

  Args as ``auroc``, with ``scores`` probabilities in [0, 1]. Returns NaN with no observed example.
  Matches ``sklearn.metrics.brier_score_loss``."""
  s, y, m = _check_binary(scores, labels, mask)
  return float(_brier_weighted(s, y, m[None].astype(np.float64))[0])


# Probabilities this close to 0 or 1 are taken as that close: float32 sigmoids reach 0 and 1 exactly.
_LOGIT_EPS = 1e-7


def _calibration_weighted(scores: np.ndarray, labels: np.ndarray, w: np.ndarray,
                          fit_slope: bool, iterations: int = 50) -> np.ndarray:
  """Logistic recalibration ``logit P(y) = a + b logit(p)`` by Newton's method, for each weight
  row at once: the slope b [B] (``fit_slope``), else the intercept a [B] with b fixed at 1.
  NaN where a row lacks a class or the fit does not converge (perfectly separated scores have no
  finite slope)."""
  p = np.clip(scores, _LOGIT_EPS, 1 - _LOGIT_EPS)
  x, y = np.log(p) - np.log1p(-p), labels.astype(np.float64)
  a, b = np.zeros(w.shape[0]), np.ones(w.shape[0])
  step = np.full(w.shape[0], np.inf)
  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    for _ in range(iterations):
      q = 1.0 / (1.0 + np.exp(-(a[:, None] + b[:, None] * x)))
      r, v = w * (y - q), w * q * (1 - q)  # gradient and curvature terms
      ga, haa = r.sum(1), v.sum(1)
      if fit_slope:
        gb, hab, hbb = r @ x, v @ x, v @ (x * x)
        det = haa * hbb - hab ** 2
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
      else:
        da, db = ga / haa, 0.0
      a, b = a + da, b + db
      step = np.maximum(np.abs(da), np.abs(db))
      if np.all(~np.isfinite(step) | (step < 1e-10)):
        break
    pos, neg = w @ y, w @ (1 - y)
    ok = np.isfinite(step) & (step < 1e-6) & (pos > 0) & (neg > 0)
  return np.where(ok, b if fit_slope else a, np.nan)


def calibration_slope(scores: Any, labels: Any, mask: Any | None = None) -> float:
  """Calibration slope: b of the logistic fit ``logit P(y = 1) = a + b logit(p)`` (1 when the
  probabilities are as spread as they should be, below 1 when too extreme, as an overfit or
  transported model's are). Args as ``brier``. NaN with one class only, or when the scores
  separate the classes perfectly (no finite slope)."""
  s, y, m = _check_binary(scores, labels, mask)
  return float(_calibration_weighted(s, y, m[None].astype(np.float64), fit_slope=True)[0])


def calibration_in_the_large(scores: Any, labels: Any, mask: Any | None = None) -> float:
  """Calibration-in-the-large: a of ``logit P(y = 1) = a + logit(p)`` (the slope held at 1): 0 when
  the probabilities are right on average, positive when they are too low (a prevalence higher
  than the model expects). Args as ``brier``; NaN with one class only."""
  s, y, m = _check_binary(scores, labels, mask)
  return float(_calibration_weighted(s, y, m[None].astype(np.float64), fit_slope=False)[0])


# ----------------------------------------------------------------------------
# Operating points: a threshold turns scores into decisions (positive when score >= threshold).

OPERATING_RULES = ("sensitivity", "specificity", "youden", "threshold")


def operating_threshold(scores: Any, labels: Any, mask: Any | None, rule: str,
                        target: float | None = None) -> float:
  """The threshold ``rule`` picks on these examples; an example is called positive when its score
  is >= the threshold.

  Args:
    scores, labels, mask: as ``auroc``.
    rule: "sensitivity": the highest threshold whose sensitivity is at least ``target`` (the most
      specific one that finds that share of positives); "specificity": the lowest threshold whose
      specificity is at least ``target`` (the most sensitive one); "youden": the threshold that
      maximises sensitivity + specificity - 1 (the highest of equals); "threshold": ``target``.
    target: in (0, 1] for "sensitivity" and "specificity"; the threshold itself for "threshold".
  Returns:
    The threshold: one of the observed scores, or just above the highest (nothing called positive)
    when only that meets the rule. NaN when the rule is undefined: no observed positive
    ("sensitivity", "youden") or negative ("specificity", "youden").
  """
  if rule not in OPERATING_RULES:
    raise ValueError(f"operating rule {rule!r}; expected one of {', '.join(OPERATING_RULES)}")
  if rule == "youden":
    if target is not None:
      raise ValueError("the youden rule takes no target")
  elif target is None or not math.isfinite(target):
    raise ValueError(f"the {rule} rule needs a finite target, got {target!r}")
  elif rule != "threshold" and not 0.0 < target <= 1.0:
    raise ValueError(f"a {rule} target is a proportion in (0, 1], got {target}")
  if rule == "threshold":
    return float(target)
  s, y, m = _check_binary(scores, labels, mask)
  s, y = s[m], y[m]
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if (rule != "specificity" and n_pos == 0) or (rule != "sensitivity" and n_neg == 0):
    return math.nan
  pos_g, neg_g = _group_sums(s, y, np.ones((1, s.size)), descending=True)
  distinct = np.unique(s)[::-1]  # the groups' scores, in _group_sums's order
  candidates = np.concatenate([[np.nextafter(distinct[0], np.inf)], distinct])
  sensitivity = np.concatenate([[0.0], np.cumsum(pos_g[0])]) / max(n_pos, 1)
  specificity = 1.0 - np.concatenate([[0.0], np.cumsum(neg_g[0])]) / max(n_neg, 1)
  if rule == "sensitivity":  # sensitivity rises as the threshold falls: the first candidate to reach it
    i = int(np.argmax(sensitivity >= target))
  elif rule == "specificity":  # specificity falls as the threshold falls: the last one to keep it
    i = int(np.flatnonzero(specificity >= target)[-1])
  else:
    i = int(np.argmax(sensitivity + specificity - 1.0))
  return float(candidates[i])


_RATES = ("sensitivity", "specificity", "ppv", "npv")


def _rates_weighted(scores: np.ndarray, labels: np.ndarray, w: np.ndarray,
                    threshold: float) -> dict[str, np.ndarray]:
  """Sensitivity, specificity, PPV and NPV at ``threshold`` for each weight row: float64 [B] each,
  NaN where the denominator is empty."""
  called = scores >= threshold
  tp, fn = w @ (labels & called), w @ (labels & ~called)
  fp, tn = w @ (~labels & called), w @ (~labels & ~called)
  with np.errstate(invalid="ignore", divide="ignore"):
    return {name: np.where(a + b > 0, a / np.where(a + b > 0, a + b, 1.0), np.nan)
            for name, (a, b) in zip(_RATES, ((tp, fn), (tn, fp), (tp, fp), (tn, fn)))}


def rates_at(scores: Any, labels: Any, mask: Any | None, threshold: float) -> dict[str, float]:
  """Sensitivity, specificity, positive and negative predictive value of the decisions
  ``scores >= threshold``. Args as ``auroc``; each rate is NaN when its denominator is empty (no
  positive, no negative, nothing called positive, nothing called negative)."""
  s, y, m = _check_binary(scores, labels, mask)
  return {k: float(v[0]) for k, v in _rates_weighted(s, y, m[None].astype(np.float64), threshold).items()}


def rates_with_ci(scores: Any, labels: Any, mask: Any | None, threshold: float, *, n_boot: int = 1000,
                  alpha: float = 0.05, seed: int = 0) -> dict[str, tuple[float, float, float]]:
  """``rates_at`` with percentile-bootstrap intervals: {rate: (point, lower, upper)}; every rate
  is computed on the same resamples (``bootstrap_indices(N, n_boot, seed)``)."""
  s, y, m = _check_binary(scores, labels, mask)
  out = {}
  for name in _RATES:
    out[name] = bootstrap_ci(
        lambda s, y, m, name=name: rates_at(s, y, m, threshold)[name], s, y, m,
        n_boot=n_boot, alpha=alpha, seed=seed,
        batched_fn=lambda w, s, y, m, name=name: _rates_weighted(s, y, w * m, threshold)[name])
  return out


# ----------------------------------------------------------------------------
# Batched implementations used by bootstrap_ci: fn(weights [B, N], *arrays) -> [B].


def _auroc_batched(w: np.ndarray, scores: Any, labels: Any, mask: Any | None = None) -> np.ndarray:
  s, y, m = _check_binary(scores, labels, mask)
  return _auroc_weighted(s, y, w * m)


def _auprc_batched(w: np.ndarray, scores: Any, labels: Any, mask: Any | None = None) -> np.ndarray:
  s, y, m = _check_binary(scores, labels, mask)
  return _auprc_weighted(s, y, w * m)


def _brier_batched(w: np.ndarray, scores: Any, labels: Any, mask: Any | None = None) -> np.ndarray:
  s, y, m = _check_binary(scores, labels, mask)
  return _brier_weighted(s, y, w * m)


def _slope_batched(w: np.ndarray, scores: Any, labels: Any, mask: Any | None = None) -> np.ndarray:
  s, y, m = _check_binary(scores, labels, mask)
  return _calibration_weighted(s, y, w * m, fit_slope=True)


def _macro_batched(w: np.ndarray, scores: Any, labels: Any, mask: Any | None = None) -> np.ndarray:
  s, y, m = _check_multilabel(scores, labels, mask)
  return _macro_from_columns(_multilabel_weighted(s, y, m, w))


_BATCHED: dict[Callable[..., float], Callable[..., np.ndarray]] = {
    auroc: _auroc_batched,
    auprc: _auprc_batched,
    brier: _brier_batched,
    calibration_slope: _slope_batched,
    multilabel_macro_auroc: _macro_batched,
}


def register_batched(metric_fn: Callable[..., float], batched_fn: Callable[..., np.ndarray]) -> None:
  """Registers a vectorised version of ``metric_fn`` for ``bootstrap_ci``.

  ``batched_fn(weights [B, N] float64, *arrays) -> [B]`` must equal
  ``metric_fn(*(a[idx_b] for a in arrays))`` where ``weights[b, i]`` is how many
  times example i appears in resample b.
  """
  _BATCHED[metric_fn] = batched_fn


# ----------------------------------------------------------------------------
# Bootstrap.


def _chunk_size(n: int) -> int:
  return max(1, _CHUNK_CELLS // max(n, 1))


def _index_chunks(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
  """Yields int64 [b, n] resampled-index matrices, b <= chunk size, n_boot rows in all."""
  rng = np.random.default_rng(seed)
  step = _chunk_size(n)
  for start in range(0, n_boot, step):
    yield rng.integers(0, n, size=(min(step, n_boot - start), n))


def bootstrap_indices(n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
  """The int64 [n_boot, n] resample matrix ``bootstrap_ci`` uses for this (n, n_boot, seed)."""
  return np.concatenate(list(_index_chunks(n, n_boot, seed)), axis=0)


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
  """Multiplicity of each example in each resample: float64 [b, n]."""
  b = idx.shape[0]
  flat = (idx + (np.arange(b, dtype=np.int64) * n)[:, None]).ravel()
  return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def bootstrap_ci(metric_fn: Callable[..., float], *arrays: Any, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0, vectorized: bool = True,
                 batched_fn: Callable[..., np.ndarray] | None = None) -> tuple[float, float, float]:
  """Percentile bootstrap confidence interval over examples.

  Every array is resampled along axis 0 with the same indices (so masks and
  multi-label rows stay aligned). Resamples where the metric is undefined (NaN,
  e.g. a resample with one class) are dropped from the percentiles.

  Args:
    metric_fn: ``metric_fn(*arrays) -> float``; ``auroc``, ``auprc`` and
      ``multilabel_macro_auroc`` have vectorised implementations.
    *arrays: arrays sharing the leading dimension N (e.g. scores, labels, mask).
    n_boot: number of resamples.
    alpha: 1 - coverage (0.05 -> 95% interval).
    seed: the resample indices are ``bootstrap_indices(N, n_boot, seed)``.
    vectorized: use the batched implementation when one is known; ``False`` runs
      a plain loop over the same resamples (same result, slower).
    batched_fn: optional batched implementation (see ``register_batched``).
  Returns:
    (point estimate on all data, lower, upper); the bounds are NaN when no
    resample gives a defined metric.
  """
  if not arrays:
    raise ValueError("bootstrap_ci needs at least one array to resample")
  if n_boot < 1:
    raise ValueError(f"n_boot must be >= 1, got {n_boot}")
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  arrs = [np.asarray(a) for a in arrays]
  n = arrs[0].shape[0] if arrs[0].ndim else -1
  for i, a in enumerate(arrs):
    if a.ndim == 0 or a.shape[0] != n:
      raise ValueError(f"array {i} has shape {a.shape}; every array needs leading dimension N = {n}")
  if n == 0:
    raise ValueError("cannot bootstrap zero examples")

  point = float(metric_fn(*arrs))
  batched = batched_fn or (_BATCHED.get(metric_fn) if vectorized else None)
  values = []
  for idx in _index_chunks(n, n_boot, seed):
    if batched is not None:
      values.append(np.asarray(batched(_counts(idx, n), *arrs), np.float64))
    else:
      values.append(np.array([metric_fn(*(a[row] for a in arrs)) for row in idx], np.float64))
  v = np.concatenate(values)
  v = v[np.isfinite(v)]
  if v.size == 0:
    return point, math.nan, math.nan
  lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
  return point, float(lo), float(hi)


# ----------------------------------------------------------------------------
# Across seeds.


def seed_summary(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> dict[str, Any]:
  """Mean, sample std and a t-distribution confidence interval for the mean over seeds.

  Non-finite values (runs whose metric was undefined) are dropped; ``n`` counts
  the rest. With n = 1 the std and interval are NaN (one seed says nothing about
  seed variance); with n = 0 everything but n is NaN.

  Returns:
    dict(mean, std, n, ci95_lo, ci95_hi, ci95=(lo, hi)); the ``ci95`` names are
    kept for other ``confidence`` levels too.
  """
  v = np.asarray(values, dtype=np.float64).ravel()
  v = v[np.isfinite(v)]
  n = int(v.size)
  mean = float(v.mean()) if n else math.nan
  std = float(v.std(ddof=1)) if n >= 2 else math.nan
  if n >= 2:
    from scipy import stats  # scikit-learn depends on scipy; imported lazily for import speed.
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    lo, hi = mean - half, mean + half
  else:
    lo = hi = math.nan
  return {"mean": mean, "std": std, "n": n, "ci95_lo": lo, "ci95_hi": hi, "ci95": (lo, hi)}
