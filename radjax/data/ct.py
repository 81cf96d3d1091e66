"""CT volumes to inputs that 2D image backbones can use (pure numpy; nibabel only to read).

Representation (written for the README)
---------------------------------------
A CT pulmonary angiogram (a NIfTI volume in Hounsfield units) becomes two images,
both with three channels, one per HU window (level/width, the INSPECT benchmark's
windows)::

    channel 0  lung          L -600 / W 1500
    channel 1  PE            L  400 / W 1000   (contrast-filled arteries vs. clot)
    channel 2  mediastinal   L   40 / W  400

Each window maps HU to [0, 1] (clip((HU - (L - W/2)) / W, 0, 1)) and is stored as
8-bit PNG.

1. ``slices`` [S, H, W, 3]: a stack of S axial slabs, evenly spaced from the lowest
   to the highest slice of the volume. The volume is first resampled along z to
   ``slice_spacing_mm`` (each output slice is the average of the input slices it
   overlaps, i.e. a thick-slab reconstruction; linear interpolation when the input
   is thicker than the target), using the voxel size from the NIfTI affine; then S
   of the resampled slices are picked with ``round(linspace(0, n - 1, S))`` (repeats
   when the volume has fewer than S resampled slices). Each slice is shown in
   radiological convention (anterior at the top, patient's right on the image's
   left), padded with air (-1024 HU) to a square field of view in millimetres and
   resized to H = W = ``image_size`` with area averaging. Models encode every slice
   with the 2D backbone and pool the S slice embeddings with attention.
2. ``image`` [H, W, 3]: a cheap multi-window projection, the coronal average-
   intensity projection of each windowed channel (window first, then average along
   the anterior-posterior axis, over the whole volume), resampled along z to
   ``slice_spacing_mm``, superior at the top and the patient's right on the left,
   padded with black to a square field of view in millimetres and resized to
   ``image_size``. It looks like a three-window digitally reconstructed radiograph,
   which suits backbones pre-trained on chest X-rays. ``projection="mip"`` takes the
   maximum instead of the mean; ``projection_axis="axial"`` projects along z instead.

Orientation: volumes are reoriented to the closest canonical (RAS+) axes with the
affine before anything else, so the result does not depend on how the NIfTI stored
its voxels. Voxel values are read with the NIfTI scaling (scl_slope/scl_inter)
applied and are taken to be HU.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Sequence

import numpy as np

# name -> (level, width) in HU.
WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "pe": (400.0, 1000.0),
    "mediastinal": (40.0, 400.0),
}
DEFAULT_WINDOWS = ("lung", "pe", "mediastinal")
AIR_HU = -1024.0


def _nibabel():
  try:
    import nibabel  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "reading CT volumes (INSPECT) needs nibabel, the optional extra 'inspect': "
        "pip install 'radjax[inspect]' (or pip install nibabel)") from e
  return nibabel


@dataclasses.dataclass(frozen=True)
class Volume:
  """A CT volume in canonical RAS+ voxel order.

  hu: float32 [X, Y, Z] in HU; RAS+ means x increases towards the patient's Right,
    y towards Anterior, z towards Superior.
  spacing: (dx, dy, dz) voxel size in mm.
  """
  hu: np.ndarray
  spacing: tuple[float, float, float]


def load_nifti(path: str) -> Volume:
  """Reads a NIfTI file (.nii or .nii.gz) into a canonical-orientation ``Volume``.

  Raises ValueError naming the file when it is not a 3D volume (a trailing singleton
  4th axis is accepted) or has non-positive voxel sizes; nibabel's own errors for
  unreadable/truncated files propagate.
  """
  nib = _nibabel()
  img = nib.load(path)
  data = np.asarray(img.dataobj, dtype=np.float32)
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3 or min(data.shape) < 1:
    raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
  affine = np.asarray(img.affine, dtype=np.float64)
  ornt = nib.orientations.io_orientation(affine)
  data = nib.orientations.apply_orientation(data, ornt)
  # Voxel sizes follow the axes: the norms of the affine's columns, permuted like the data.
  sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
  spacing = [0.0, 0.0, 0.0]
  for src_axis, (dst_axis, _) in enumerate(ornt):
    spacing[int(dst_axis)] = float(sizes[src_axis])
  if not all(np.isfinite(s) and s > 0 for s in spacing):
    raise ValueError(f"{path}: invalid voxel size {spacing} in the NIfTI affine")
  if not np.all(np.isfinite(data)):
    raise ValueError(f"{path}: volume contains non-finite values")
  return Volume(data, (spacing[0], spacing[1], spacing[2]))


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
  """HU -> [0, 1]: clip((hu - (level - width / 2)) / width, 0, 1); same shape, float32."""
  lo = level - width / 2.0
  return np.clip((np.asarray(hu, np.float32) - lo) / width, 0.0, 1.0)


def multi_window(hu: np.ndarray, windows: Sequence[str] = DEFAULT_WINDOWS) -> np.ndarray:
  """[...] HU -> [..., C] in [0, 1], one channel per named window."""
  return np.stack([window(hu, *WINDOWS[w]) for w in windows], axis=-1)


def resample_matrix(n_in: int, in_spacing: float, centers: np.ndarray,
                    width: float) -> np.ndarray:
  """Linear resampling weights [n_out, n_in] along one axis.

  Input sample i covers [i, i + 1) * in_spacing (mm); output j is centred at
  ``centers[j]`` (mm, same origin). When ``width >= in_spacing`` an output is the
  average over [c - width/2, c + width/2] (box / area averaging: no aliasing when
  down-sampling); otherwise it is the linear interpolation of the two nearest input
  centres. Weights outside the input are left out, so rows near or beyond the edges
  sum to less than 1; callers add ``fill * (1 - row sum)`` (see ``apply_resample``).
  """
  centers = np.asarray(centers, np.float64)[:, None]
  edges = np.arange(n_in + 1, dtype=np.float64)[None, :] * in_spacing
  if width >= in_spacing:
    lo, hi = centers - width / 2.0, centers + width / 2.0
    overlap = np.clip(np.minimum(hi, edges[:, 1:]) - np.maximum(lo, edges[:, :-1]), 0.0, None)
    return (overlap / width).astype(np.float32)
  mids = (np.arange(n_in, dtype=np.float64)[None, :] + 0.5) * in_spacing
  return np.clip(1.0 - np.abs(centers - mids) / in_spacing, 0.0, None).astype(np.float32)


def apply_resample(x: np.ndarray, weights: np.ndarray, axis: int, fill: float) -> np.ndarray:
  """Resamples ``x`` along ``axis`` with ``weights`` [n_out, n_in]; uncovered parts get ``fill``."""
  x = np.moveaxis(np.asarray(x, np.float32), axis, -1)
  lead = x.shape[:-1]
  # One 2D GEMM (a stacked matmul over the leading axes is far slower in numpy).
  flat = np.ascontiguousarray(x).reshape(-1, x.shape[-1]) - np.float32(fill)
  out = (flat @ weights.T.astype(np.float32)).reshape(lead + (weights.shape[0],)) + np.float32(fill)
  return np.moveaxis(out, -1, axis)


def resample_axis(x: np.ndarray, axis: int, in_spacing: float, out_spacing: float) -> np.ndarray:
  """Resamples ``x`` along ``axis`` from ``in_spacing`` to about ``out_spacing`` mm over the same
  extent (n_out = max(1, round(n_in * in_spacing / out_spacing)) samples)."""
  n_in = x.shape[axis]
  extent = n_in * in_spacing
  n_out = max(1, int(round(extent / out_spacing)))
  step = extent / n_out
  centers = (np.arange(n_out) + 0.5) * step
  return apply_resample(x, resample_matrix(n_in, in_spacing, centers, step), axis, fill=0.0)


def square_resize(img: np.ndarray, spacing: tuple[float, float], size: int,
                  fill: float) -> np.ndarray:
  """[R, C, ...] image with pixel size ``spacing`` (row, col mm) -> [size, size, ...]: the field of
  view is padded with ``fill`` to a square in mm (centred) and area-resampled."""
  rows, cols = img.shape[0], img.shape[1]
  extent = max(rows * spacing[0], cols * spacing[1])
  step = extent / size
  out = img
  for axis, (n, sp) in enumerate(((rows, spacing[0]), (cols, spacing[1]))):
    offset = (extent - n * sp) / 2.0  # centre the image in the square field of view
    centers = (np.arange(size) + 0.5) * step - offset
    out = apply_resample(out, resample_matrix(n, sp, centers, step), axis, fill)
  return out


def to_uint8(x01: np.ndarray) -> np.ndarray:
  """[0, 1] float -> uint8 (rounded)."""
  return np.clip(np.rint(np.asarray(x01) * 255.0), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class CTConfig:
  """How a volume becomes model input (see the module docstring).

  image_size: H = W of every output image.
  num_slices: S, slices in the stack.
  slice_spacing_mm: z spacing the volume is resampled to (thick-slab averaging).
  windows: window names (keys of WINDOWS), one channel each.
  projection: "mean" (average intensity) or "mip" (maximum intensity).
  projection_axis: "coronal" (along anterior-posterior) or "axial" (along z).
  """
  image_size: int = 256
  num_slices: int = 16
  slice_spacing_mm: float = 5.0
  windows: tuple[str, ...] = DEFAULT_WINDOWS
  projection: str = "mean"
  projection_axis: str = "coronal"

  def __post_init__(self):
    unknown = [w for w in self.windows if w not in WINDOWS]
    if unknown:
      raise ValueError(f"unknown CT windows {unknown}; known: {sorted(WINDOWS)}")
    if self.projection not in ("mean", "mip"):
      raise ValueError(f"projection must be 'mean' or 'mip', got {self.projection!r}")
    if self.projection_axis not in ("coronal", "axial"):
      raise ValueError(f"projection_axis must be 'coronal' or 'axial', got {self.projection_axis!r}")
    if self.image_size < 1 or self.num_slices < 1 or not self.slice_spacing_mm > 0:
      raise ValueError(f"invalid CT config {self}")


def slice_stack(vol: Volume, cfg: CTConfig) -> np.ndarray:
  """Volume -> uint8 [S, H, W, C] stack of evenly spaced, z-resampled axial slabs."""
  dx, dy, dz = vol.spacing
  n_z = vol.hu.shape[2]
  extent = n_z * dz
  n_out = max(1, int(round(extent / cfg.slice_spacing_mm)))
  step = extent / n_out
  picks = np.rint(np.linspace(0, n_out - 1, cfg.num_slices)).astype(np.int64)
  centers = (picks + 0.5) * step
  # Only the S picked resampled slices are computed, from the input slices they overlap.
  w = resample_matrix(n_z, dz, centers, step)  # [S, Z]
  used = np.nonzero(w.any(axis=0))[0]
  slabs = apply_resample(vol.hu[:, :, used], w[:, used], axis=2, fill=AIR_HU)  # [X, Y, S]
  out = []
  for s in range(cfg.num_slices):
    # Radiological display: rows = anterior -> posterior, cols = patient right -> left.
    axial = np.flip(slabs[:, :, s].T, (0, 1))  # [Y, X]
    axial = square_resize(axial, (dy, dx), cfg.image_size, fill=AIR_HU)
    out.append(to_uint8(multi_window(axial, cfg.windows)))
  return np.stack(out)


def projection_image(vol: Volume, cfg: CTConfig, chunk: int = 32) -> np.ndarray:
  """Volume -> uint8 [H, W, C] multi-window projection (see the module docstring)."""
  dx, dy, dz = vol.spacing
  hu = vol.hu
  mean = cfg.projection == "mean"
  axis = 1 if cfg.projection_axis == "coronal" else 2  # anterior-posterior or z
  channels = []
  for name in cfg.windows:
    parts = []
    for z0 in range(0, hu.shape[2], chunk):  # chunks bound the memory of the windowed copy
      windowed = window(hu[:, :, z0:z0 + chunk], *WINDOWS[name])  # [X, Y, z]
      parts.append(windowed.sum(axis=axis) if mean else windowed.max(axis=axis))
    if axis == 1:
      proj = np.concatenate(parts, axis=1)  # [X, Z]
      channels.append(proj / hu.shape[1] if mean else proj)
    else:
      proj = np.sum(parts, axis=0) if mean else np.max(parts, axis=0)  # [X, Y]
      channels.append(proj / hu.shape[2] if mean else proj)
  proj = np.stack(channels, axis=-1)
  if axis == 1:
    proj = resample_axis(proj, 1, dz, cfg.slice_spacing_mm)  # [X, Z', C]
    z_spacing = hu.shape[2] * dz / proj.shape[1]
    img = np.flip(np.transpose(proj, (1, 0, 2)), (0, 1))  # [Z', X, C]: superior top, right on left
    img = square_resize(img, (z_spacing, dx), cfg.image_size, fill=0.0)
  else:
    img = np.flip(np.transpose(proj, (1, 0, 2)), (0, 1))  # [Y, X, C]: anterior top, right on left
    img = square_resize(img, (dy, dx), cfg.image_size, fill=0.0)
  return to_uint8(img)


def encode_png(img: np.ndarray) -> bytes:
  """uint8 [H, W] or [H, W, C] (C in 1, 3) -> PNG bytes."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if img.ndim == 3 and img.shape[2] == 1:
    img = img[..., 0]
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
  return buf.getvalue()


def volume_to_inputs(vol: Volume, cfg: CTConfig) -> dict[str, np.ndarray]:
  """Volume -> {"image": uint8 [H, W, C] projection, "slices": uint8 [S, H, W, C] stack}."""
  return {"image": projection_image(vol, cfg), "slices": slice_stack(vol, cfg)}
