"""Frozen-feature fine-tuning: linear heads, the report-seeing teacher, distillation."""

import numpy as np
import pytest

from radjax.eval.metrics import auroc
from radjax.methods.distill import (HeadConfig, crossfit_teacher_logits, fit_head, fit_teacher,
                                    teacher_logits)

CFG = HeadConfig(l2=(1e-2,), steps=100, seed=0)  # a fixed penalty: no cross-validation


def _data(n, d=8, k=2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  w = rng.normal(size=(d, k))
  y = (x @ w + 0.5 * rng.normal(size=(n, k)) > 0).astype(np.float32)
  return x, y


def test_lambda_zero_distillation_equals_linear_head():
  x, y = _data(64)
  teacher = np.random.default_rng(1).normal(size=y.shape).astype(np.float32) * 5
  plain = fit_head(x, y, config=CFG)
  distilled = fit_head(x, y, teacher_logits=teacher, lam=0.0, temperature=3.0, config=CFG)
  np.testing.assert_array_equal(plain.w, distilled.w)
  np.testing.assert_array_equal(plain.b, distilled.b)


def test_teacher_changes_student_when_lambda_positive():
  x, y = _data(64)
  teacher = -10 * (2 * y - 1)  # a teacher that contradicts the labels
  plain = fit_head(x, y, config=CFG)
  distilled = fit_head(x, y, teacher_logits=teacher, lam=0.9, temperature=1.0, config=CFG)
  assert auroc(distilled.logits(x)[:, 0], y[:, 0]) < auroc(plain.logits(x)[:, 0], y[:, 0])


def test_linear_head_learns_and_masks_labels():
  x, y = _data(400)
  head = fit_head(x[:300], y[:300], config=CFG)
  assert auroc(head.logits(x[300:])[:, 0], y[300:, 0]) > 0.85
  # Masking every label of column 1 leaves that column at its initialisation (zeros).
  mask = np.ones_like(y)
  mask[:, 1] = 0
  masked = fit_head(x[:300], y[:300], mask[:300], config=CFG)
  assert np.abs(masked.b[1]) < 1e-6 and np.abs(masked.w[:, 1]).max() < 1e-6


@pytest.mark.parametrize("n, d, l2", [(200, 8, 0.05), (30, 80, 0.05), (200, 8, None)])
def test_head_is_the_penalised_logistic_regression_optimum(n, d, l2):
  # (30, 80) takes the row-space path (2N <= D); l2=None is the default penalty, scikit-learn's C = 1.
  from sklearn.linear_model import LogisticRegression
  x, y = _data(n, d=d, k=2, seed=3)
  head = fit_head(x, y, l2=l2, config=HeadConfig(steps=200))
  xs = (x - head.mean) / head.std
  for k in range(2):
    # The head's loss is the mean over all N x K label entries; sklearn minimises, per label,
    # C * sum(loss) + |w|^2 / 2: the same optimum for C = 1 / (l2 N K).
    c = 1.0 if l2 is None else 1 / (l2 * n * 2)
    ref = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(xs, y[:, k])
    np.testing.assert_allclose(head.logits(x)[:, k], ref.decision_function(xs), atol=2e-3)


def test_cross_validation_picks_a_strong_penalty_for_noise_and_a_weak_one_for_signal():
  from radjax.methods.distill import choose_l2
  rng = np.random.default_rng(0)
  grid = HeadConfig(l2=(1e-3, 1e-2, 1e-1, 1.0), steps=60)
  noise = rng.normal(size=(120, 40)).astype(np.float32)
  coin = rng.integers(0, 2, size=(120, 1)).astype(np.float32)
  assert choose_l2(noise, coin, np.ones_like(coin), grid) == 1.0
  x, y = _data(400, d=4, k=1, seed=1)
  assert choose_l2(x, y, np.ones_like(y), grid) < 1.0
  assert fit_head(noise, coin, config=grid).l2 == 1.0


def test_teacher_with_privileged_features_beats_image_only():
  rng = np.random.default_rng(0)
  n = 300
  y = rng.integers(0, 2, size=(n, 1)).astype(np.float32)
  image = (y * 0.3 + rng.normal(size=(n, 4))).astype(np.float32)  # weak signal
  text = (y * 3.0 + rng.normal(size=(n, 3))).astype(np.float32)   # the report nearly states it
  teacher = fit_teacher(image[:200], text[:200], y[:200], config=CFG)
  student = fit_head(image[:200], y[:200], config=CFG)
  t_auc = auroc(teacher_logits(teacher, image[200:], text[200:])[:, 0], y[200:, 0])
  s_auc = auroc(student.logits(image[200:])[:, 0], y[200:, 0])
  assert t_auc > 0.95 and t_auc > s_auc


def test_crossfit_logits_are_out_of_fold():
  rng = np.random.default_rng(0)
  n = 60
  y = rng.integers(0, 2, size=(n, 1)).astype(np.float32)
  noise_text = rng.normal(size=(n, 200)).astype(np.float32)  # memorisable, uninformative
  image = rng.normal(size=(n, 2)).astype(np.float32)
  in_sample = crossfit_teacher_logits(image, noise_text, y, folds=1, config=CFG)
  out_of_fold = crossfit_teacher_logits(image, noise_text, y, folds=5, config=CFG)
  assert out_of_fold.shape == y.shape
  assert auroc(in_sample[:, 0], y[:, 0]) > 0.95  # memorised
  assert auroc(out_of_fold[:, 0], y[:, 0]) < 0.8  # honest


def test_bad_shapes_and_missing_teacher():
  x, y = _data(10)
  with pytest.raises(ValueError, match="feats"):
    fit_head(x[:, 0], y)
  with pytest.raises(ValueError, match="teacher_logits"):
    fit_head(x, y, lam=0.5)


def test_feature_constant_in_training_does_not_blow_up_at_test():
  # A report n-gram absent from every training example (a zero TF-IDF column) must not turn into
  # a huge standardised value on the test example that has it.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 3)).astype(np.float32)
  y = (x[:, :1] > 0).astype(np.float32)
  feats = np.concatenate([x, np.zeros((40, 1), np.float32)], axis=1)
  head = fit_head(feats, y, config=HeadConfig(steps=100))
  test = np.concatenate([x[:5], np.full((5, 1), 0.3, np.float32)], axis=1)
  np.testing.assert_allclose(head.logits(test), head.logits(feats[:5]), atol=0.5)


@pytest.mark.parametrize("h, w", [(4, 4), (7, 7), (3, 6), (1, 2)])
def test_spatial_pyramid_matches_numpy_quadrant_means(h, w):
  from radjax.eval.features import spatial_pyramid
  rng = np.random.default_rng(h * 10 + w)
  tokens = rng.normal(size=(2, h * w, 3)).astype(np.float32)
  grid = tokens.reshape(2, h, w, 3)
  rows = [slice(0, max(h // 2, 1)), slice(h // 2, h)]
  cols = [slice(0, max(w // 2, 1)), slice(w // 2, w)]
  expected = np.concatenate([tokens.mean(1)] + [grid[:, r, c].mean((1, 2)) for r in rows for c in cols], -1)
  np.testing.assert_allclose(np.asarray(spatial_pyramid(tokens, h / w)), expected, rtol=1e-5, atol=1e-6)


def test_spatial_pyramid_rejects_tokens_that_are_not_the_grid():
  from radjax.eval.features import spatial_pyramid
  with pytest.raises(ValueError, match="not a grid"):
    spatial_pyramid(np.zeros((1, 7, 2), np.float32), 1.0)


def test_encode_images_runs_batch_norm_encoders_on_their_running_averages():
  """A BatchNorm encoder's features are the deployed encoder's: a film's row does not depend on
  the films batched with it (with batch statistics it would), and the caller's encoder keeps its
  mode."""
  import jax
  from flax import nnx
  from radjax.eval.features import encode_images
  from radjax.models.resnet import ResNet, ResNetConfig
  encoder = ResNet(ResNetConfig("18", image_size=32, channels=1, norm="batch", width=8), rngs=nnx.Rngs(0))
  stats = nnx.state(encoder, nnx.BatchStat)
  draws = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(stats))))
  # Running averages away from their initial (0, 1), positive so that they serve as variances too.
  nnx.update(encoder, jax.tree.map(lambda v: jax.random.uniform(next(draws), v.shape, v.dtype, 0.5, 1.5), stats))
  images = np.random.default_rng(0).normal(1.0, 2.0, (4, 32, 32, 1)).astype(np.float32)

  def batches(size):
    return [{"image": images[i:i + size], "labels": np.zeros((size, 2), np.float32),
             "label_mask": np.ones((size, 2), np.float32), "index": np.arange(i, i + size)}
            for i in range(0, len(images), size)]
  together, alone = encode_images(encoder, batches(4))["feats"], encode_images(encoder, batches(1))["feats"]
  np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
  assert encoder.stem_norm.use_running_average is False
