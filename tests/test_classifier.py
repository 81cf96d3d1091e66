"""`radjax evaluate` and `radjax predict`: a fine-tuned classifier used on images alone."""

import csv
import io
import json
import math
import os
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from sklearn.metrics import confusion_matrix, roc_auc_score

from fixtures_real import write_dicom
from radjax import cli, methods
from radjax.config import load_config
from radjax.data import synth_cxr
from radjax.data.pipeline import image_norm, label_names
from radjax.data.sources import get_source
from radjax.eval import classifier, evaluation, metrics
from radjax.train import loop
from radjax.train.checkpoint import load_pretrained

TINY = [
    "--config.train.batch_size=8", "--config.train.progress=False", "--config.train.steps=4",
    "--config.train.eval_every=2", "--config.train.eval_batches=1", "--config.train.checkpoint_every=2",
    "--config.data.synth.n_pretrain=8", "--config.data.synth.n_train=32", "--config.data.synth.n_validation=8",
    "--config.data.synth.n_test=40", "--config.data.synth.image_size=32", "--config.data.image_size=32",
    "--config.data.max_text_len=16", "--config.data.vocab_size=300", "--config.model.image.width=32",
    "--config.model.image.depth=1", "--config.model.image.num_heads=2", "--config.model.image.mlp_dim=64",
    "--config.optim.lr=3e-3",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("classifier") / "ft")
  loop.train(load_config("configs/finetune_synth.py", TINY), workdir)
  return workdir


def _reference_probabilities(workdir, step, indices, transform=lambda film: film):
  """The best checkpoint's probabilities on test films (each through ``transform``), preprocessed
  by hand (32 px films at 32 px: no resize, so normalising is all there is)."""
  model, config = load_pretrained(workdir, step=step, best=True)
  source = get_source(config.data, "test")
  mean, std = image_norm(config.data)
  films = np.stack([transform(np.asarray(source[i]["image"], np.float32).reshape(32, 32, 1)) for i in indices])
  logits = np.asarray(model((films / 255 - mean) / std))
  labels = np.asarray([[source[i]["labels"][n] for n in label_names(config.data)] for i in indices])
  return 1 / (1 + np.exp(-logits)), labels, source


def _scores(csv_path):
  """A predict CSV -> {path: probabilities float [K]} (rows with an error are left out)."""
  rows = list(csv.DictReader(open(csv_path)))
  return {r["path"]: np.array([float(v) for k, v in r.items() if k not in ("path", "error")])
          for r in rows if not r["error"]}


def _same_scores(a, b, atol=2e-6):
  """The same files scored alike: the two programs (radjax's CPU paths, the exported portable one)
  and batch shapes may round differently in the last bits."""
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_allclose(a[path], b[path], atol=atol)


def _best_step(workdir):
  return max(int(n) for n in os.listdir(os.path.join(workdir, "best")) if n.isdigit())


