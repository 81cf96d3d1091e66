"""INSPECT builder (both public layouts) and the CT-to-image functions of radjax.data.ct."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nibabel")
pytest.importorskip("tensorflow_datasets")

import fixtures_real  # noqa: E402
from radjax.data import build as build_lib  # noqa: E402
from radjax.data import ct  # noqa: E402
from radjax.data.builders import inspect as inspect_builder  # noqa: E402

CONFIG = {"image_size": 16, "num_slices": 4, "slice_spacing_mm": 5.0}


def _same(a: float, b: float) -> bool:
  return (math.isnan(a) and math.isnan(b)) or a == b


def _read_split(version_dir: Path, split: str) -> dict[str, dict]:
  import tensorflow_datasets as tfds
  source = tfds.builder_from_directory(str(version_dir)).as_data_source(split=split)
  return {source[i]["id"].decode(): source[i] for i in range(len(source))}


@pytest.fixture(scope="module", params=["v2", "2025"])
def built(request, tmp_path_factory):
  root = tmp_path_factory.mktemp(f"inspect_{request.param}")
  manual = root / "inspect"
  expected = fixtures_real.make_inspect_tree(manual, layout=request.param)
  data_dir = root / "data"
  report = build_lib.build_dataset("inspect", data_dir, manual_dir=manual, builder_kwargs={"config": CONFIG},
                                   progress=False, verbose=False)
  return {"layout": request.param, "manual": manual, "data_dir": data_dir, "expected": expected, "report": report}


def test_examples_labels_and_splits(built):
  expected, report = built["expected"], built["report"]
  assert report["splits"] == {s: len(v) for s, v in expected["examples"].items()}
  cfg = ct.CTConfig(**CONFIG)
  for split, exp_examples in expected["examples"].items():
    got = _read_split(Path(report["data_dir"]), split)
    assert set(got) == set(exp_examples), split
    for imp, exp in exp_examples.items():
      ex = got[imp]
      assert ex["patient_id"].decode() == exp["patient_id"]
      assert ex["image_id"].decode() == exp["image_id"]
      assert ex["report"].decode() == exp["report"]
      for name, value in exp["labels"].items():
        assert _same(float(ex["labels"][name]), value), (imp, name)
      assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.uint8
      # Without TensorFlow, TFDS decodes a Sequence of images to a list of [H, W, 3] arrays.
      slices = np.stack(ex["slices"])
      assert slices.shape == (4, 16, 16, 3) and slices.dtype == np.uint8
      # The stored PNGs decode to exactly what radjax.data.ct computes from the canonical volume.
      vol = ct.Volume(fixtures_real.inspect_volume_hu(int(imp)).astype(np.float32), (1.5, 1.5, 2.5))
      want = ct.volume_to_inputs(vol, cfg)
      np.testing.assert_array_equal(ex["image"], want["image"])
      np.testing.assert_array_equal(slices, want["slices"])


def test_predict_reads_a_volume_as_the_build_stored_it(built):
  """`radjax predict` on a CT volume gives the model the projection the build stored: the same
  CT settings, read back from the named build's report."""
  from radjax.config import load_config
  from radjax.eval import classifier
  config = load_config("configs/study_inspect.py", [f"--config.data.data_dir={built['data_dir']}",
                                                    f"--config.data.builder_config={built['report']['config']}"])
  read_image = classifier.ImageReader("inspect", classifier.build_settings(config.data))
  assert read_image.build.ct_config() == ct.CTConfig(**CONFIG)
  for split, exp_examples in built["expected"]["examples"].items():
    got = _read_split(Path(built["report"]["data_dir"]), split)
    for imp, exp in exp_examples.items():
      np.testing.assert_array_equal(read_image(exp["volume"]), got[imp]["image"])
  with pytest.raises(ValueError, match="trained on films"):
    classifier.ImageReader("synth_cxr", None)(exp["volume"])
  config.data.builder_config = "never_built"
  with pytest.raises(FileNotFoundError, match="never_built"):
    classifier.build_settings(config.data)


def test_censored_is_masked_never_negative(built):
  got = _read_split(Path(built["report"]["data_dir"]), "validation")
  assert all(math.isnan(float(v)) for v in got["1003"]["labels"].values())
  tallies = built["report"]["labels"]
  assert tallies["validation"]["12_month_PH"] == {"pos": 0, "neg": 0, "uncertain": 0, "missing": 1}
  # Train labels in task order: 1001 [T, F, F, C, F, T, C, F], 1002 [F, F, F, F, F, F, F, T].
  assert tallies["train"]["12_month_mortality"] == {"pos": 0, "neg": 1, "uncertain": 0, "missing": 1}
  assert tallies["train"]["12_month_readmission"] == {"pos": 0, "neg": 1, "uncertain": 0, "missing": 1}
  assert tallies["train"]["pe_positive_nlp"] == {"pos": 1, "neg": 1, "uncertain": 0, "missing": 0}


