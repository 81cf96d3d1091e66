"""MIMIC-CXR builder: a fixture tree in PhysioNet's exact layout, built end to end."""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from radjax.data import build as build_lib
from radjax.data.builders import mimic_cxr
import fixtures_real

pytest.importorskip("tensorflow_datasets")


def _same(a: float, b: float) -> bool:
  return (math.isnan(a) and math.isnan(b)) or a == b


def _read_split(version_dir: Path, split: str) -> dict[str, dict]:
  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory(str(version_dir))
  source = builder.as_data_source(split=split)
  out = {}
  for i in range(len(source)):
    ex = source[i]
    key = ex["dicom_id"].decode() if ex["id"].decode() in out else ex["id"].decode()
    out[key] = ex
  return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("mimic")
  manual = root / "physionet" / "mimic-cxr-jpg" / "2.0.0"
  expected = fixtures_real.make_mimic_tree(manual)
  data_dir = root / "data"
  report = build_lib.build_dataset("mimic_cxr", data_dir, manual_dir=manual,
                                   builder_kwargs={"config": {"image_size": 16}}, progress=False)
  return {"manual": manual, "data_dir": data_dir, "expected": expected, "report": report}


def test_examples_labels_and_splits(built):
  expected, report = built["expected"], built["report"]
  version_dir = Path(report["data_dir"])
  assert report["splits"] == {s: len(v) for s, v in expected["examples"].items()}
  for split, exp_examples in expected["examples"].items():
    got = _read_split(version_dir, split)
    assert set(got) == set(exp_examples), split
    for study, exp in exp_examples.items():
      ex = got[study]
      assert ex["id"].decode() == study
      assert ex["dicom_id"].decode() == exp["dicom_id"]
      assert ex["view"].decode() == exp["view"]
      assert ex["report"].decode() == exp["report"]
      assert ex["image"].dtype == np.uint8 and ex["image"].shape == exp["shape"] + (1,)
      assert set(ex["labels"]) == set(exp["labels"])
      for name, value in exp["labels"].items():
        assert _same(float(ex["labels"][name]), value), (study, name, ex["labels"][name], value)
  # radjax reads the view as the examples' one attribute (`radjax evaluate --by view`).
  from radjax.data.sources import ArrayRecordSource
  source = ArrayRecordSource("mimic_cxr", str(built["data_dir"]), "train", report["config"])
  assert len(source) > 0
  for i in range(len(source)):
    assert source[i]["attributes"] == {"view": expected["examples"]["train"][source[i]["id"]]["view"]}


def test_demographics_are_attributes(built, tmp_path):
  """With demographics=true each example also carries its patient's sex and age band at the study
  (from MIMIC-IV), for `radjax evaluate --by sex,age`; blank where the subject is not in MIMIC-IV."""
  from radjax.data.sources import ArrayRecordSource
  report = build_lib.build_dataset("mimic_cxr", tmp_path, manual_dir=built["manual"], progress=False,
                                   builder_kwargs={"config": {"image_size": 16, "demographics": True}})
  assert report["config"].endswith("_demographics")
  for split, exp_examples in built["expected"]["examples"].items():
    source = ArrayRecordSource("mimic_cxr", str(tmp_path), split, report["config"])
    got = {source[i]["id"]: source[i]["attributes"] for i in range(len(source))}
    assert got == {study: {"view": e["view"], "sex": e["sex"], "age": e["age"]} for study, e in exp_examples.items()}


