"""The image_table builder: your own films and reports listed in a table, built end to end and
checked against images, labels and splits worked out here independently."""

from __future__ import annotations

import csv
import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radjax.data import build as build_lib
from radjax.data.builders import image_table
import fixtures_real

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("pydicom")

SIZE = 16
HEADER = ["id", "image", "report", "patient_id", "split", "effusion", "nodule", "mortality_1y"]
REPORT = "CLINICAL HISTORY: cough.\n\nFINDINGS: Blunted left angle.\n\nIMPRESSION:  Left pleural\neffusion {}."
SECRET = "Blunted left angle"  # in every report, never allowed in a log or a build report


def _gradient(h: int, w: int, lo: int, hi: int) -> np.ndarray:
  yy, xx = np.mgrid[0:h, 0:w]
  return (lo + (hi - lo) * ((3 * yy + xx) % 97) / 96).astype(np.float64)


def _jpeg_round_trip(img: np.ndarray) -> np.ndarray:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=95)
  return np.asarray(Image.open(buf))


def _resized(img: np.ndarray) -> np.ndarray:
  """uint8 [H, W] -> short side SIZE, bicubic (the build's resize, written out)."""
  h, w = img.shape
  scale = SIZE / min(h, w)
  return np.asarray(Image.fromarray(img).resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC))


def _equalized_8bit(raw: np.ndarray) -> np.ndarray:
  eight = np.floor((raw - raw.min()) * 255 / (raw.max() - raw.min())).astype(np.uint8)
  return fixtures_real.equalize_like_opencv(eight)