def test_evaluate_matches_an_independent_computation(run, tmp_path, capsys):
  out = tmp_path / "eval.json"
  assert cli.main(["evaluate", "--workdir", run, "--n_boot", "200", "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  step = _best_step(run)
  assert result["checkpoint"] == f"best checkpoint, step {step}" and result["examples"] == 40
  assert result["workdir"] == os.path.abspath(run)
  probs, labels, _ = _reference_probabilities(run, step, range(40))
  names = list(result["labels"])
  assert len(names) == probs.shape[1]
  aurocs = []
  for k, name in enumerate(names):
    r = result["labels"][name]
    assert (r["positives"], r["negatives"]) == (int(labels[:, k].sum()), int((1 - labels[:, k]).sum()))
    if 0 < labels[:, k].sum() < 40:
      expected = roc_auc_score(labels[:, k], probs[:, k])
      assert r["auroc"] == pytest.approx(expected, abs=2e-6)
      assert r["auroc_lo"] <= r["auroc"] <= r["auroc_hi"]
      aurocs.append(expected)
    else:
      assert r["auroc"] is None
  assert result["macro_auroc"]["auroc"] == pytest.approx(np.mean(aurocs), abs=2e-6)
  assert "macro" in capsys.readouterr().out


def test_predict_scores_image_files_as_evaluation_does(run, tmp_path, capsys):
  step = _best_step(run)
  probs, _, source = _reference_probabilities(run, step, [0, 1, 2])
  folder = tmp_path / "films"
  (folder / "nested").mkdir(parents=True)
  for i in range(3):
    Image.fromarray(np.asarray(source[i]["image"]).reshape(32, 32)).save(
        folder / ("nested" if i == 2 else "") / f"film{i}.png")
  (folder / "film9.jpg").write_bytes(b"not a jpeg")
  (folder / "notes.txt").write_text("ignored: not an image suffix")
  # Film 3 as a radiograph's DICOM export: 12-bit detector values, stretched back to 8 bits.
  film3 = np.asarray(source[3]["image"], np.float64).reshape(32, 32)
  write_dicom(folder / "IM0003", (film3 * 9 + 700).astype(np.uint16), "MONOCHROME2")
  out = tmp_path / "scores.csv"
  assert cli.main(["predict", "--workdir", run, "--out", str(out), str(folder)]) == 1  # one unreadable
  rows = list(csv.DictReader(out.open()))
  assert [os.path.basename(r["path"]) for r in rows] == ["IM0003", "film0.png", "film1.png", "film9.jpg",
                                                         "film2.png"]
  names = [c for c in rows[0] if c not in ("path", "error")]
  by_name = {os.path.basename(r["path"]): r for r in rows}
  for i in range(3):
    row = by_name[f"film{i}.png"]
    np.testing.assert_allclose([float(row[n]) for n in names], probs[i], atol=2e-6)
    assert row["error"] == ""
  stretch = lambda f: np.floor((f - f.min()) * 255 / (f.max() - f.min()))
  [stretched] = _reference_probabilities(run, step, [3], stretch)[0]
  np.testing.assert_allclose([float(by_name["IM0003"][n]) for n in names], stretched, atol=2e-6)
  assert "unreadable image" in by_name["film9.jpg"]["error"] and by_name["film9.jpg"][names[0]] == ""
  assert "1 file(s) could not be read" in capsys.readouterr().err
  assert "Doe" not in out.read_text() and "MRN" not in out.read_text()  # the DICOM's patient stays out
  # Files are read by a pool of threads, a batch ahead: rows keep the files' order, errors stay on
  # their file, and the scores are those one reader gives (batches of 2: a broken file mid-batch).
  deployed, paths = classifier.open_classifier(run), [r["path"] for r in rows]
  texts = []
  for readers in (1, 3):
    text = io.StringIO()
    assert classifier.write_predictions(deployed, paths, text, batch_size=2, readers=readers) == (4, 1)
    texts.append(text.getvalue())
  assert texts[0] == texts[1]
  assert [r["path"] for r in csv.DictReader(io.StringIO(texts[1]))] == paths


def test_read_image_stretches_16_bit_films(tmp_path):
  ramp = np.linspace(1000, 5000, 64 * 64).reshape(64, 64).astype(np.uint16)
  Image.fromarray(ramp).save(tmp_path / "film16.png")
  x = classifier.ImageReader("synth_cxr", None)(str(tmp_path / "film16.png"))
  assert x.dtype == np.uint8 and x.shape == (64, 64)
  assert (x.min(), x.max()) == (0, 255) and (np.diff(x.ravel().astype(int)) >= 0).all()


def test_refusals_name_the_reason(run, tmp_path, capsys, monkeypatch):
  assert cli.main(["predict", "--workdir", run, str(tmp_path / "film.png")]) == 2
  assert "film.png: no such file or folder" in capsys.readouterr().err
  write_dicom(tmp_path / "dicoms" / "x.dcm", np.zeros((32, 32), np.uint16))
  with monkeypatch.context() as m:
    m.setitem(sys.modules, "pydicom", None)  # not installed: said once, before any work
    assert cli.main(["predict", "--workdir", run, str(tmp_path / "dicoms")]) == 2
  assert "reading DICOM needs pydicom" in capsys.readouterr().err
  Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "film.png")
  assert cli.main(["predict", "--workdir", str(tmp_path / "nothing"), str(tmp_path / "film.png")]) == 2
  assert f"no checkpoint in {tmp_path / 'nothing' / 'checkpoints'}" in capsys.readouterr().err
  assert cli.main(["evaluate", "--workdir", run, "--config.data.image_size=64"]) == 2
  assert "data.image_size" in capsys.readouterr().err
  # Another dataset's films are normalised otherwise than the SynthCXR films the model learnt from.
  assert cli.main(["evaluate", "--workdir", run, "--config.data.dataset=mimic_cxr"]) == 2
  assert "the model was trained on synth_cxr, whose images are normalised" in capsys.readouterr().err
  pre = str(tmp_path / "clip")
  loop.train(load_config("configs/clip_synth.py", TINY[:3] + [
      "--config.train.steps=1", "--config.data.synth.n_pretrain=8", "--config.data.synth.image_size=32",
      "--config.data.image_size=32", "--config.data.max_text_len=16", "--config.data.vocab_size=300",
      "--config.model.image.width=32", "--config.model.image.depth=1", "--config.model.image.num_heads=2",
      "--config.model.image.mlp_dim=64", "--config.model.text.hidden_size=32", "--config.model.text.num_layers=1",
      "--config.model.text.num_heads=2", "--config.model.text.intermediate_size=64",
      "--config.model.embed_dim=32"]), pre)
  assert cli.main(["evaluate", "--workdir", pre]) == 2
  assert "'clip' run, which has no classifier head: fine-tune it first" in capsys.readouterr().err


# ----------------------------------------------------------------------------- export


def test_exported_file_evaluates_and_predicts_as_the_run_does(run, tmp_path, capsys):
  model_file = tmp_path / "ft.radjax"
  assert cli.main(["export", "--workdir", run, "--out", str(model_file)]) == 0
  step = _best_step(run)
  assert f"best checkpoint, step {step}; runs on cpu, cuda" in capsys.readouterr().out
  # With JAX and NumPy alone (no radjax, no model code): the file's function on its weights.
  import io
  import zipfile
  import jax
  probs, _, source = _reference_probabilities(run, step, range(5))
  with zipfile.ZipFile(model_file) as zf:
    meta = json.loads(zf.read("deployment.json"))
    function = jax.export.deserialize(bytearray(zf.read("probabilities.jax_exported")))
    weights = [np.load(io.BytesIO(zf.read(n))) for n in sorted(zf.namelist()) if n.startswith("weights/")]
    everything = b"".join(zf.read(n) for n in zf.namelist())
  assert meta["labels"] == list(label_names(load_config("configs/finetune_synth.py").data))
  assert meta["inputs"]["shape"] == ["batch", 32, 32, 1]
  films = np.stack([np.asarray(source[i]["image"], np.float32).reshape(32, 32, 1) for i in range(5)])
  films = (films / 255 - meta["inputs"]["mean"]) / meta["inputs"]["std"]
  for batch in (1, 5):  # the batch dimension is symbolic
    np.testing.assert_allclose(function.call(weights, films[:batch]), probs[:batch], atol=2e-6)
  for i in range(5):  # the reports the run never needed are not in the file either
    assert str(source[i]["report"]).encode() not in everything
  # evaluate and predict read the file as they read the run.
  for flag, where in (("--workdir", run), ("--model", str(model_file))):
    assert cli.main(["evaluate", flag, where, "--n_boot", "50", "--out", str(tmp_path / f"{flag}.json")]) == 0
  by_run, by_file = (json.loads((tmp_path / f"{f}.json").read_text()) for f in ("--workdir", "--model"))
  assert by_file["model_file"] == str(model_file) and by_file["workdir"] is None
  assert by_file["checkpoint"] == f"exported from the best checkpoint, step {step}"
  assert by_file["labels"].keys() == by_run["labels"].keys()
  for name, r in by_run["labels"].items():  # AUROCs from scores equal to 2e-6
    for key, value in r.items():
      assert by_file["labels"][name][key] == (value if value is None else pytest.approx(value, abs=1e-4)), key
  Image.fromarray(np.asarray(source[0]["image"]).reshape(32, 32)).save(tmp_path / "film0.png")
  for flag, where in (("--workdir", run), ("--model", str(model_file))):
    assert cli.main(["predict", flag, where, "--out", str(tmp_path / f"{flag}.csv"), str(tmp_path / "film0.png")]) == 0
  _same_scores(_scores(tmp_path / "--model.csv"), _scores(tmp_path / "--workdir.csv"))
  assert cli.main(["predict", "--model", str(model_file), "--checkpoint", "latest", str(tmp_path / "film0.png")]) == 2
  assert "an exported file holds one" in capsys.readouterr().err
  (tmp_path / "not_a_model.radjax").write_bytes(b"PK not a zip")
  assert cli.main(["predict", "--model", str(tmp_path / "not_a_model.radjax"), str(tmp_path / "film0.png")]) == 2
  assert "not a classifier `radjax export` wrote" in capsys.readouterr().err


def test_predict_scores_each_image_alone_with_batch_norm(tmp_path):
  """A BatchNorm classifier as trained, loaded and exported: predict's probabilities for a film do
  not depend on the batch it lands in (inference mode: the running averages), and training's
  validation step scores that same model."""
  workdir = str(tmp_path / "rn")
  vit_knobs = [f for f in TINY if f.startswith("--config.model.image.")]
  loop.train(load_config("configs/finetune_synth.py", [f for f in TINY if f not in vit_knobs] + [
      "--config.train.steps=2", "--config.model.image.name=resnet", "--config.model.image.variant=18",
      "--config.model.image.norm=batch", "--config.model.image.width=8"]), workdir)
  source = get_source(load_config("configs/finetune_synth.py", TINY).data, "test")
  for i in range(3):
    Image.fromarray(np.asarray(source[i]["image"]).reshape(32, 32)).save(tmp_path / f"film{i}.png")
  films = [str(tmp_path / f"film{i}.png") for i in range(3)]
  # The exported program too: it carries the running averages and runs in inference mode.
  assert cli.main(["export", "--workdir", workdir, "--out", str(tmp_path / "rn.radjax")]) == 0
  for batch in (1, 3):
    for flag, where in (("--workdir", workdir), ("--model", str(tmp_path / "rn.radjax"))):
      assert cli.main(["predict", flag, where, "--batch", str(batch), "--out", str(tmp_path / f"{flag}{batch}.csv"),
                       *films]) == 0
  alone = _scores(tmp_path / "--workdir1.csv")
  assert len(alone) == 3
  for flag, batch in (("--workdir", 3), ("--model", 1), ("--model", 3)):
    _same_scores(_scores(tmp_path / f"{flag}{batch}.csv"), alone)
  # Training's validation step, handed the model in the mode training leaves it in, scores the
  # deployed model: its BCE is NumPy's over predict's probabilities, for the three films together
  # as for the first alone.
  model, config, _ = classifier.load_classifier(workdir)
  model.train()
  mean, std = image_norm(config.data)
  images = np.stack([np.asarray(Image.open(f), np.float32)[..., None] / 255 for f in films])
  labels = np.asarray([[source[i]["labels"][n] for n in label_names(config.data)] for i in range(3)], np.float32)
  probabilities = np.stack([alone[f] for f in films])
  eval_step = loop.make_eval_step(methods.get_method("supervised"), nnx.graphdef(model))
  for n in (1, 3):
    batch = {"image": (images[:n] - mean) / std, "labels": labels[:n], "label_mask": np.ones_like(labels[:n])}
    bce = eval_step(nnx.state(model, nnx.Param), nnx.state(model, nnx.Not(nnx.Param)), batch,
                    jax.random.key_data(jax.random.key(0)), 0)["bce"]
    p, y = probabilities[:n], labels[:n]
    np.testing.assert_allclose(bce, -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)), rtol=1e-5)
  # In that mode (where calls also move the running averages) a film's scores depend on its batch.
  assert np.abs(np.asarray(model(images[:1]))[0] - np.asarray(model(images))[0]).max() > 1e-4