def test_build_report(built):
  expected, report = built["expected"], built["report"]
  on_disk = json.loads((built["data_dir"] / "mimic_cxr" / "build_report.json").read_text())
  assert on_disk["splits"] == report["splits"]
  assert on_disk["dropped"] == expected["dropped"]
  assert report["filtered"] == expected["filtered"]
  assert report["warnings"] == expected["warnings"]
  drops = on_disk["dropped_examples"]
  assert len(drops) == sum(expected["dropped"].values())
  for reason, fragment in expected["dropped_paths"].items():
    paths = [d["path"] for d in drops if d["reason"] == reason]
    assert len(paths) == 1 and fragment in paths[0], (reason, paths)
  for reason, ids in expected["dropped_ids"].items():
    assert sorted(d["id"] for d in drops if d["reason"] == reason) == ids
  malformed = [d["path"] for d in drops if d["reason"] == "malformed_row"]
  assert sum("metadata.csv.gz:" in p for p in malformed) == 2
  assert sum("split.csv.gz:" in p for p in malformed) == 1
  assert sum("chexpert.csv.gz:" in p for p in malformed) == 1
  # Label tallies: counted by hand from the expected examples.
  for split, exp_examples in expected["examples"].items():
    for name in mimic_cxr.CHEXPERT_LABELS + mimic_cxr.OUTCOME_LABELS:
      values = [e["labels"][name] for e in exp_examples.values()]
      want = {"pos": sum(v == 1.0 for v in values), "neg": sum(v == 0.0 for v in values),
              "uncertain": sum(v == -1.0 for v in values), "missing": sum(math.isnan(v) for v in values)}
      assert on_disk["labels"][split][name] == want, (split, name)
  # Never any report text in the report file.
  text = json.dumps(on_disk)
  assert "Cardiomegaly and" not in text and "Lungs are" not in text


def test_rerun_is_a_noop(built, capsys):
  version_dir = Path(built["report"]["data_dir"])
  files = sorted(version_dir.glob("*.array_record*"))
  mtimes = [f.stat().st_mtime_ns for f in files]
  report = build_lib.build_dataset("mimic_cxr", built["data_dir"], manual_dir=built["manual"],
                                   builder_kwargs={"config": {"image_size": 16}}, progress=False)
  assert report["status"] == "already_built"
  assert report["splits"] == built["report"]["splits"]
  assert [f.stat().st_mtime_ns for f in files] == mtimes
  assert "nothing to do" in capsys.readouterr().out
  assert not (built["data_dir"] / "mimic_cxr" / ".build_cache").exists()


def test_strict_mode_names_the_file(built, tmp_path):
  with pytest.raises(build_lib.DataQualityError, match=r"strict build: .*mimic-cxr-2\.0\.0-split\.csv\.gz:\d+"):
    build_lib.build_dataset("mimic_cxr", tmp_path / "data", manual_dir=built["manual"], strict=True,
                            builder_kwargs={"config": {"image_size": 16}}, progress=False, verbose=False)


def test_manual_dir_errors(tmp_path):
  with pytest.raises(ValueError, match=r"manual_dir(.|\n)*mimic-cxr-2\.0\.0-metadata\.csv\.gz"):
    build_lib.build_dataset("mimic_cxr", tmp_path / "data", manual_dir=None, verbose=False)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    build_lib.build_dataset("mimic_cxr", tmp_path / "data", manual_dir=tmp_path / "nope", verbose=False)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"missing:(.|\n)*split\.csv\.gz(.|\n)*admissions"):
    build_lib.build_dataset("mimic_cxr", tmp_path / "data", manual_dir=tmp_path / "empty", verbose=False)


class _Killed(BaseException):
  """Stands for the process being killed half-way through a build."""


def test_interrupted_build_resumes_from_cache(built, tmp_path, monkeypatch):
  calls = []
  real = mimic_cxr.load_cxr

  def flaky(path, size):
    calls.append(Path(path).name)
    if Path(path).name == "d12a.jpg" and not os.environ.get("_RADJAX_RESUMED"):
      raise _Killed()
    return real(path, size)

  monkeypatch.setattr(mimic_cxr, "load_cxr", flaky)
  kwargs = dict(manual_dir=built["manual"], builder_kwargs={"config": {"image_size": 16}}, progress=False,
                verbose=False)
  with pytest.raises(_Killed):
    build_lib.build_dataset("mimic_cxr", tmp_path / "data", **kwargs)
  assert list((tmp_path / "data" / "mimic_cxr" / ".build_cache").rglob("chunk*.pkl"))
  first = list(calls)
  calls.clear()
  monkeypatch.setenv("_RADJAX_RESUMED", "1")
  report = build_lib.build_dataset("mimic_cxr", tmp_path / "data", **kwargs)
  # train and validation came from the cache: only the test split's image was decoded again.
  assert calls == ["d12a.jpg"], (first, calls)
  assert report["splits"] == built["report"]["splits"]
  assert report["dropped"] == built["expected"]["dropped"]
  assert not (tmp_path / "data" / "mimic_cxr" / ".build_cache").exists()