def test_build_report(built):
  expected = built["expected"]
  on_disk = json.loads((built["data_dir"] / "inspect" / "build_report.json").read_text())
  assert on_disk["splits"] == {"train": 2, "validation": 1, "test": 1}
  assert on_disk["dropped"] == expected["dropped"]
  assert on_disk["filtered"] == expected["filtered"]
  drops = on_disk["dropped_examples"]
  assert len(drops) == sum(expected["dropped"].values())
  for reason, ids in expected["dropped_ids"].items():
    assert sorted(d["id"] for d in drops if d["reason"] == reason) == ids, reason
  malformed = sorted(d["path"].rsplit("/", 1)[-1].split(":")[0] for d in drops if d["reason"] == "malformed_row")
  if built["layout"] == "v2":
    assert malformed == ["Final_labels_20240101.csv", "Final_splits.csv"]
  else:
    assert malformed == ["labels_20250611.tsv", "splits_20250611.tsv"]
  paths = {d["reason"]: d.get("path", "") for d in drops}
  assert paths["missing_image"].endswith("CTPA/PE1005_e.nii.gz")
  assert paths["corrupt_image"].endswith("CTPA/PE1006_f.nii.gz")
  for split, exp_examples in expected["examples"].items():
    for task in fixtures_real.INSPECT_TASKS:
      values = [e["labels"][task] for e in exp_examples.values()]
      want = {"pos": sum(v == 1.0 for v in values), "neg": sum(v == 0.0 for v in values), "uncertain": 0,
              "missing": sum(math.isnan(v) for v in values)}
      assert on_disk["labels"][split][task] == want, (split, task)
  assert "Saddle" not in json.dumps(on_disk)


def test_rerun_noop_and_strict(built, tmp_path):
  again = build_lib.build_dataset("inspect", built["data_dir"], manual_dir=built["manual"],
                                  builder_kwargs={"config": CONFIG}, progress=False, verbose=False)
  assert again["status"] == "already_built"
  with pytest.raises(build_lib.DataQualityError, match=r"strict build: .*(splits|labels)"):
    build_lib.build_dataset("inspect", tmp_path / "d", manual_dir=built["manual"], strict=True,
                            builder_kwargs={"config": CONFIG}, progress=False, verbose=False)


def test_missing_tables_error(tmp_path):
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "Final_metadata.csv").write_text("impression_id,image_id,person_id\n")
  with pytest.raises(FileNotFoundError, match=r"Final_labels\*\.csv(.|\n)*labels_YYYYMMDD\.tsv"):
    build_lib.build_dataset("inspect", tmp_path / "d", manual_dir=tmp_path / "m", verbose=False)
  with pytest.raises(ValueError, match="manual_dir"):
    build_lib.build_dataset("inspect", tmp_path / "d", verbose=False)


def test_label_value_parsing():
  v = inspect_builder._VALUES  # pylint: disable=protected-access
  assert v["true"] == 1.0 and v["false"] == 0.0
  assert math.isnan(v["censored"]) and math.isnan(v["censor"]) and math.isnan(v[""])
  assert inspect_builder.volume_file_name("abc") == "abc.nii.gz"
  assert inspect_builder.volume_file_name("abc.nii.gz") == "abc.nii.gz"


# ----------------------------------------------------------------------------- CT maths

def test_window_hand_values():
  np.testing.assert_allclose(ct.window(np.array([-1350.0, -600.0, 150.0, 500.0]), -600, 1500),
                             [0.0, 0.5, 1.0, 1.0])
  np.testing.assert_allclose(ct.window(np.array([-160.0, -100.0, 40.0, 240.0]), 40, 400), [0.0, 0.15, 0.5, 1.0])
  np.testing.assert_allclose(ct.window(np.array([-100.0, 400.0, 900.0]), 400, 1000), [0.0, 0.5, 1.0])
  assert ct.multi_window(np.zeros((2, 3))).shape == (2, 3, 3)