def make_table_tree(root: Path) -> dict:
  """A hospital export: a table naming PNG, JPEG (colour), TIFF, 16-bit PNG and DICOM films, and
  rows with every problem a build must name. Returns the expected examples per split."""
  films = root / "films"
  films.mkdir(parents=True)
  gray = _gradient(40, 30, 10, 240).astype(np.uint8)
  Image.fromarray(gray).save(films / "a1.png")
  colour = np.stack([gray, np.roll(gray, 3, 0), gray // 2], axis=-1)
  Image.fromarray(colour).save(films / "a2.jpg", quality=97)
  Image.fromarray(gray.T.copy()).save(films / "c1.tif")
  raw16 = _gradient(36, 44, 900, 3100).astype(np.uint16)
  Image.fromarray(raw16).save(films / "b2.png")
  stored = _gradient(48, 40, 800, 2800).astype(np.uint16)
  fixtures_real.write_dicom(films / "b1.dcm", stored, "MONOCHROME1", slope=2.0, intercept=-1024.0)
  (films / "d1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  with Image.open(films / "a2.jpg") as im:  # a colour JPEG's gray is its luma channel, decoded as such
    im.draft("L", im.size)
    colour_read = np.asarray(im.convert("L"))
  shown = -(stored * 2.0 - 1024.0)  # rescaled, then inverted: MONOCHROME1 shows its minimum white
  expected_images = {
      "a1": _jpeg_round_trip(_resized(gray)),
      "a2": _jpeg_round_trip(_resized(colour_read)),
      "c1": _jpeg_round_trip(_resized(gray.T.copy())),
      "b2": _jpeg_round_trip(_resized(_equalized_8bit(raw16.astype(np.float64)))),
      "b1": _jpeg_round_trip(_resized(_equalized_8bit(shown))),
  }
  rows = [
      ["a1", "films/a1.png", REPORT.format(1), "P1", "train", "1", "0", "0"],
      ["a2", str(films / "a2.jpg"), REPORT.format(2), "P1", "Train", "yes", "no", ""],
      ["b1", "films/b1.dcm", REPORT.format(3), "P2", "val", "-1", "positive", "1"],
      ["b2", "films/b2.png", REPORT.format(4), "P2", "validate", "0", "1", "censored"],
      ["c1", "films/c1.tif", REPORT.format(5), "P3", "test", "uncertain", "0", "NaN"],
      ["d1", "films/d1.jpg", REPORT.format(6), "P4", "train", "1", "0", "0"],       # corrupt
      ["d2", "films/gone.png", REPORT.format(7), "P4", "train", "1", "0", "0"],     # missing
      ["e1", "films/a1.png", REPORT.format(8), "P6", "train", "maybe", "0", "0"],   # bad label
      ["e2", "films/a1.png", REPORT.format(9), "P5", "train", "1", "0", "0"],       # P5 straddles
      ["e3", "films/a1.png", REPORT.format(10), "P5", "test", "1", "0", "0"],
      ["f1", "films/a1.png", "   ", "P7", "train", "1", "0", "0"],                 # empty report
      ["a1", "films/c1.tif", REPORT.format(11), "P8", "train", "1", "0", "0"],      # repeated id
      ["g1", "films/a1.png", REPORT.format(12), "P9", "holdout", "1", "0", "0"],    # unknown split
  ]
  fixtures_real.write_csv(root / "export.csv", HEADER, rows,
                          raw_lines={len(rows): "h1,films/a1.png,r,P10,train,1,0,0,extra"})
  # The first line of each row: the header is line 1, and a report's line breaks stay in its cell.
  first_lines = list(np.cumsum([2] + [1 + r[2].count("\n") for r in rows]))
  nan = math.nan
  labels = {"a1": (1, 0, 0), "a2": (1, 0, nan), "b1": (-1, 1, 1), "b2": (0, 1, nan), "c1": (-1, 0, nan)}
  splits = {"train": ("a1", "a2"), "validation": ("b1", "b2"), "test": ("c1",)}
  reports = {k: f"Left pleural effusion {n}." for k, n in zip(("a1", "a2", "b1", "b2", "c1"), range(1, 6))}
  return {"first_lines": first_lines, "images": expected_images, "labels": labels, "splits": splits,
          "reports": reports, "patients": {"a1": "P1", "a2": "P1", "b1": "P2", "b2": "P2", "c1": "P3"}}


def _tiny_classifier_config(built: dict):
  from radjax.config import load_config
  return load_config("configs/study_image_table.py", [
      f"--config.data.data_dir={built['data_dir']}", "--config.data.builder_config=16_jpeg",
      *fixtures_real.TINY_CLASSIFIER])


def _examples(version_dir: str, split: str) -> dict[str, dict]:
  import tensorflow_datasets as tfds
  source = tfds.builder_from_directory(version_dir).as_data_source(split=split)
  return {source[i]["id"].decode(): source[i] for i in range(len(source))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("table")
  manual = root / "export"
  expected = make_table_tree(manual)
  data_dir = root / "data"
  report = build_lib.build_dataset(
      "image_table", data_dir, manual_dir=manual, progress=False, verbose=False,
      builder_kwargs={"config": {"image_size": SIZE, "prognostic": "mortality_1y"}})
  return {"manual": manual, "data_dir": data_dir, "expected": expected, "report": report}


def test_examples_images_labels_and_splits(built):
  exp = built["expected"]
  assert built["report"]["config"] == "16_jpeg"
  assert built["report"]["splits"] == {s: len(ids) for s, ids in exp["splits"].items()}
  for split, ids in exp["splits"].items():
    got = _examples(built["report"]["data_dir"], split)
    assert sorted(got) == sorted(ids)
    for key in ids:
      ex = got[key]
      np.testing.assert_array_equal(ex["image"][..., 0], exp["images"][key], err_msg=key)
      values = tuple(float(ex["labels"][n]) for n in ("effusion", "nodule", "mortality_1y"))
      assert all((math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(values, exp["labels"][key])), key
      assert ex["report"].decode() == exp["reports"][key]
      assert ex["patient_id"].decode() == exp["patients"][key]


def test_build_report_names_every_problem_by_row_or_file(built):
  report, manual = built["report"], built["manual"]
  table = str(manual / "export.csv")
  assert report["dropped"] == {"corrupt_image": 1, "empty_report": 1, "malformed_row": 4, "missing_image": 1,
                               "patient_straddles_splits": 2}
  where = {(d["reason"], d.get("path")) for d in report["dropped_examples"]}
  line = built["expected"]["first_lines"]  # rows are named by their first line
  assert ("malformed_row", f"{table}:{line[7]}") in where     # e1: "maybe"
  assert ("malformed_row", f"{table}:{line[11]}") in where    # the repeated id a1
  assert ("malformed_row", f"{table}:{line[12]}") in where    # split "holdout"
  assert ("malformed_row", f"{table}:{line[13]}") in where    # a field too many
  assert ("patient_straddles_splits", f"{table}:{line[8]}") in where
  assert ("empty_report", f"{table}:{line[10]}") in where
  assert ("missing_image", str(manual / "films" / "gone.png")) in where
  assert ("corrupt_image", str(manual / "films" / "d1.jpg")) in where
  details = {d.get("id"): d.get("detail", "") for d in report["dropped_examples"]}
  assert "'effusion'" in details["e1"] and details["a1"] == f"id repeats {table}:{line[0]}"
  assert report["config_fields"]["labels"] == ["effusion", "nodule", "mortality_1y"]
  assert report["labels"]["validation"]["mortality_1y"] == {"pos": 1, "neg": 0, "uncertain": 0, "missing": 1}
  text = (Path(built["data_dir"]) / "image_table" / "build_report.json").read_text()
  assert SECRET not in text and "effusion 1." not in text and "Doe^Jane" not in text


def test_predict_reads_films_as_the_build_stored_them(built, tmp_path):
  from radjax.config import load_config
  from radjax.eval import classifier
  config = load_config("configs/study_image_table.py", [f"--config.data.data_dir={built['data_dir']}",
                                                        "--config.data.builder_config=16_jpeg"])
  read_image = classifier.ImageReader("image_table", classifier.build_settings(config.data))
  for key, name in (("a1", "a1.png"), ("a2", "a2.jpg"), ("b1", "b1.dcm"), ("b2", "b2.png"), ("c1", "c1.tif")):
    np.testing.assert_array_equal(read_image(str(built["manual"] / "films" / name)),
                                  built["expected"]["images"][key], err_msg=name)
  # An exported classifier names its labels and carries the build's settings: it scores files
  # where the build is not to be found.
  from flax import nnx
  from radjax.eval import exported
  from radjax.methods import get_method
  tiny = _tiny_classifier_config(built)
  meta = exported.export(get_method("supervised").build(tiny, nnx.Rngs(0)), tiny, read_image.build, "a test's model",
                         str(tmp_path / "mine.radjax"))
  assert meta["labels"] == ["effusion", "nodule"] and meta["data"]["labels"] == "effusion,nodule"
  deployed = classifier.open_classifier(model_file=str(tmp_path / "mine.radjax"),
                                        overrides=[("data.data_dir", str(tmp_path / "elsewhere"))])
  out = io.StringIO()
  assert classifier.write_predictions(deployed, [str(built["manual"] / "films" / "b1.dcm")], out) == (1, 0)
  assert next(csv.reader(io.StringIO(out.getvalue()))) == ["path", "effusion", "nodule", "error"]
  np.testing.assert_array_equal(deployed.image_reader()(str(built["manual"] / "films" / "b1.dcm")),
                                built["expected"]["images"]["b1"])


def test_an_external_test_set_is_matched_by_label_name(built, tmp_path):
  """A model evaluated on another hospital's build: its labels are found by name, whatever the
  columns' order or the other build's groups, and a build without one of them is refused."""
  from flax import nnx
  from radjax.config import ConfigError
  from radjax.eval import classifier, evaluation, exported
  from radjax.methods import get_method
  tiny = _tiny_classifier_config(built)
  assert tiny.data.labels == "diagnostic"  # effusion, nodule in the model's build
  model_file = str(tmp_path / "a.radjax")
  exported.export(get_method("supervised").build(tiny, nnx.Rngs(0)), tiny,
                  classifier.build_settings(tiny.data), "a test's model", model_file)
  other = tmp_path / "other"
  (other / "films").mkdir(parents=True)
  rows = []
  for i in range(6):
    Image.fromarray(_gradient(20, 20, 10 * i, 200).astype(np.uint8)).save(other / "films" / f"{i}.png")
    # Another column order, and effusion an outcome here: read by position or by the group
    # "diagnostic", the model's outputs would be misread. effusion is positive in 1 film, nodule in 4.
    # The site is an attribute, not a label: one film's is blank.
    rows.append([f"films/{i}.png", f"IMPRESSION: film {i}.", "test", int(i % 3 != 0), int(i == 2), i % 2,
                 ("north", "north", "north", "north", "south", "")[i]])
  fixtures_real.write_csv(other / "t.csv", ["image", "report", "split", "nodule", "effusion", "relapse", "site"], rows)
  other_dir = tmp_path / "other_tfds"
  build_lib.build_dataset("image_table", other_dir, manual_dir=other, progress=False, verbose=False,
                          builder_kwargs={"config": {"image_size": SIZE, "prognostic": "effusion",
                                                     "attributes": "site"}})
  assert image_table.label_groups(other_dir, "16_jpeg")["all"] == ("nodule", "effusion", "relapse")
  # A run's config (and a file exported before export wrote names) says "diagnostic": the model's
  # build's group, which is not the other build's ("nodule", "relapse").
  grouped = str(tmp_path / "grouped.radjax")
  with zipfile.ZipFile(model_file) as src, zipfile.ZipFile(grouped, "w") as dst:
    for item in src.namelist():
      blob = src.read(item)
      if item == "deployment.json":
        meta = json.loads(blob)
        meta["data"]["labels"] = "diagnostic"
        blob = json.dumps(meta).encode()
      dst.writestr(item, blob)
  overrides = [("data.data_dir", str(other_dir)), ("data.num_workers", "0")]
  for path in (model_file, grouped):
    result = evaluation.evaluate(classifier.open_classifier(model_file=path, overrides=overrides), "test", n_boot=10)
    assert list(result["labels"]) == ["effusion", "nodule"]
    assert [(r["positives"], r["negatives"]) for r in result["labels"].values()] == [(1, 5), (4, 2)]
  # Scored by site: each group apart, the blank one as "(missing)"; small groups counted, not named.
  deployed = classifier.open_classifier(model_file=model_file, overrides=overrides)
  by_site = evaluation.evaluate(deployed, "test", n_boot=10, by=("site",), min_group=1)["subgroups"]["site"]
  assert list(by_site["groups"]) == ["north", "south", "(missing)"]
  counts = {g: [(r["positives"], r["negatives"]) for r in v["labels"].values()] for g, v in by_site["groups"].items()}
  assert counts == {"north": [(1, 3), (2, 2)], "south": [(0, 1), (1, 0)], "(missing)": [(0, 1), (1, 0)]}
  by_site = evaluation.evaluate(deployed, "test", n_boot=10, by=("site",), min_group=2)["subgroups"]["site"]
  assert list(by_site["groups"]) == ["north"] and by_site["smaller_groups"] == {"groups": 2, "examples": 2}
  with pytest.raises(ConfigError, match="--by sex: image_table examples have the attributes site"):
    evaluation.evaluate(deployed, "test", by=("sex",))
  fixtures_real.write_csv(other / "t.csv", ["image", "report", "split", "effusion"], [r[:3] + [r[4]] for r in rows])
  build_lib.build_dataset("image_table", tmp_path / "third", manual_dir=other, progress=False, verbose=False)
  with pytest.raises(ConfigError, match="the model predicts effusion, nodule; dataset 'image_table' has no "
                                        "label"):
    classifier.open_classifier(model_file=model_file, overrides=[("data.data_dir", str(tmp_path / "third")),
                                                                 ("data.builder_config", "default")])


def test_reading_a_build_by_its_label_groups(built):
  from radjax.config import ConfigError, load_config
  from radjax.data import pipeline, sources
  config = load_config("configs/study_image_table.py", [f"--config.data.data_dir={built['data_dir']}",
                                                        "--config.data.builder_config=16_jpeg"])
  assert pipeline.label_names(config.data) == ("effusion", "nodule")
  config.data.labels = "prognostic"
  assert pipeline.label_names(config.data) == ("mortality_1y",)
  config.data.labels = "nodule,efusion"
  with pytest.raises(ConfigError, match="efusion"):
    pipeline.label_names(config.data)
  source = sources.get_source(config.data, "validation")
  assert len(source) == 2 and {source[i]["id"] for i in range(2)} == {"b1", "b2"}
  config.data.builder_config = "other"
  with pytest.raises(ConfigError, match="radjax data build --dataset image_table"):
    sources.get_source(config.data, "train")
  # Away from its build (an exported model elsewhere) named labels are taken as they are.
  config.data.data_dir, config.data.labels = "/nowhere", "nodule,effusion"
  assert pipeline.label_names(config.data) == ("nodule", "effusion")


def test_hashed_splits_keep_patients_together_and_never_move(tmp_path, caplog):
  """Without a split column, a patient's split is a pure function of their id: the same in every
  build and whatever other rows the table gains, with the configured fractions."""
  cfg = image_table.make_config(validation_fraction=0.2, test_fraction=0.1)
  patients = [f"MRN{i:05d}" for i in range(2000)]
  splits = [image_table.hashed_split(p, cfg) for p in patients]
  share = {s: splits.count(s) / len(splits) for s in ("train", "validation", "test")}
  assert abs(share["test"] - 0.1) < 0.025 and abs(share["validation"] - 0.2) < 0.03
  manual = tmp_path / "m"
  (manual / "reports").mkdir(parents=True)
  Image.fromarray(_gradient(20, 20, 0, 255).astype(np.uint8)).save(manual / "film.png")
  rows = []
  for i, patient in enumerate(patients[:30]):
    (manual / "reports" / f"{i}.txt").write_text(f"IMPRESSION: finding {i}.")
    rows += [[f"{patient}-{2 * i + j}", "film.png", f"reports/{i}.txt", patient, str(i % 2)] for j in (0, 1)]
  fixtures_real.write_csv(manual / "index.tsv", ["id", "image", "report_file", "patient_id", "finding"], rows,
                          delimiter="\t")
  report = build_lib.build_dataset("image_table", tmp_path / "d", manual_dir=manual, progress=False, verbose=False,
                                   builder_kwargs={"config": {"validation_fraction": 0.2, "test_fraction": 0.1,
                                                              "image_size": 8}})
  assert report["dropped"] == {}
  # TFDS's notices about unregistered configs, which every image_table build uses, are not shown.
  assert not [r for r in caplog.records if "custom data configuration" in r.getMessage()
              or "Variant folder" in r.getMessage()]
  for split, n in report["splits"].items():
    got = _examples(report["data_dir"], split)
    assert len(got) == n
    for key, ex in got.items():
      assert image_table.hashed_split(ex["patient_id"].decode(), cfg) == split
      k = int(key.split("-")[1])
      assert ex["report"].decode() == f"finding {k // 2}." and float(ex["labels"]["finding"]) == (k // 2) % 2
  assert sum(report["splits"].values()) == 60


def test_table_errors_name_what_is_wrong(tmp_path):
  manual = tmp_path / "m"
  manual.mkdir()
  with pytest.raises(FileNotFoundError, match="holds no table"):
    image_table.complete_config(manual)
  fixtures_real.write_csv(manual / "a.csv", ["image", "report", "nodule", "split"], [["x.png", "r", "1", "train"]])
  assert image_table.complete_config(manual).labels == ("nodule",)
  with pytest.raises(ValueError, match=r"missing column\(s\) label 'efusion'"):
    image_table.complete_config(manual, {"labels": "efusion"})
  with pytest.raises(ValueError, match="not among the labels"):
    image_table.complete_config(manual, {"labels": "nodule", "prognostic": "death"})
  with pytest.raises(ValueError, match=r"missing column\(s\) attribute 'site'"):
    image_table.complete_config(manual, {"attributes": "site"})
  with pytest.raises(ValueError, match="an attribute cannot be a label"):
    image_table.complete_config(manual, {"labels": "nodule", "attributes": "nodule"})
  fixtures_real.write_csv(manual / "b.csv", ["image", "report", "report_file", "all"], [])
  with pytest.raises(FileNotFoundError, match="2 tables"):
    image_table.complete_config(manual)
  with pytest.raises(ValueError, match="report and report_file both"):
    image_table.complete_config(manual, table="b.csv")
  fixtures_real.write_csv(manual / "b.csv", ["image", "text", "nodule", ""], [])
  with pytest.raises(ValueError, match=r"missing column\(s\) report \(or report_file\)"):
    image_table.complete_config(manual, table="b.csv")
  fixtures_real.write_csv(manual / "b.csv", ["image", "report_file", "nodule", ""], [])
  assert image_table.complete_config(manual, table="b.csv").labels == ("nodule",)
  fixtures_real.write_csv(manual / "c.csv", ["image", "report", "all"], [])
  with pytest.raises(ValueError, match="cannot be named"):
    image_table.complete_config(manual, table="c.csv")
  # No usable row: no empty build, an error that says what was dropped.
  fixtures_real.write_csv(manual / "c.csv", ["image", "report", "nodule"], [["x.png", "r", "maybe"]])
  with pytest.raises(build_lib.DataQualityError, match=r"every example was dropped: \{'malformed_row': 1\}"):
    build_lib.build_dataset("image_table", tmp_path / "d", manual_dir=manual, progress=False, verbose=False,
                            builder_kwargs={"table": "c.csv"})
  with pytest.raises(ValueError, match="unknown image_table config field"):
    image_table.make_config(image_sise=3)


def test_unreadable_tables_name_the_file(tmp_path):
  """read_table and table_header: an empty file, a gzip cut short (its header still readable),
  bytes that are not UTF-8 and a missing file each raise ValueError naming the file; short and
  long rows come back marked, with their line numbers."""
  import gzip  # pylint: disable=import-outside-toplevel
  (tmp_path / "empty.csv").write_text("")
  rows = gzip.compress(b"a,b\n" + b"1,2\n" * 20000)
  (tmp_path / "cut.csv.gz").write_bytes(rows[:len(rows) // 2])
  (tmp_path / "latin1.tsv").write_bytes(b"a\tb\n\xff\t1\n")
  (tmp_path / "ragged.csv").write_text(" a , b\n1,2\n3\n4,5,6\n")
  read = lambda name, **kw: list(build_lib.read_table(tmp_path / name, **kw))
  header = lambda name: build_lib.table_header(tmp_path / name)
  for call, name, why in [(read, "empty.csv", "empty table"), (header, "empty.csv", "empty table"),
                          (read, "cut.csv.gz", "EOFError"), (read, "latin1.tsv", "UnicodeDecodeError"),
                          (header, "latin1.tsv", "UnicodeDecodeError"), (read, "nothere.csv", "FileNotFoundError"),
                          (header, "nothere.csv", "FileNotFoundError")]:
    with pytest.raises(ValueError, match=f"{name}: .*{why}"):
      call(name)
  assert header("cut.csv.gz") == ["a", "b"]
  with pytest.raises(ValueError, match=r"ragged.csv: missing column\(s\) \['c'\]; found \['a', 'b'\]"):
    read("ragged.csv", required=("c",))
  assert read("ragged.csv", required=("a",)) == [
      (2, {"a": "1", "b": "2"}), (3, {"a": "3", "b": None}), (4, {"a": "4", "b": "5", None: ["6"]})]


def test_study_runs_on_a_table(tmp_path, capsys):
  """The README's own-data commands, shrunk: build from a table, advise, then the study's features, the
  report-seeing teacher and the cells, with tasks taken from the build's label groups (MIMIC's test
  runs a pre-training on a build)."""
  from radjax import cli
  manual = tmp_path / "export"
  (manual / "films").mkdir(parents=True)
  rows, rng = [], np.random.default_rng(0)
  for i in range(24):
    effusion, death = i % 2, (i // 2) % 2
    film = (rng.integers(0, 60, (24, 24)) + 120 * effusion).astype(np.uint8)
    Image.fromarray(film).save(manual / "films" / f"{i}.png")
    words = "left pleural effusion" if effusion else "clear lungs"
    split = "train" if i < 16 else "validation" if i < 20 else "test"
    rows.append([f"films/{i}.png", f"IMPRESSION: {words}.", f"P{i}", split, effusion, death])
  fixtures_real.write_csv(manual / "export.csv", ["image", "report", "patient_id", "split", "effusion", "death"], rows)
  data_dir = tmp_path / "tfds"
  assert cli.main(["data", "build", "--dataset", "image_table", "--manual_dir", str(manual), "--data_dir",
                   str(data_dir), "--builder_config", "prognostic=death", "--no_progress"]) in (0, None)
  capsys.readouterr()
  assert cli.main(["advise", "--config", "configs/study_image_table.py", f"--config.data.data_dir={data_dir}",
                   "--config.data.labels=all", "--config.data.num_workers=0"]) in (0, None)
  advice = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert [a["label"] for a in advice] == ["effusion", "death"]
  assert advice[0]["text_auroc"] == 1.0  # the reports state the effusion
  rc = cli.main([
      "study", "--config", "configs/study_image_table.py", "--workdir", str(tmp_path / "study"),
      f"--config.data.data_dir={data_dir}", *fixtures_real.TINY_STUDY, "--config.study.pretrain=none",
      "--config.study.tasks=diagnostic,death"])
  assert rc == 0
  with open(tmp_path / "study" / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert {(r["task"], r["finetune"]) for r in rows} == {(t, f) for t in ("diagnostic", "death")
                                                       for f in ("linear", "distill")}
  logged = "".join(p.read_text(errors="replace") for p in (tmp_path / "study").rglob("*")
                   if p.is_file() and p.suffix in (".json", ".jsonl", ".csv", ".md", ".txt"))
  assert "pleural" not in logged and "clear lungs" not in logged