# ----------------------------------------------------------------------------- operating points


def _sensitivity_rule_by_hand(p, y, target):
  """The highest threshold that finds ``target`` of the positives: the score of the
  ceil(target * positives)-th highest-scoring positive."""
  positives = np.sort(p[y == 1])[::-1]
  return positives[math.ceil(target * len(positives)) - 1]


def test_operating_point_chosen_on_validation_decides_on_test(run, tmp_path, capsys):
  out = tmp_path / "eval.json"
  # Scoring other data (here other SynthCXR films: another seed, a shorter test split) does not move
  # the thresholds: they are chosen on the validation split of the data the model trained on.
  other = [("data.synth.seed", "5"), ("data.synth.n_test", "24")]
  assert cli.main(["evaluate", "--workdir", run, "--n_boot", "100", "--out", str(out),
                   "--operating_point", "sensitivity=0.75", *[f"--config.{k}={v}" for k, v in other]]) == 0
  assert "decisions at sensitivity=0.75 (chosen on synth_cxr/validation)" in capsys.readouterr().out
  result = json.loads(out.read_text())
  assert result["operating_point"] == {"rule": "sensitivity=0.75", "chosen_on": "synth_cxr/validation",
                                       "examples": 8}
  trained, deployed = classifier.open_classifier(run), classifier.open_classifier(run, overrides=other)
  val_p, val_y, val_m, _ = evaluation.score_split(trained.probabilities, trained.data, "validation")
  test_p, test_y, test_m, _ = evaluation.score_split(deployed.probabilities, deployed.data, "test")
  assert result["examples"] == len(test_p) == 24
  chosen_on_other = evaluation.choose_operating_point(deployed.probabilities, deployed.data, "sensitivity=0.75")
  thresholds = {}
  for k, name in enumerate(label_names(deployed.data)):
    r, seen, held = result["labels"][name], val_m[:, k] > 0, test_m[:, k] > 0
    # Calibration, by hand.
    assert r["brier"] == pytest.approx(np.mean((test_p[held, k] - test_y[held, k]) ** 2), abs=1e-6)
    assert r["mean_probability"] == pytest.approx(test_p[held, k].mean(), abs=1e-6)
    assert r["prevalence"] == pytest.approx(test_y[held, k].mean(), abs=1e-6)
    for key, fn in (("calibration_slope", metrics.calibration_slope),
                    ("calibration_in_the_large", metrics.calibration_in_the_large)):
      value = fn(test_p[held, k], test_y[held, k])  # checked against scikit-learn and scipy there
      assert r[key] == (None if math.isnan(value) else pytest.approx(value, abs=1e-6)), (name, key)
    if not (val_y[seen, k] == 1).any():  # no positive to find: no threshold, no decision
      assert "threshold" not in r
      continue
    thresholds[name] = r["threshold"]
    assert r["threshold"] == _sensitivity_rule_by_hand(val_p[seen, k], val_y[seen, k], 0.75)
    assert np.mean(val_p[seen, k][val_y[seen, k] == 1] >= r["threshold"]) >= 0.75
    (tn, fp), (fn, tp) = confusion_matrix(test_y[held, k], test_p[held, k] >= r["threshold"], labels=[0, 1])
    for rate, num, den in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                           ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
      assert r[rate] == (None if den == 0 else pytest.approx(num / den, abs=1e-6)), (name, rate)
      if r[rate] is not None and r[f"{rate}_lo"] is not None:
        assert r[f"{rate}_lo"] <= r[rate] <= r[f"{rate}_hi"]
  assert 2 <= len(thresholds) < len(result["labels"])  # both cases are exercised
  assert any(chosen_on_other["thresholds"][n] != t for n, t in thresholds.items())  # the override mattered

  # Exported with the same rule, the file carries the same thresholds and decides with them.
  model_file = tmp_path / "ft.radjax"
  assert cli.main(["export", "--workdir", run, "--out", str(model_file), "--operating_point", "sensitivity=0.75"]) == 0
  assert "decision thresholds at sensitivity=0.75 (chosen on synth_cxr/validation), 8 examples" in capsys.readouterr().out
  import zipfile
  with zipfile.ZipFile(model_file) as zf:
    meta = json.loads(zf.read("deployment.json"))
  assert {n: t for n, t in meta["operating_point"]["thresholds"].items() if t is not None} == thresholds
  _, _, source = _reference_probabilities(run, _best_step(run), range(6))
  for i in range(6):
    Image.fromarray(np.asarray(source[i]["image"]).reshape(32, 32)).save(tmp_path / f"film{i}.png")
  scores = tmp_path / "scores.csv"
  assert cli.main(["predict", "--model", str(model_file), "--out", str(scores),
                   *[str(tmp_path / f"film{i}.png") for i in range(6)]]) == 0
  rows = list(csv.DictReader(scores.open()))
  compared = 0
  for row in rows:
    for name in result["labels"]:
      if name not in thresholds:
        assert row[f"{name}_positive"] == ""
      elif abs(float(row[name]) - thresholds[name]) > 1e-6:  # clear of the printed value's rounding
        assert row[f"{name}_positive"] == str(int(float(row[name]) >= thresholds[name]))
        compared += 1
  assert compared >= 6
  # The file's thresholds are the ones validated: another rule means another export.
  assert cli.main(["evaluate", "--model", str(model_file), "--operating_point", "youden"]) == 2
  assert "decides at the thresholds it was exported with, sensitivity=0.75 (chosen on synth_cxr/validation)" \
      in capsys.readouterr().err
  for bad in ("sensitivity=1.5", "recall=0.9", "youden=1", "threshold=high"):
    assert cli.main(["evaluate", "--workdir", str(tmp_path / "no_run"), "--operating_point", bad]) == 2
    assert f"--operating_point {bad!r}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- subgroups