def test_resample_matrix_box_and_linear():
  w = ct.resample_matrix(4, 1.0, np.array([1.0, 3.0]), 2.0)
  np.testing.assert_allclose(w, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
  np.testing.assert_allclose(ct.resample_axis(np.array([0.0, 2, 4, 6]), 0, 1.0, 2.0), [1.0, 5.0])
  # Up-sampling interpolates linearly between input centres (1 mm and 3 mm).
  w = ct.resample_matrix(2, 2.0, np.array([1.0, 2.0, 3.0]), 1.0)
  np.testing.assert_allclose(w, [[1, 0], [0.5, 0.5], [0, 1]])


def test_square_resize_pads_with_fill():
  img = np.array([[1.0, 2, 3, 4], [5, 6, 7, 8]])
  out = ct.square_resize(img, (1.0, 1.0), 4, fill=-1.0)
  np.testing.assert_allclose(out, [[-1, -1, -1, -1], [1, 2, 3, 4], [5, 6, 7, 8], [-1, -1, -1, -1]])
  # Anisotropic pixels: 2 rows of 2 mm = 4 mm, 4 cols of 1 mm = 4 mm -> already square in mm.
  out = ct.square_resize(img, (2.0, 1.0), 2, fill=0.0)
  np.testing.assert_allclose(out, [[1.5, 3.5], [5.5, 7.5]])


def test_slice_stack_thick_slab_hand_case():
  # 8 slices of 2.5 mm, each constant at -1000 + 100 z; 5 mm slabs average pairs; 2 picks -> slabs 0 and 3.
  hu = np.broadcast_to((-1000.0 + 100.0 * np.arange(8))[None, None, :], (4, 4, 8)).astype(np.float32)
  cfg = ct.CTConfig(image_size=4, num_slices=2, slice_spacing_mm=5.0)
  stack = ct.slice_stack(ct.Volume(hu, (1.0, 1.0, 2.5)), cfg)
  assert stack.shape == (2, 4, 4, 3)
  lung = lambda h: round((h + 1350.0) / 1500.0 * 255.0)
  assert np.all(stack[0, ..., 0] == lung(-950.0)) and np.all(stack[1, ..., 0] == lung(-350.0))
  assert np.all(stack[..., 2] == 0)  # mediastinal window starts at -160 HU


def test_orientation_is_canonicalised(tmp_path):
  hu = fixtures_real.inspect_volume_hu(3)
  fixtures_real.write_nifti(tmp_path / "a.nii.gz", hu)
  fixtures_real.write_nifti(tmp_path / "b.nii.gz", hu, flip_x=True)
  a, b = ct.load_nifti(str(tmp_path / "a.nii.gz")), ct.load_nifti(str(tmp_path / "b.nii.gz"))
  np.testing.assert_array_equal(a.hu, hu.astype(np.float32))
  np.testing.assert_array_equal(b.hu, a.hu)
  assert a.spacing == b.spacing == (1.5, 1.5, 2.5)


def test_display_conventions():
  # Bright voxels at the patient's right (high x), anterior (high y) and superior (high z) ends.
  hu = np.full((6, 6, 6), -2000.0, np.float32)
  hu[5, :, :] = 1000.0  # right
  vol = ct.Volume(hu, (1.0, 1.0, 1.0))
  cfg = ct.CTConfig(image_size=6, num_slices=1, slice_spacing_mm=1.0)
  axial = ct.slice_stack(vol, cfg)[0, ..., 0]
  assert np.all(axial[:, 0] == 255) and np.all(axial[:, 1:] == 0)  # patient's right on the image's left
  hu = np.full((6, 6, 6), -2000.0, np.float32)
  hu[:, 5, :] = 1000.0  # anterior
  axial = ct.slice_stack(ct.Volume(hu, (1.0, 1.0, 1.0)), cfg)[0, ..., 0]
  assert np.all(axial[0] == 255) and np.all(axial[1:] == 0)  # anterior at the top
  hu = np.full((6, 6, 6), -2000.0, np.float32)
  hu[:, :, 5] = 1000.0  # superior
  coronal = ct.projection_image(ct.Volume(hu, (1.0, 1.0, 1.0)), cfg)[..., 0]
  assert np.all(coronal[0] == 255) and np.all(coronal[1:] == 0)  # superior at the top
  mip = ct.projection_image(ct.Volume(hu, (1.0, 1.0, 1.0)),
                            ct.CTConfig(image_size=6, num_slices=1, slice_spacing_mm=1.0, projection="mip",
                                        projection_axis="axial"))
  assert np.all(mip[..., 0] == 255)


def test_bad_volumes(tmp_path):
  import nibabel as nib
  nib.save(nib.Nifti1Image(np.zeros((4, 4), np.int16), np.eye(4)), str(tmp_path / "flat.nii.gz"))
  with pytest.raises(ValueError, match="flat.nii.gz: expected a 3D volume"):
    ct.load_nifti(str(tmp_path / "flat.nii.gz"))
  with pytest.raises(ValueError, match="unknown CT windows"):
    ct.CTConfig(windows=("bone",))
