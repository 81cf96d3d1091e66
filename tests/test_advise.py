"""`radjax advise`: the decision rule, and its recommendation on SynthCXR settings whose answer is known."""

import numpy as np
import pytest
from scipy import stats

from radjax import defaults
from radjax.eval.advise import advise, recommend, within_class_correlation


def test_rule_weak_text_recommends_alignment_plus_ssl_without_distillation():
  a = recommend("mortality", text_auroc=0.55, image_auroc=0.70, both_auroc=0.70, text_image_r=0.0)
  assert a.pretrain == "clip_ssl" and not a.distill and "0.550" in a.reason


def test_rule_overly_predictive_text_means_no_distillation():
  a = recommend("mortality", text_auroc=0.99, image_auroc=0.70, both_auroc=0.99, text_image_r=0.5)
  assert a.pretrain == "clip" and not a.distill


def test_rule_informative_text_recommends_distillation():
  a = recommend("edema", text_auroc=0.90, image_auroc=0.70, both_auroc=0.88, text_image_r=0.4)
  assert a.pretrain == "clip" and a.distill and "r = 0.40" in a.reason


def test_rule_informative_text_the_film_cannot_show_means_no_distillation():
  a = recommend("mortality", text_auroc=0.92, image_auroc=0.77, both_auroc=0.93, text_image_r=0.05)
  assert a.pretrain == "clip" and not a.distill and "r = 0.05" in a.reason


def test_within_class_correlation_matches_scipy_per_class():
  rng = np.random.default_rng(0)
  y = (rng.random(300) < 0.3).astype(float)
  a = rng.normal(size=300)
  b = 0.5 * a + rng.normal(size=300) + 3 * y  # the class offset must not count
  mask = rng.random(300) < 0.9
  expected = sum((mask & (y == c)).sum() * stats.pearsonr(a[mask & (y == c)], b[mask & (y == c)])[0]
                 for c in (0, 1)) / mask.sum()
  assert within_class_correlation(a, b, y, mask) == pytest.approx(expected, abs=1e-12)


def test_within_class_correlation_ignores_what_only_separates_the_classes():
  rng = np.random.default_rng(1)
  y = (rng.random(2000) < 0.5).astype(float)
  a, b = rng.normal(size=2000) + 4 * y, rng.normal(size=2000) + 4 * y
  assert np.corrcoef(a, b)[0, 1] > 0.7  # overall, the class offset correlates them
  assert abs(within_class_correlation(a, b, y)) < 0.06
  # A constant score within a class (a report that states the outcome) has no ranking to share.
  assert within_class_correlation(y, b, y) == 0.0


def _data(**knobs):
  data = defaults.data_config()
  data.synth.update(dict(n_train=400, n_validation=300, image_size=32, **knobs))
  data.image_size = 32
  return data


def test_no_advice_without_both_classes():
  data = _data()
  data.synth.prevalence = {"pneumothorax": 0.0}
  pneumothorax, cardiomegaly = advise(data, ["pneumothorax", "cardiomegaly"], max_examples=100)
  assert pneumothorax.pretrain == "undecided" and not pneumothorax.distill
  assert "the train split has 0 positive and 100 negative examples" in pneumothorax.reason
  assert np.isnan(pneumothorax.text_auroc) and cardiomegaly.text_auroc > 0.8, cardiomegaly


def test_advice_on_synth_cxr_follows_the_generating_model():
  # No text association, no leak: the report carries (almost) nothing about mortality.
  [weak] = advise(_data(text_label_association=0.0, text_leak=0.0), ["mortality_12m"])
  assert weak.pretrain == "clip_ssl" and not weak.distill, weak
  # A leaking report: the text probe must see it, and see that the film cannot show what it knows.
  [leak] = advise(_data(text_label_association=0.0, text_leak=1.0), ["mortality_12m"])
  assert leak.text_auroc > weak.text_auroc + 0.2 and leak.pretrain == "clip", leak
  assert leak.text_image_r < 0.1 and not leak.distill, leak
  # History phrases that follow the image-visible risk: within each class the scores agree.
  [phrases] = advise(_data(text_label_association=1.0, text_leak=0.0), ["mortality_12m"])
  assert phrases.text_image_r > 0.2 and phrases.both_auroc > phrases.image_auroc + 0.1, phrases