def test_all_images_all_views_negbio(built, tmp_path):
  report = build_lib.build_dataset(
      "mimic_cxr", tmp_path / "data", manual_dir=built["manual"], progress=False, verbose=False,
      builder_kwargs={"config": {"image_size": 16, "images_per_study": "all", "views": [],
                                 "labeler": "negbio"}})
  assert report["config"] == "allviews_all_16_jpeg_negbio_auto"
  got = _read_split(Path(report["data_dir"]), "train")
  # d1a + d1b (lateral) of study 1, d2a, d3b (d3a corrupt); study 50000014 (lateral) has no report.
  assert sorted(ex["dicom_id"].decode() for ex in got.values()) == ["d1a", "d1b", "d2a", "d3b"]
  assert report["dropped"]["missing_report"] == 2
  assert "view" not in report["filtered"]


def test_missing_reports_are_named_before_any_work(built, tmp_path):
  # The reports are a separate PhysioNet project: without them every study would be decoded and
  # then dropped. The check names them, and accepts a zip given elsewhere.
  manual = tmp_path / "mimic-cxr-jpg"
  shutil.copytree(built["manual"], manual)
  zip_path = tmp_path / "mimic-cxr-reports.zip"
  (manual / "mimic-cxr-reports.zip").rename(zip_path)
  mimic_cxr.check_manual_dir(manual)  # one report extracted next to the images is enough to look
  for txt in (manual / "files").rglob("s*.txt"):
    txt.unlink()
  with pytest.raises(FileNotFoundError, match="the reports: .*--builder_arg reports=PATH"):
    mimic_cxr.check_manual_dir(manual)
  mimic_cxr.check_manual_dir(manual, reports=str(zip_path))


