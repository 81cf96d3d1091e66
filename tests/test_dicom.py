"""DICOM radiographs: pixels with the rescale and photometric interpretation applied, refusals
that name the reason, and the 8-bit conversions against references written out by hand."""

import numpy as np
import pytest

from fixtures_real import equalize_like_opencv, write_dicom
from radjax.data import dicom

pytest.importorskip("pydicom")


def _film(h=40, w=32, seed=0):
  """12-bit detector values: a smooth body with noise, as a radiograph's histogram is not flat."""
  yy, xx = np.mgrid[0:h, 0:w]
  body = 1500 + 1800 * np.exp(-((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (h * w / 6))
  return np.clip(body + np.random.default_rng(seed).normal(0, 60, (h, w)), 0, 4095).astype(np.uint16)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_read_radiograph_applies_rescale_and_photometric_interpretation(tmp_path, photometric):
  stored = _film()
  write_dicom(tmp_path / "x.dcm", stored, photometric, slope=0.5, intercept=-100.0)
  assert dicom.is_dicom(str(tmp_path / "x.dcm"))
  values = stored.astype(np.float64) * 0.5 - 100.0
  want = -values if photometric == "MONOCHROME1" else values  # MONOCHROME1 shows its minimum white
  np.testing.assert_array_equal(dicom.read_radiograph(str(tmp_path / "x.dcm")), want)


@pytest.mark.parametrize("pixels, attributes, message", [
    (np.zeros((3, 8, 8), np.uint16), {}, "3 frames"),
    (np.zeros((8, 8), np.uint16), {"Modality": "CT"}, "Modality CT: not a radiograph"),
    (np.zeros((8, 8, 3), np.uint8), {}, "PhotometricInterpretation RGB"),
])
def test_what_is_not_a_radiograph_is_refused_by_name(tmp_path, pixels, attributes, message):
  kwargs = {"photometric": "RGB", "bits_stored": 8} if pixels.ndim == 3 and pixels.shape[-1] == 3 else {}
  write_dicom(tmp_path / "x.dcm", pixels, **kwargs)
  if attributes:
    import pydicom
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    for name, value in attributes.items():
      setattr(ds, name, value)
    ds.save_as(tmp_path / "x.dcm")
  with pytest.raises(ValueError, match=message):
    dicom.read_radiograph(str(tmp_path / "x.dcm"))


def test_is_dicom_reads_the_magic_not_the_name(tmp_path):
  (tmp_path / "fake.dcm").write_bytes(b"\0" * 200)
  (tmp_path / "short").write_bytes(b"DICM")
  assert not dicom.is_dicom(str(tmp_path / "fake.dcm")) and not dicom.is_dicom(str(tmp_path / "short"))


def test_min_max_to_uint8_truncates():
  x = np.array([[-3.0, 0.0], [1.5, 7.0]])
  want = np.array([[0, int(3 * 25.5)], [int(4.5 * 25.5), 255]], np.uint8)
  np.testing.assert_array_equal(dicom.min_max_to_uint8(x), want)
  np.testing.assert_array_equal(dicom.min_max_to_uint8(np.full((2, 2), 9.0)), np.zeros((2, 2), np.uint8))
  with pytest.raises(ValueError, match="non-finite"):
    dicom.min_max_to_uint8(np.array([0.0, np.nan]))


@pytest.mark.parametrize("case", ["film", "few_levels", "constant", "darkest_is_not_0"])
def test_equalize_histogram_matches_opencv_rule(case):
  rng = np.random.default_rng(1)
  img = {"film": lambda: dicom.min_max_to_uint8(_film()),
         "few_levels": lambda: rng.choice(np.array([3, 9, 200], np.uint8), (17, 13)),
         "constant": lambda: np.full((5, 6), 77, np.uint8),
         "darkest_is_not_0": lambda: rng.integers(40, 90, (31, 29)).astype(np.uint8)}[case]()
  got = dicom.equalize_histogram(img)
  np.testing.assert_array_equal(got, equalize_like_opencv(img))
  if case != "constant":
    assert got.min() == 0 and got.max() == 255