def test_evaluate_scores_each_group_of_an_attribute_apart(run, tmp_path, capsys):
  out = tmp_path / "by.json"
  assert cli.main(["evaluate", "--workdir", run, "--n_boot", "50", "--out", str(out), "--by", "view,age",
                   "--min_group", "8"]) == 0
  printed = capsys.readouterr().out
  result = json.loads(out.read_text())
  probs, labels, _ = _reference_probabilities(run, _best_step(run), range(40))
  # The attributes from the generator's cases, not from the examples evaluate read.
  config = load_config("configs/finetune_synth.py", TINY)
  synth = synth_cxr.SynthCXR(synth_cxr.SynthParams.from_config(config.data.synth))
  cases = [synth.case("test", i) for i in range(40)]
  bands = lambda age: "<50" if age < 50 else "50-64" if age < 65 else "65-79" if age < 80 else "80+"
  for attribute, value_of in (("view", lambda c: c.view), ("age", lambda c: bands(c.age))):
    values = np.array([value_of(c) for c in cases])
    sub = result["subgroups"][attribute]
    order = ["<50", "50-64", "65-79", "80+"] if attribute == "age" else ["AP", "PA"]  # youngest first
    kept = [v for v in order if (values == v).sum() >= 8]
    assert list(sub["groups"]) == kept and sub["min_group"] == 8
    assert sub["smaller_groups"] == {"groups": len(set(values)) - len(kept),
                                     "examples": int(sum((values == v).sum() for v in set(values) - set(kept)))}
    for value in kept:
      rows = values == value
      group = sub["groups"][value]
      assert group["examples"] == rows.sum()
      for k, name in enumerate(result["labels"]):
        y, p = labels[rows, k], probs[rows, k]
        expected = roc_auc_score(y, p) if 0 < y.sum() < len(y) else None
        assert group["labels"][name]["auroc"] == (expected if expected is None else pytest.approx(expected, abs=2e-6))
      assert f"{value} ({rows.sum()})" in printed
  assert sum(result["subgroups"]["view"]["groups"][v]["examples"] for v in ("AP", "PA")) == 40
  assert result["subgroups"]["age"]["smaller_groups"]["groups"] >= 1  # the rule is exercised
  assert cli.main(["evaluate", "--workdir", run, "--by", "site"]) == 2
  assert "--by site: synth_cxr examples have the attributes view, sex, age" in capsys.readouterr().err