def test_predict_reads_films_and_dicoms_as_the_build_stored_them(built, tmp_path):
  """`radjax predict` gives a MIMIC-CXR model what its build stored: a MIMIC-CXR-JPG film resized
  and encoded with the named build's settings (read back from its report); a DICOM first
  converted as MIMIC-CXR-JPG converts its DICOMs, here written out step by step."""
  from PIL import Image
  from radjax.config import load_config
  from radjax.eval import classifier
  config = load_config("configs/study_mimic.py", [f"--config.data.data_dir={built['data_dir']}",
                                                  f"--config.data.builder_config={built['report']['config']}"])
  read_image = classifier.ImageReader("mimic_cxr", classifier.build_settings(config.data))
  assert read_image.build.image_size == 16
  for split, exp_examples in built["expected"]["examples"].items():
    got = _read_split(Path(built["report"]["data_dir"]), split)
    for study, exp in exp_examples.items():
      [film] = built["manual"].glob(f"files/p*/p*/s{study}/{exp['dicom_id']}.jpg")
      np.testing.assert_array_equal(read_image(str(film)), got[study]["image"][..., 0])
  yy, xx = np.mgrid[0:48, 0:40]
  stored = (800 + 30 * yy + 7 * xx + (yy * xx) % 97).astype(np.uint16)
  fixtures_real.write_dicom(tmp_path / "IM0001", stored, "MONOCHROME1", slope=2.0, intercept=-1024.0)
  shown = -(stored * 2.0 - 1024.0)  # rescaled, then inverted: MONOCHROME1 shows its minimum white
  eight_bit = np.floor((shown - shown.min()) * 255 / (shown.max() - shown.min())).astype(np.uint8)
  Image.fromarray(fixtures_real.equalize_like_opencv(eight_bit)).save(tmp_path / "as_published.jpg",
                                                                      quality=95)
  np.testing.assert_array_equal(read_image(str(tmp_path / "IM0001")),
                                read_image(str(tmp_path / "as_published.jpg")))
  assert classifier.image_files([str(tmp_path)], read_image.suffixes) == [
      str(tmp_path / "IM0001"), str(tmp_path / "as_published.jpg")]
  # An exported classifier carries the named build's settings: predict needs no data_dir then.
  from flax import nnx
  from radjax.eval import exported
  from radjax.methods import get_method
  tiny = load_config("configs/study_mimic.py", [
      f"--config.data.data_dir={built['data_dir']}", f"--config.data.builder_config={built['report']['config']}",
      *fixtures_real.TINY_CLASSIFIER])
  exported.export(get_method("supervised").build(tiny, nnx.Rngs(0)), tiny, read_image.build, "a test's model",
                  str(tmp_path / "mimic.radjax"))
  deployed = classifier.open_classifier(model_file=str(tmp_path / "mimic.radjax"))
  again = deployed.image_reader()
  assert again.build.name == read_image.build.name
  assert build_lib.builder_config_fields(again.build) == build_lib.builder_config_fields(read_image.build)
  np.testing.assert_array_equal(again(str(tmp_path / "IM0001")), read_image(str(tmp_path / "IM0001")))
  # Files are converted as the model's own build did, whichever data.dataset an override names.
  elsewhere = classifier.open_classifier(model_file=str(tmp_path / "mimic.radjax"), overrides=[
      ("data.dataset", "image_table"), ("data.data_dir", str(tmp_path / "no_build_here"))])
  np.testing.assert_array_equal(elsewhere.image_reader()(str(tmp_path / "IM0001")), read_image(str(tmp_path / "IM0001")))


def test_config_names():
  assert mimic_cxr.make_config().name == "default"
  assert mimic_cxr.make_config(image_size=256).name == "default"
  assert mimic_cxr.make_config(image_size=224, views=["pa"]).name == "pa_one_224_jpeg_chexpert_auto"
  assert mimic_cxr.make_config(name="mine", image_size=224).name == "mine"
  with pytest.raises(ValueError, match="unknown MIMIC-CXR config field"):
    mimic_cxr.make_config(image_sise=224)
  with pytest.raises(ValueError, match="images_per_study"):
    mimic_cxr.make_config(images_per_study="two")
  # Command-line strings take the type of the field's default.
  typed = mimic_cxr.make_config(views="PA, ap", image_size="224", outcomes="False")
  assert (typed.views, typed.image_size, typed.outcomes) == (("PA", "AP"), 224, False)
  assert typed.name == "pa-ap_one_224_jpeg_chexpert_auto_nooutcomes"
  for bad, expected in [({"views": 3}, "tuple"), ({"image_size": "2x"}, "int"), ({"image_size": True}, "int"),
                        ({"outcomes": "maybe"}, "bool"), ({"outcomes": 1}, "bool")]:
    with pytest.raises(ValueError, match=f"MIMIC-CXR config field {next(iter(bad))}=.*expected {expected}"):
      mimic_cxr.make_config(**bad)


def test_parse_study_datetime():
  assert mimic_cxr.parse_study_datetime("21800506", "213014.531") == dt.datetime(2180, 5, 6, 21, 30, 14, 531000)
  assert mimic_cxr.parse_study_datetime("21800506", "5.0") == dt.datetime(2180, 5, 6, 0, 0, 5)
  assert mimic_cxr.parse_study_datetime("21800506.0", "93015") == dt.datetime(2180, 5, 6, 9, 30, 15)
  for date, time in [("2180056", "0"), ("21800506", "246000"), ("21800506", "126000"), ("x", "0"),
                     ("21800506", "")]:
    with pytest.raises(ValueError):
      mimic_cxr.parse_study_datetime(date, time)


