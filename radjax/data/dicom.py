"""DICOM radiographs to pixels (pydicom, the optional extra 'dicom'), and the 8-bit conversions
that public chest X-ray datasets apply to them.

Only pixel values and the attributes that say how to read them (PhotometricInterpretation,
Modality, NumberOfFrames, the rescale) are read: the header's patient and study attributes
never leave this module.
"""

from __future__ import annotations

import numpy as np

SUFFIXES = (".dcm", ".dicom")
# Not radiographs: a 2D film model would score them, meaninglessly.
_NOT_RADIOGRAPHS = ("CT", "MR", "PT", "NM", "US", "RTDOSE", "SEG", "SR")


def require_pydicom():
  """pydicom, or an ImportError that says how to install it."""
  try:
    import pydicom  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("reading DICOM needs pydicom, the optional extra 'dicom': "
                      "pip install 'radjax[dicom]' (or pip install pydicom)") from e
  return pydicom


def is_dicom(path: str) -> bool:
  """Whether ``path`` starts as a DICOM file does (128-byte preamble, then ``DICM``); False for
  what cannot be read (the reader then names the error)."""
  try:
    with open(path, "rb") as f:
      head = f.read(132)
  except OSError:
    return False
  return len(head) == 132 and head[128:] == b"DICM"


def reads_as_dicom(path: str) -> bool:
  """Whether predict reads ``path`` with pydicom: a DICOM suffix (a file without the magic then
  fails there, by name) or the DICOM magic (exports often have no suffix)."""
  return path.lower().endswith(SUFFIXES) or is_dicom(path)


def read_radiograph(path: str) -> np.ndarray:
  """A single-frame grayscale DICOM -> float64 [H, W], its modality values (rescale applied),
  oriented so that higher is brighter (MONOCHROME1 stores the opposite, so it is negated).

  Raises ValueError for what is not a radiograph (colour, several frames, a CT or MR slice);
  pydicom's own errors name a missing decoder for compressed pixel data."""
  pydicom = require_pydicom()
  ds = pydicom.dcmread(path)
  modality = str(ds.get("Modality", "")).upper()
  if modality in _NOT_RADIOGRAPHS:
    raise ValueError(f"Modality {modality}: not a radiograph (a model trained on INSPECT reads a CT "
                     "series as a NIfTI volume: convert it with dcm2niix)")
  photometric = str(ds.get("PhotometricInterpretation", ""))
  if photometric not in ("MONOCHROME1", "MONOCHROME2"):
    raise ValueError(f"PhotometricInterpretation {photometric or 'missing'}: a radiograph is "
                     "MONOCHROME1 or MONOCHROME2")
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  if frames != 1:
    raise ValueError(f"{frames} frames: one radiograph per file is read")
  x = np.asarray(pydicom.pixels.apply_modality_lut(ds.pixel_array, ds), np.float64)
  if x.ndim != 2:
    raise ValueError(f"pixel data of shape {x.shape}; a radiograph is [rows, columns]")
  return -x if photometric == "MONOCHROME1" else x


# PIL modes whose values are 8-bit display levels (anything else holds raw values: I;16, I, F).
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV")


def raw_pixels(path: str) -> np.ndarray | None:
  """float64 [H, W] for a DICOM (``read_radiograph``) or a 16-bit or float image, whose values need
  a conversion to 8 bits; None for an 8-bit image, which is shown as it is."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if reads_as_dicom(path):
    return read_radiograph(path)
  with Image.open(path) as im:  # reads the header only, until asked for pixels
    return None if im.mode in _EIGHT_BIT_MODES else np.asarray(im, dtype=np.float64)


def min_max_to_uint8(x: np.ndarray) -> np.ndarray:
  """float [...] -> uint8 [...]: shifted to start at 0, scaled so its maximum is 255, truncated."""
  x = np.asarray(x, np.float64)
  lo, hi = float(x.min()), float(x.max())
  if not np.isfinite([lo, hi]).all():
    raise ValueError("non-finite pixel values")
  return np.floor((x - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8)


def equalize_histogram(img: np.ndarray) -> np.ndarray:
  """uint8 [...] -> uint8 [...], histogram-equalised by OpenCV's ``equalizeHist`` rule: the
  darkest level present maps to 0, each level above it to round(255 * (cumulative count minus
  the darkest level's) / (pixels not at the darkest level)); a constant image is unchanged."""
  hist = np.bincount(img.ravel(), minlength=256)
  darkest = int(np.flatnonzero(hist)[0])
  rest = img.size - int(hist[darkest])
  if rest == 0:
    return img.copy()
  cdf = np.cumsum(hist) - hist[darkest]
  # float32 products and round-half-even, as OpenCV's float LUT and saturate_cast do.
  lut = np.rint(cdf.astype(np.float32) * (np.float32(255) / np.float32(rest)))
  return np.clip(lut, 0, 255).astype(np.uint8)[img]
