"""Tests for radjax.eval.metrics (AUROC, AUPRC, Brier score, operating points, bootstrap, seed
summaries) and radjax.eval.probe."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn.metrics import (average_precision_score, brier_score_loss, confusion_matrix, roc_auc_score,
                             roc_curve)

from radjax.eval import metrics as M
from radjax.eval.probe import linear_probe


def _brute_auroc(s, y):
  pos, neg = s[y == 1], s[y == 0]
  diff = pos[:, None] - neg[None, :]
  return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg))


def _data(n, seed, ties=True):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  y[0], y[-1] = 0, 1  # both classes present
  s = y * 0.7 + rng.normal(size=n)
  if ties:
    s = np.round(s, 1)  # many tied scores
  return s, y


# ----------------------------------------------------------------------------
# AUROC / AUPRC.


@pytest.mark.parametrize("n", [2, 3, 10, 57, 1000])
@pytest.mark.parametrize("ties", [True, False])
def test_auroc_matches_sklearn_and_brute_force(n, ties):
  s, y = _data(n, seed=n, ties=ties)
  got = M.auroc(s, y)
  assert got == pytest.approx(roc_auc_score(y, s), abs=1e-12)
  assert got == pytest.approx(_brute_auroc(s, y), abs=1e-12)


def test_auroc_all_tied_scores_is_half():
  assert M.auroc(np.zeros(10), np.arange(10) % 2) == 0.5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=40))
def test_auroc_property_brute_force(pairs):
  s = np.array([p[0] for p in pairs], float)
  y = np.array([p[1] for p in pairs], int)
  got = M.auroc(s, y)
  if y.min() == y.max():
    assert math.isnan(got)
  else:
    assert got == pytest.approx(_brute_auroc(s, y), abs=1e-12)
    assert M.auroc(-s, y) == pytest.approx(1 - got, abs=1e-12)


def test_auroc_single_class_is_nan():
  assert math.isnan(M.auroc([0.1, 0.2, 0.3], [1, 1, 1]))
  assert math.isnan(M.auroc([0.1, 0.2, 0.3], [0, 0, 0]))
  assert math.isnan(M.auroc([0.1, 0.2, 0.3], [0, 1, 1], mask=[1, 0, 0]))


def test_masked_auroc_equals_subset_and_ignores_masked_nan():
  s, y = _data(300, seed=1)
  rng = np.random.default_rng(2)
  mask = rng.random(300) > 0.4
  s_nan = np.where(mask, s, np.nan)  # masked-out scores may be garbage
  y_bad = np.where(mask, y, 7)  # ... and so may masked-out labels
  got = M.auroc(s_nan, y_bad, mask.astype(np.float32))
  assert got == pytest.approx(roc_auc_score(y[mask], s[mask]), abs=1e-12)
  assert M.auprc(s_nan, y_bad, mask) == pytest.approx(average_precision_score(y[mask], s[mask]), abs=1e-12)


@pytest.mark.parametrize("n", [2, 10, 57, 1000])
@pytest.mark.parametrize("ties", [True, False])
def test_auprc_matches_sklearn(n, ties):
  s, y = _data(n, seed=n + 1, ties=ties)
  assert M.auprc(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_auprc_no_positive_is_nan():
  assert math.isnan(M.auprc([0.1, 0.2], [0, 0]))


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="labels must be 0/1"):
    M.auroc([0.1, 0.2], [0, 2])
  with pytest.raises(ValueError, match="shape"):
    M.auroc([0.1, 0.2], [0, 1, 1])
  with pytest.raises(ValueError, match="finite"):
    M.auroc([np.nan, 0.2], [0, 1])
  with pytest.raises(ValueError, match="1-D"):
    M.auroc(np.zeros((2, 2)), np.zeros((2, 2)))


def test_multilabel_auroc_per_label_mask_and_macro():
  rng = np.random.default_rng(3)
  n, k = 400, 5
  y = rng.integers(0, 2, (n, k))
  s = y * rng.uniform(0.2, 2.0, k) + rng.normal(size=(n, k))
  mask = (rng.random((n, k)) > 0.3).astype(np.float32)
  y[:, 4] = 1  # one class only: skipped
  per, macro = M.multilabel_auroc(s, y, mask)
  for j in range(4):
    m = mask[:, j] > 0
    assert per[j] == pytest.approx(roc_auc_score(y[m, j], s[m, j]), abs=1e-12)
  assert math.isnan(per[4])
  assert macro == pytest.approx(np.mean(per[:4]), abs=1e-12)
  assert M.multilabel_macro_auroc(s, y, mask) == macro
  _, macro_nan = M.multilabel_auroc(s[:, 4:], y[:, 4:], mask[:, 4:])
  assert math.isnan(macro_nan)


# ----------------------------------------------------------------------------
# Brier score and operating points.


def test_brier_matches_sklearn_and_ignores_masked_examples():
  rng = np.random.default_rng(20)
  p, y = rng.random(80), rng.integers(0, 2, 80)
  mask = rng.random(80) > 0.3
  assert M.brier(p, y) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
  assert M.brier(np.where(mask, p, np.nan), y, mask) == pytest.approx(
      brier_score_loss(y[mask], p[mask]), abs=1e-12)
  assert math.isnan(M.brier(p, y, np.zeros(80)))


def test_calibration_slope_and_intercept_against_their_definitions():
  """The slope is logistic regression's coefficient on logit(p) (scikit-learn's unpenalised fit);
  the intercept with the slope held at 1 solves its score equation sum(y - sigmoid(a + logit p)) = 0
  (scipy's root finder)."""
  from scipy import optimize, special
  from sklearn.linear_model import LogisticRegression
  rng = np.random.default_rng(21)
  x = 1.5 * rng.normal(size=1500)
  p = special.expit(x)
  y = (rng.random(1500) < special.expit(0.4 + 0.6 * x)).astype(int)  # too extreme, and too low
  mask = rng.random(1500) > 0.1
  fit = LogisticRegression(C=np.inf, tol=1e-12, max_iter=1000).fit(x[mask][:, None], y[mask])
  assert M.calibration_slope(p, y, mask) == pytest.approx(fit.coef_[0, 0], abs=1e-6)
  root = optimize.brentq(lambda a: np.sum(y[mask] - special.expit(a + x[mask])), -5, 5, xtol=1e-12)
  assert M.calibration_in_the_large(p, y, mask) == pytest.approx(root, abs=1e-8)
  assert 0.5 < M.calibration_slope(p, y) < 0.75 and M.calibration_in_the_large(p, y) > 0.2
  # Probabilities of exactly 0 and 1 (float32 sigmoids give them) are finite on the logit scale.
  assert math.isfinite(M.calibration_slope(np.r_[0.0, 1.0, p], np.r_[1, 0, y]))
  # Perfectly separated scores have no finite slope; one class has none at all.
  assert math.isnan(M.calibration_slope([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]))
  assert math.isnan(M.calibration_slope(p, np.zeros(1500))) and math.isnan(M.calibration_in_the_large(p, np.ones(1500)))


def _rule_by_brute_force(s, y, rule, target):
  """The operating rule by its definition, over every candidate threshold one at a time."""
  candidates = sorted(set(s.tolist()), reverse=True)
  candidates = [np.nextafter(candidates[0], np.inf)] + candidates  # above every score first
  sens = [np.mean(s[y == 1] >= t) for t in candidates]
  spec = [np.mean(s[y == 0] < t) for t in candidates]
  if rule == "sensitivity":
    return next(t for t, v in zip(candidates, sens) if v >= target)
  if rule == "specificity":
    return [t for t, v in zip(candidates, spec) if v >= target][-1]
  best = max(a + b for a, b in zip(sens, spec))
  return next(t for t, a, b in zip(candidates, sens, spec) if a + b == best)


@pytest.mark.parametrize("rule,target", [("sensitivity", 0.9), ("sensitivity", 0.5), ("sensitivity", 1.0),
                                         ("specificity", 0.95), ("specificity", 0.7), ("specificity", 1.0),
                                         ("youden", None)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_operating_threshold_by_definition_and_by_sklearn_roc_curve(rule, target, seed):
  s, y = _data(60 + 17 * seed, seed=30 + seed, ties=seed != 2)
  mask = (np.arange(len(s)) % 7 != 3).astype(float)
  t = M.operating_threshold(np.where(mask > 0, s, np.nan), y, mask, rule, target)
  so, yo = s[mask > 0], y[mask > 0]
  assert t == _rule_by_brute_force(so, yo, rule, target)
  # scikit-learn's ROC curve: thresholds from high to low, the first one above every score.
  fpr, tpr, thresholds = roc_curve(yo, so, drop_intermediate=False)
  if rule == "sensitivity":
    i = int(np.argmax(tpr >= target))
  elif rule == "specificity":
    i = int(np.flatnonzero(1 - fpr >= target)[-1])
  else:
    i = int(np.argmax(tpr - fpr))
  if i == 0:
    assert t > so.max()
  else:
    assert t == thresholds[i]
  rates = M.rates_at(so, yo, None, t)
  if target is not None:
    assert rates[rule] >= target


def test_operating_threshold_undefined_and_bad_rules():
  s, y = np.array([0.2, 0.4, 0.9]), np.array([0, 0, 0])
  assert math.isnan(M.operating_threshold(s, y, None, "sensitivity", 0.9))
  assert math.isnan(M.operating_threshold(s, y, None, "youden"))
  assert M.operating_threshold(s, y, None, "specificity", 1.0) > 0.9
  assert M.operating_threshold(s, y, None, "specificity", 0.6) == 0.9
  assert M.operating_threshold(s, y, None, "threshold", 0.3) == 0.3
  for rule, target, message in (("recall", 0.9, "operating rule"), ("sensitivity", None, "needs a finite"),
                                ("specificity", 1.5, r"in \(0, 1\]"), ("youden", 0.5, "no target")):
    with pytest.raises(ValueError, match=message):
      M.operating_threshold(s, y, None, rule, target)


def test_rates_at_match_the_confusion_matrix():
  rng = np.random.default_rng(40)
  s, y = rng.random(90), rng.integers(0, 2, 90)
  mask = rng.random(90) > 0.25
  (tn, fp), (fn, tp) = confusion_matrix(y[mask], (s[mask] >= 0.6).astype(int))
  rates = M.rates_at(s, y, mask, 0.6)
  assert rates == pytest.approx({"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
                                 "ppv": tp / (tp + fp), "npv": tn / (tn + fn)}, abs=1e-12)
  nothing_called = M.rates_at(s, y, mask, 2.0)
  assert nothing_called["sensitivity"] == 0 and nothing_called["specificity"] == 1
  assert math.isnan(nothing_called["ppv"])


def test_rates_with_ci_equal_a_loop_over_the_same_resamples():
  rng = np.random.default_rng(41)
  s, y = rng.random(50), rng.integers(0, 2, 50)
  mask = (rng.random(50) > 0.2).astype(float)
  out = M.rates_with_ci(s, y, mask, 0.45, n_boot=300, seed=4)
  per_resample = [M.rates_at(s[r], y[r], mask[r], 0.45) for r in M.bootstrap_indices(50, 300, seed=4)]
  for name, (point, lo, hi) in out.items():
    assert point == M.rates_at(s, y, mask, 0.45)[name]
    values = np.array([v[name] for v in per_resample])
    np.testing.assert_allclose([lo, hi], np.percentile(values[np.isfinite(values)], [2.5, 97.5]), atol=1e-12)


# ----------------------------------------------------------------------------
# Bootstrap.


def test_bootstrap_contains_point_and_narrows_with_n():
  widths = []
  for n in (100, 1000, 5000):
    s, y = _data(n, seed=7, ties=False)
    point, lo, hi = M.bootstrap_ci(M.auroc, s, y, n_boot=500, seed=0)
    assert point == pytest.approx(M.auroc(s, y))
    assert lo <= point <= hi
    widths.append(hi - lo)
  assert widths[0] > widths[1] > widths[2]
  # sqrt(N) scaling, loosely: 50x more data -> several times narrower
  assert widths[0] / widths[2] > 3


def test_bootstrap_deterministic_by_seed():
  s, y = _data(300, seed=8)
  a = M.bootstrap_ci(M.auroc, s, y, n_boot=200, seed=5)
  b = M.bootstrap_ci(M.auroc, s, y, n_boot=200, seed=5)
  c = M.bootstrap_ci(M.auroc, s, y, n_boot=200, seed=6)
  assert a == b
  assert a[1:] != c[1:]


def test_bootstrap_vectorised_equals_naive_loop():
  s, y = _data(40, seed=9)
  mask = (np.arange(40) % 5 != 0).astype(float)
  idx = M.bootstrap_indices(40, n_boot=300, seed=3)
  assert idx.shape == (300, 40)
  naive = np.array([roc_auc_score(y[r][mask[r] > 0], s[r][mask[r] > 0])
                    if len(set(y[r][mask[r] > 0])) == 2 else np.nan for r in idx])
  naive = naive[np.isfinite(naive)]
  want = np.percentile(naive, [2.5, 97.5])
  point, lo, hi = M.bootstrap_ci(M.auroc, s, y, mask, n_boot=300, seed=3)
  assert point == pytest.approx(M.auroc(s, y, mask))
  np.testing.assert_allclose([lo, hi], want, atol=1e-12)
  loop = M.bootstrap_ci(M.auroc, s, y, mask, n_boot=300, seed=3, vectorized=False)
  np.testing.assert_allclose(loop, (point, lo, hi), atol=1e-12)


@pytest.mark.parametrize("metric", ["auprc", "brier", "slope", "macro"])
def test_bootstrap_other_vectorised_metrics_equal_loop(metric):
  rng = np.random.default_rng(10)
  if metric == "auprc":
    s, y = _data(60, seed=11)
    args, fn = (s, y), M.auprc
  elif metric in ("brier", "slope"):
    y = rng.integers(0, 2, 60)
    args = (rng.random(60), y, (rng.random(60) > 0.2).astype(float))
    fn = M.brier if metric == "brier" else M.calibration_slope
  else:
    y = rng.integers(0, 2, (60, 3))
    s = np.round(y + rng.normal(size=(60, 3)), 1)
    args, fn = (s, y, (rng.random((60, 3)) > 0.2).astype(float)), M.multilabel_macro_auroc
  vec = M.bootstrap_ci(fn, *args, n_boot=200, seed=1)
  loop = M.bootstrap_ci(fn, *args, n_boot=200, seed=1, vectorized=False)
  np.testing.assert_allclose(vec, loop, atol=1e-12)


def test_bootstrap_generic_metric_uses_loop():
  x = np.arange(50, dtype=float)
  point, lo, hi = M.bootstrap_ci(lambda a: float(np.mean(a)), x, n_boot=200, seed=0)
  assert point == pytest.approx(24.5)
  assert lo < 24.5 < hi


def test_bootstrap_fast():
  s, y = _data(1000, seed=12, ties=False)
  M.bootstrap_ci(M.auroc, s, y, n_boot=10)  # warm-up
  t0 = time.perf_counter()
  M.bootstrap_ci(M.auroc, s, y, n_boot=1000, seed=0)
  dt = time.perf_counter() - t0
  print(f"bootstrap 1000 x N=1000 AUROC: {dt * 1e3:.1f} ms")
  assert dt < 1.0  # typically ~40 ms; generous for a loaded 2-core machine


def test_bootstrap_bad_args():
  with pytest.raises(ValueError, match="leading dimension"):
    M.bootstrap_ci(M.auroc, np.zeros(5), np.zeros(6))
  with pytest.raises(ValueError, match="alpha"):
    M.bootstrap_ci(M.auroc, np.zeros(5), np.zeros(5), alpha=1.5)


# ----------------------------------------------------------------------------
# Seed summary.


def test_seed_summary_t_interval():
  v = [0.80, 0.82, 0.79, 0.85]
  out = M.seed_summary(v)
  mean, sem = np.mean(v), stats.sem(v)
  lo, hi = stats.t.interval(0.95, df=3, loc=mean, scale=sem)
  assert out["n"] == 4
  assert out["mean"] == pytest.approx(mean)
  assert out["std"] == pytest.approx(np.std(v, ddof=1))
  assert (out["ci95_lo"], out["ci95_hi"]) == pytest.approx((lo, hi))
  assert out["ci95"] == (out["ci95_lo"], out["ci95_hi"])


def test_seed_summary_single_and_nan():
  one = M.seed_summary([0.7, float("nan")])
  assert one["n"] == 1 and one["mean"] == 0.7
  assert math.isnan(one["std"]) and math.isnan(one["ci95_lo"])
  assert M.seed_summary([])["n"] == 0


# ----------------------------------------------------------------------------
# Linear probe.


def _separable(n, d=16, k=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) * rng.uniform(0.1, 100, d)  # wildly different feature scales
  w = rng.normal(size=(d, k)) / rng.uniform(0.1, 100, d)[:, None]
  y = (x @ w + 0.3 * rng.normal(size=(n, k)) > 0).astype(np.float32)
  return x, y


def test_probe_multilabel_beats_chance():
  x, y = _separable(500, seed=1)
  mask = (np.random.default_rng(2).random(y.shape) > 0.2).astype(np.float32)
  scores, info = linear_probe(x[:300], y[:300], mask[:300], x[300:], return_info=True)
  assert scores.shape == (200, 3)
  assert ((scores >= 0) & (scores <= 1)).all()
  per, macro = M.multilabel_auroc(scores, y[300:])
  assert macro > 0.9, per
  assert all(c in (1e-3, 1e-2, 1e-1, 1.0, 10.0) for c in info["C"])


def test_probe_binary_small_n_one_class_and_fixed_c():
  x, y = _separable(260, k=2, seed=3)
  s = linear_probe(x[:200], y[:200, 0], None, x[200:], task_kind="binary", C=1.0)
  assert s.shape == (60,)
  assert M.auroc(s, y[200:, 0]) > 0.85
  # Two positives: too few for 3-fold stratified CV -> default C; a one-class label -> its prevalence.
  ys = np.stack([np.array([0, 1, 0, 0, 1, 0, 0, 0]), np.ones(8)], axis=1)
  s2, info = linear_probe(x[:8], ys, None, x[200:], return_info=True)
  assert info["C"][0] == 0.1 and info["constant"] == [False, True]
  np.testing.assert_allclose(s2[:, 1], 1.0)


def test_probe_multiclass():
  rng = np.random.default_rng(4)
  centres = rng.normal(size=(4, 8)) * 3
  cls = rng.integers(0, 3, 400)  # class 3 never appears
  x = centres[cls] + rng.normal(size=(400, 8))
  p = linear_probe(x[:300], cls[:300], None, x[300:], task_kind="multiclass", n_classes=4)
  assert p.shape == (100, 4)
  np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
  assert np.all(p[:, 3] == 0)
  assert (p.argmax(1) == cls[300:]).mean() > 0.8


def test_probe_bad_inputs():
  with pytest.raises(ValueError, match="task_kind"):
    linear_probe(np.zeros((4, 2)), np.zeros(4), None, np.zeros((2, 2)), task_kind="regression")
  with pytest.raises(ValueError, match="D ="):
    linear_probe(np.zeros((4, 2)), np.zeros(4), None, np.zeros((2, 3)))