def test_outcome_definitions_hand_cases():
  A = mimic_cxr.Admission
  t0 = dt.datetime(2150, 3, 10, 14, 0)
  year = dt.timedelta(days=365)
  # Nothing after the study.
  assert mimic_cxr.readmission_12m(t0, []) == 0.0
  assert mimic_cxr.readmission_12m(t0, [A(dt.datetime(2150, 1, 1), dt.datetime(2150, 1, 5), None)]) == 0.0
  # The admission during which the study was taken does not count ...
  assert mimic_cxr.readmission_12m(t0, [A(dt.datetime(2150, 3, 9), dt.datetime(2150, 3, 20), None)]) == 0.0
  # ... nor one that starts after an ED study of the same encounter (ED registration before t0).
  assert mimic_cxr.readmission_12m(
      t0, [A(dt.datetime(2150, 3, 10, 18), dt.datetime(2150, 3, 15), dt.datetime(2150, 3, 10, 12))]) == 0.0
  # An admission starting after the study without ED registration before it counts.
  assert mimic_cxr.readmission_12m(t0, [A(dt.datetime(2150, 3, 10, 18), dt.datetime(2150, 3, 15), None)]) == 1.0
  # Window (t0, t0 + 365 d]: the end is included, one second more is not; t0 itself is not after.
  assert mimic_cxr.readmission_12m(t0, [A(t0 + year, t0 + year + dt.timedelta(days=2), None)]) == 1.0
  assert mimic_cxr.readmission_12m(
      t0, [A(t0 + year + dt.timedelta(seconds=1), t0 + year + dt.timedelta(days=2), None)]) == 0.0
  assert mimic_cxr.readmission_12m(t0, [A(t0, t0 + dt.timedelta(days=2), None)]) == 0.0
  # Mortality: day-resolution, [date(t0), date(t0) + 365 d]; missing dod -> 0; dod before -> NaN.
  assert mimic_cxr.mortality_12m(t0, None) == 0.0
  assert mimic_cxr.mortality_12m(t0, dt.date(2150, 3, 10)) == 1.0
  assert mimic_cxr.mortality_12m(t0, dt.date(2151, 3, 10)) == 1.0
  assert mimic_cxr.mortality_12m(t0, dt.date(2151, 3, 11)) == 0.0
  assert math.isnan(mimic_cxr.mortality_12m(t0, dt.date(2150, 3, 9)))


def test_command_line_build(built, tmp_path, capsys):
  from radjax import cli
  rc = cli.main(["data", "build", "--dataset", "mimic_cxr", "--data_dir", str(tmp_path / "d"), "--manual_dir",
                 str(built["manual"]), "--builder_config", "image_size=16", "--builder_config", "views=pa",
                 "--builder_arg", f"mimic_iv_dir={built['manual'] / 'mimic-iv-2.2'}", "--no_progress"])
  assert rc == 0
  report = json.loads((tmp_path / "d" / "mimic_cxr" / "build_report.json").read_text())
  assert report["config"] == "pa_one_16_jpeg_chexpert_auto"
  assert report["splits"] == {"train": 1, "test": 1}  # the AP-only studies are filtered
  assert report["warnings"]["empty_split"] == 1
  out = capsys.readouterr().out
  assert "examples: train 1, test 1" in out
  assert f"--config.data.data_dir={tmp_path / 'd'} --config.data.builder_config=pa_one_16_jpeg_chexpert_auto" in out
  rc = cli.main(["data", "build", "--dataset", "mimic_cxr", "--data_dir", str(tmp_path / "d2"), "--strict",
                 "--manual_dir", str(built["manual"]), "--no_progress"])
  assert rc == 2 and "strict build" in capsys.readouterr().err
  # As a script its module is __main__: the builders' drops must still be recognised as drops.
  result = subprocess.run([sys.executable, "-m", "radjax.data.build", "--dataset", "mimic_cxr", "--data_dir",
                           str(tmp_path / "d3"), "--manual_dir", str(built["manual"]), "--builder_config",
                           "image_size=16", "--builder_config", "outcomes=false", "--no_progress"],
                           capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads((tmp_path / "d3" / "mimic_cxr" / "build_report.json").read_text())
  assert report["dropped"] and report["config_fields"]["outcomes"] is False


@pytest.mark.parametrize("flags, message", [
    (["--builder_config", "outcomes=maybe"], "MIMIC-CXR config field outcomes='maybe': expected bool"),
    (["--builder_config", "view=PA"], "unknown MIMIC-CXR config field(s) ['view']"),
    (["--builder_arg", "mimic_iv=/x"], "takes no builder argument(s) ['mimic_iv']; it takes mimic_iv_dir, reports"),
    (["--config", "image_size=16"], "builder config fields go in --builder_config KEY=VALUE"),
    (["--config", "configs/study_mimic.py"], "mimic_cxr takes its build settings from --builder_config")])
def test_command_line_build_refuses_bad_settings(built, tmp_path, capsys, flags, message):
  from radjax import cli
  rc = cli.main(["data", "build", "--dataset", "mimic_cxr", "--data_dir", str(tmp_path / "d"), "--manual_dir",
                 str(built["manual"]), "--no_progress", *flags])
  assert rc == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "d").exists()


