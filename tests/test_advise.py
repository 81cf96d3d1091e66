"""`radjax advise`: the decision rule, and its recommendation on SynthCXR settings whose answer is known."""

import pytest

from radjax import defaults
from radjax.eval.advise import advise, recommend


def test_rule_weak_text_recommends_alignment_plus_ssl_without_distillation():
  a = recommend("mortality", text_auroc=0.55, image_auroc=0.70, both_auroc=0.70)
  assert a.pretrain == "clip_ssl" and not a.distill and "0.550" in a.reason


def test_rule_overly_predictive_text_means_no_distillation():
  a = recommend("mortality", text_auroc=0.99, image_auroc=0.70, both_auroc=0.99)
  assert a.pretrain == "clip" and not a.distill


def test_rule_informative_text_recommends_distillation():
  a = recommend("edema", text_auroc=0.90, image_auroc=0.70, both_auroc=0.88)
  assert a.pretrain == "clip" and a.distill


def _data(**knobs):
  data = defaults.data_config()
  data.synth.update(dict(n_train=400, n_validation=300, image_size=32, **knobs))
  data.image_size = 32
  return data


def test_advice_on_synth_cxr_follows_the_generating_model():
  # No text association, no leak: the report carries (almost) nothing about mortality.
  [weak] = advise(_data(text_label_association=0.0, text_leak=0.0), ["mortality_12m"])
  assert weak.pretrain == "clip_ssl" and not weak.distill, weak
  # A leaking report: the text probe must see it.
  [leak] = advise(_data(text_label_association=0.0, text_leak=1.0), ["mortality_12m"])
  assert leak.text_auroc > weak.text_auroc + 0.2 and leak.pretrain == "clip", leak
