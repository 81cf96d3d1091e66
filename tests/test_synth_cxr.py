"""SynthCXR: determinism, prevalences, what the report and the image carry, config errors."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys

import numpy as np
import pytest
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from radjax import defaults
from radjax.data import synth_cxr
from radjax.data.synth_cxr import (ALL_LABELS, DEFAULT_PREVALENCE, DIAGNOSTIC_LABELS, PROGNOSTIC_LABELS,
                                   SynthCXR)

_HASH_SNIPPET = """
import hashlib, sys
from radjax.data.synth_cxr import SynthCXR
seed, split, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = SynthCXR({"seed": seed, "image_size": size})
h = hashlib.sha256()
for i in (0, 1, 7, 123):
  ex = s.example(split, i)
  h.update(ex["image"].tobytes()); h.update(ex["report"].encode()); h.update(repr(sorted(ex["labels"].items())).encode())
print(h.hexdigest())
"""


def _hash(seed: int, split: str, size: int) -> str:
  s = SynthCXR({"seed": seed, "image_size": size})
  h = hashlib.sha256()
  for i in (0, 1, 7, 123):
    ex = s.example(split, i)
    h.update(ex["image"].tobytes())
    h.update(ex["report"].encode())
    h.update(repr(sorted(ex["labels"].items())).encode())
  return h.hexdigest()


def test_deterministic_across_processes_and_seeds():
  out = subprocess.run([sys.executable, "-c", _HASH_SNIPPET, "3", "train", "64"], capture_output=True,
                       text=True, check=True).stdout.strip()
  assert out == _hash(3, "train", 64)
  assert _hash(4, "train", 64) != out
  assert _hash(3, "test", 64) != out
  # Random access: order of access does not matter.
  s = SynthCXR({"image_size": 48})
  late = s.example("train", 5)
  for i in range(5):
    s.example("train", i)
  again = s.example("train", 5)
  assert np.array_equal(late["image"], again["image"]) and late["report"] == again["report"]


def test_example_contract_and_splits():
  s = SynthCXR({"image_size": 40, "n_train": 10})
  ex = s.example("train", 3)
  assert ex["image"].shape == (40, 40) and ex["image"].dtype == np.uint8
  assert isinstance(ex["report"], str) and "FINDINGS:" in ex["report"] and "IMPRESSION:" in ex["report"]
  assert set(ex["labels"]) == set(ALL_LABELS)
  assert all(v in (0.0, 1.0) for v in ex["labels"].values())
  assert ex["id"] == "synth-train-0000003"
  assert 20 < ex["image"].mean() < 230 and ex["image"].std() > 10  # a film, not a blank
  assert synth_cxr.label_names("diagnostic") == DIAGNOSTIC_LABELS
  assert synth_cxr.label_names("prognostic") == PROGNOSTIC_LABELS
  with pytest.raises(IndexError):
    s.example("train", 10)
  with pytest.raises(ValueError, match="split"):
    s.example("dev", 0)
  # Splits hold different patients: ids and latents differ at the same index.
  ids = {s.example(sp, 0)["id"] for sp in synth_cxr.SPLITS}
  assert len(ids) == 4
  lat = [tuple(s.case(sp, 0).latents.values()) for sp in synth_cxr.SPLITS]
  assert len(set(lat)) == 4
  # The largest size renders too.
  assert SynthCXR({"image_size": 512}).image("train", 0).shape == (512, 512)


def test_prevalences_match_config():
  n = 2000
  s = SynthCXR({"image_size": 32, "n_train": n, "prevalence": {"nodule": 0.4, "mortality_12m": 0.3}})
  y = s.labels_array("train")
  want = dict(DEFAULT_PREVALENCE, nodule=0.4, mortality_12m=0.3)
  for k, name in enumerate(ALL_LABELS):
    p = want[name]
    tol = 4 * np.sqrt(p * (1 - p) / n) + 0.005
    assert abs(y[:, k].mean() - p) < tol, (name, y[:, k].mean(), p)
  # Findings are correlated through the shared latents (cardiac: cardiomegaly, effusion, edema).
  c = np.corrcoef(y.T)
  i, j = ALL_LABELS.index("cardiomegaly"), ALL_LABELS.index("edema")
  assert c[i, j] > 0.15


def _text_aurocs(cfg: dict, n: int = 1600) -> dict[str, float]:
  s = SynthCXR(dict(cfg, image_size=32, n_train=n))
  reports = [s.report("train", i) for i in range(n)]
  y = s.labels_array("train")
  x = CountVectorizer(ngram_range=(1, 2), min_df=2).fit_transform(reports)
  h = n // 2
  out = {}
  for k, name in enumerate(ALL_LABELS):
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(x[:h], y[:h, k])
    out[name] = roc_auc_score(y[h:, k], clf.predict_proba(x[h:])[:, 1])
  return out


def test_report_states_findings_and_prognostic_signal_follows_knob():
  prog = []
  for a in (0.0, 0.5, 1.0):
    auc = _text_aurocs({"text_label_association": a})
    if a == 0.0:
      for name in DIAGNOSTIC_LABELS:
        assert auc[name] > 0.9, (name, auc[name])
    prog.append(np.mean([auc[p] for p in PROGNOSTIC_LABELS]))
  assert prog[0] < 0.6, prog
  assert prog[0] < prog[1] < prog[2], prog
  assert prog[2] > 0.75, prog


def test_text_leak_makes_the_report_overly_predictive():
  auc = _text_aurocs({"text_label_association": 0.0, "text_leak": 1.0}, n=1000)
  for p in PROGNOSTIC_LABELS:
    assert auc[p] > 0.9, (p, auc[p])


def test_image_probe_predicts_prognosis_above_chance():
  n, size = 1500, 32
  s = SynthCXR({"image_size": size, "n_train": n})
  ims = np.stack([s.image("train", i) for i in range(n)]).astype(np.float32) / 255
  y = s.labels_array("train", PROGNOSTIC_LABELS)
  f = size // 8
  feat = ims.reshape(n, 8, f, 8, f).mean((2, 4)).reshape(n, -1)  # 8x8 block means
  h = 1000
  for k, name in enumerate(PROGNOSTIC_LABELS):
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000)).fit(feat[:h], y[:h, k])
    auc = roc_auc_score(y[h:, k], clf.predict_proba(feat[h:])[:, 1])
    assert auc > 0.6, (name, auc)


def test_reports_never_mention_unreported_features_or_age():
  s = SynthCXR({"n_train": 300, "text_label_association": 1.0, "text_leak": 0.5})
  text = " ".join(s.report("train", i) for i in range(300)).lower()
  for word in ("calcif", "osteopen", "bone density", "obes", "habitus", "aged"):
    assert word not in text, word
  assert not re.search(r"\d+[- ]year", text)  # ages are de-identified ("___-year-old")


def test_report_image_evidence_remarks_on_prognostic_film_features_only():
  """The knob adds remarks on calcification, osteopenia and habitus, read from the latents the
  renderer draws, and changes nothing else: films, labels and the rest of every report."""
  n = 400
  plain = SynthCXR({"n_train": n, "image_size": 32})
  told = SynthCXR({"n_train": n, "image_size": 32, "report_image_evidence": 1.0})
  mentioned = {"calcif": [], "osteopen": [], "habitus": []}
  for i in range(n):
    assert told.labels("train", i) == plain.labels("train", i)
    case = told.case("train", i)
    report, before = told.report("train", i), plain.report("train", i)
    assert report.split("FINDINGS:")[0] == before.split("FINDINGS:")[0]
    assert report.split("IMPRESSION:")[1] == before.split("IMPRESSION:")[1] or any(case.evidence.values())
    text = report.lower()
    for word in mentioned:
      mentioned[word].append(word in text)
    assert ("calcif" in text) == (case.latents["calc"] > 1.0)
    assert ("osteopen" in text or "demineral" in text) == (case.latents["bone"] < -1.0)
    assert ("habitus" in text) == (abs(case.latents["habitus"]) > 1.0)
  assert all(np.array_equal(told.image("train", i), plain.image("train", i)) for i in range(5))
  for word, hits in mentioned.items():
    assert 0.05 < np.mean(hits) < 0.4, (word, np.mean(hits))  # notable: about one film in six
  half = SynthCXR({"n_train": n, "image_size": 32, "report_image_evidence": 0.5})
  rate = np.mean([any(half.case("train", i).evidence.values()) for i in range(n)])
  full_rate = np.mean([any(told.case("train", i).evidence.values()) for i in range(n)])
  assert 0.3 * full_rate < rate < 0.7 * full_rate, (rate, full_rate)


def test_render_224():
  """Films render at the benchmark size too (their speed is `radjax bench data`'s to measure:
  a timed test here failed on a CPU that slowed down)."""
  s = SynthCXR({"image_size": 224})
  images = [s.example("train", i)["image"] for i in range(4)]
  for img in images:
    assert img.shape == (224, 224) and img.dtype == np.uint8
    assert 10 < img.mean() < 245 and img.std() > 10  # a film, not a blank or saturated frame
  assert not np.array_equal(images[0], images[1])
  np.testing.assert_array_equal(images[0], s.example("train", 0)["image"])  # seeded


@pytest.mark.parametrize("override, key", [
    ({"prevalence": {"nodule": -0.1}}, "synth.prevalence.nodule"),
    ({"prevalence": {"fracture": 0.1}}, "synth.prevalence.fracture"),
    ({"image_size": 16}, "synth.image_size"),
    ({"image_size": 1024}, "synth.image_size"),
    ({"text_label_association": 1.5}, "synth.text_label_association"),
    ({"report_error_rate": -0.1}, "synth.report_error_rate"),
    ({"n_train": -1}, "synth.n_train"),
])
def test_bad_config_names_the_key(override, key):
  cfg = defaults.synth_cxr_config().to_dict()
  cfg.update(override)
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    SynthCXR(cfg)


def test_config_dict_from_defaults_is_accepted():
  cfg = defaults.synth_cxr_config()
  cfg.prevalence.nodule = 0.2
  s = SynthCXR(cfg)
  assert s.params.prevalences()["nodule"] == 0.2
  assert s.num_examples("pretrain") == cfg.n_pretrain