def test_readme_study_runs_on_the_build(built, tmp_path):
  """The README's MIMIC study command, shrunk: pre-training reads the build's train split (the
  builders write no "pretrain" split), then features, the report teacher and the cells."""
  from radjax import cli
  rc = cli.main([
      "study", "--config", "configs/study_mimic.py", "--workdir", str(tmp_path / "study"),
      f"--config.data.data_dir={built['data_dir']}", f"--config.data.builder_config={built['report']['config']}",
      *fixtures_real.TINY_STUDY, "--config.study.pretrain=clip", "--config.study.tasks=diagnostic"])
  assert rc == 0
  with open(tmp_path / "study" / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert {(r["pretrain"], r["finetune"]) for r in rows} == {("clip", "linear"), ("clip", "distill")}


class _ToyBuilder:  # filled in lazily: tfds is imported by the test
  pass


def test_generic_builder_without_hooks(tmp_path, monkeypatch):
  """A builder that knows nothing of DropLog/BuildContext (like SynthCXRBuilder) builds too."""
  import io as io_lib
  import tensorflow_datasets as tfds
  from PIL import Image
  from radjax.data import builders

  def png(v):
    buf = io_lib.BytesIO()
    Image.fromarray(np.full((4, 5), v, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()

  class Toy(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = "toy_build"
    VERSION = tfds.core.Version("0.1.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 1)), "report": tfds.features.Text(),
          "labels": tfds.features.FeaturesDict({"a": np.float32})}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(4), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": png(i), "report": "r", "labels": {"a": np.float32([1.0, 0.0, np.nan, -1.0][i % 4])}}

  monkeypatch.setattr(builders, "_BUILDERS", {**builders._BUILDERS, "toy_build": f"{__name__}:_ToyBuilder"})
  monkeypatch.setattr(sys.modules[__name__], "_ToyBuilder", Toy)
  report = build_lib.build_dataset("toy_build", tmp_path, progress=False, verbose=False)
  assert report["splits"] == {"train": 4, "test": 2}
  assert report["labels"]["train"]["a"] == {"pos": 1, "neg": 1, "uncertain": 1, "missing": 1}
  assert report["dropped"] == {} and report["dropped_examples"] == []
  assert build_lib.build_dataset("toy_build", tmp_path, progress=False, verbose=False)["status"] == "already_built"


def test_same_config_name_with_other_fields_is_refused(built, tmp_path):
  kwargs = dict(manual_dir=built["manual"], progress=False, verbose=False)
  build_lib.build_dataset("mimic_cxr", tmp_path, builder_kwargs={"config": {"name": "mine", "image_size": 16}},
                          **kwargs)
  with pytest.raises(ValueError, match="was built with config"):
    build_lib.build_dataset("mimic_cxr", tmp_path, builder_kwargs={"config": {"name": "mine", "image_size": 24}},
                            **kwargs)
