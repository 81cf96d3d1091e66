"""Your own films and reports, listed in a table: what a hospital exports from its PACS and RIS.

Expected ``manual_dir``::

    manual_dir/
      TABLE.csv                  one row per film (also .csv.gz, .tsv, .tsv.gz); the only table
                                 in manual_dir, or named with ``--builder_arg table=PATH``
      ...                        the films, anywhere: the table names them

Columns (names exact; any order):
- ``image`` (required): the film's path, relative to ``manual_dir`` or absolute. PNG, JPEG, TIFF,
  BMP or DICOM (``pip install 'radjax[dicom]'``).
- ``report`` (the report's text) or ``report_file`` (the path of a text file holding it, relative
  to ``manual_dir`` or absolute): exactly one of the two. The configured ``section`` of it is kept
  (``radjax.data.reports.extract_section``; default "auto": the last IMPRESSION, else FINDINGS,
  else the last paragraph).
- ``split`` (optional): train, validation (or validate, valid, val, dev) or test. Without it,
  patients are assigned by a hash of ``patient_id``: ``test_fraction`` and
  ``validation_fraction`` of them (default 0.1 each) go to test and validation, the same way on
  every build, and a row added later does not move the others.
- ``patient_id`` (optional, recommended): a patient's films stay in one split; with a ``split``
  column, a patient listed in several splits has all their rows dropped
  (``patient_straddles_splits``). Without it each row is its own patient.
- ``id`` (optional): the example's name in outputs; default: the ``image`` value. Unique.
- attributes (optional): the columns named by the ``attributes`` setting (sex, age band, site,
  scanner, view, ...), stored as text, never labels: ``radjax evaluate --by NAME`` scores each
  of their groups apart.
- labels: the columns named by the ``labels`` setting; by default every other column. Values
  ``1``/``0``/``-1`` (uncertain; ``data.uncertain_policy`` decides at training time), also
  ``true``/``false``, ``yes``/``no``, ``positive``/``negative``, ``uncertain``; a blank, ``nan``,
  ``na``, ``missing`` or ``censored`` is missing (NaN: masked, never a negative). The
  ``prognostic`` setting names the labels that are outcomes rather than findings: the study's
  task groups "diagnostic" and "prognostic" are made of them.

Films become what the models read as MIMIC-CXR's do: 8-bit grayscale (a colour file is converted
to gray), the short side resized to ``image_size`` (aspect kept), stored as JPEG (quality
``jpeg_quality``) or PNG. A DICOM (rescale applied, MONOCHROME1 inverted) or a 16-bit or float
file holds raw values, which ``raw_images`` turns into 8 bits: "equalize" (default; min-max
scaled, then histogram-equalised, as MIMIC-CXR-JPG converted its DICOMs, which evens out
contrast between machines) or "min_max". ``radjax predict`` converts new files the same way
(``stored_image``).

Every problem is named in ``build_report.json`` by ``TABLE:LINE`` or file path, never by report
text: a malformed row (a missing field, a label that is not a label value, an unknown split, a
repeated id), a missing or corrupt film, a missing or empty report.

Builds are never registered TFDS configs, since their label columns come from the table: a
build's name is "default" unless its image settings (``image_size``, ``image_format``,
``jpeg_quality``, ``raw_images``) change or ``name=`` is given, and rebuilding a name from a table
whose labels changed is refused (``radjax.data.build``). Readers take the labels from the
build's report (``label_groups``).

Example: ``image`` uint8 [H, W, 1], ``report``, ``id``, ``patient_id``, ``labels`` {name: float32},
and with ``attributes`` set, ``attributes`` {name: text}.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from radjax.data import dicom
from radjax.data import reports as reports_lib
from radjax.data.build import (REPORT_NAME, Drop, build_context, override_fields, read_table, row_is_complete,
                               table_header)
from radjax.data.builders.mimic_cxr import encode_image, load_cxr, read_back, resize_short_side

NAME = "image_table"
VERSION = "1.0.0"  # the builder's; its folder name
DEFAULT_BUILD_NAME = "default"
TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz")
RESERVED_COLUMNS = ("image", "report", "report_file", "split", "patient_id", "id")
LABEL_GROUPS = ("diagnostic", "prognostic", "all")  # data.labels and study.tasks name these
SPLITS = {"train": "train", "validation": "validation", "validate": "validation", "valid": "validation",
          "val": "validation", "dev": "validation", "test": "test"}
_LABEL_VALUES = {
    **dict.fromkeys(("1", "1.0", "true", "yes", "positive"), 1.0),
    **dict.fromkeys(("0", "0.0", "false", "no", "negative"), 0.0),
    **dict.fromkeys(("-1", "-1.0", "uncertain"), -1.0),
    **dict.fromkeys(("", "nan", "na", "n/a", "missing", "censored", "censor"), math.nan),
}
_IMAGE_FIELDS = ("image_size", "image_format", "jpeg_quality", "raw_images")
RAW_CONVERSIONS = ("equalize", "min_max")

MANUAL_INSTRUCTIONS = """\
manual_dir must hold one table (.csv, .csv.gz, .tsv or .tsv.gz; or name it with
--builder_arg table=PATH) with a row per film: columns image (the film's path, relative to
manual_dir or absolute) and report (the text) or report_file (a text file's path); optional
split (train/validation/test), patient_id, id; every other column is a label (1/0/-1/blank), or
name the label columns with --builder_config labels=a,b; columns that describe the film or patient
(sex, site, ...) are named with --builder_config attributes=sex,site."""


@dataclasses.dataclass(eq=False)
class ImageTableConfig(tfds.core.BuilderConfig):
  """labels: the label columns (empty: every column that is not image/report/report_file/split/
  patient_id/id or an attribute); prognostic: those of them that are outcomes. attributes:
  columns kept as text for subgroup evaluation. image_size: short side in pixels.
  image_format: "jpeg" | "png". raw_images: "equalize" | "min_max" (see the module docstring).
  section: see radjax.data.reports.extract_section. validation_fraction / test_fraction: the
  patients hashed to those splits when the table has no split column."""
  labels: tuple[str, ...] = ()
  prognostic: tuple[str, ...] = ()
  attributes: tuple[str, ...] = ()
  image_size: int = 256
  image_format: str = "jpeg"
  jpeg_quality: int = 95
  raw_images: str = "equalize"
  section: str = "auto"
  validation_fraction: float = 0.1
  test_fraction: float = 0.1

  def __post_init__(self):
    self.labels, self.prognostic = tuple(self.labels), tuple(self.prognostic)
    self.attributes = tuple(self.attributes)
    if self.image_format not in ("jpeg", "png"):
      raise ValueError(f"image_format must be 'jpeg' or 'png', got {self.image_format!r}")
    if self.raw_images not in RAW_CONVERSIONS:
      raise ValueError(f"raw_images must be one of {RAW_CONVERSIONS}, got {self.raw_images!r}")
    if self.section not in reports_lib.SECTION_CHOICES:
      raise ValueError(f"section must be one of {reports_lib.SECTION_CHOICES}, got {self.section!r}")
    if self.image_size < 8:
      raise ValueError(f"image_size must be >= 8, got {self.image_size}")
    fractions = (self.validation_fraction, self.test_fraction)
    if min(fractions) < 0 or sum(fractions) >= 1:
      raise ValueError(f"validation_fraction and test_fraction must be >= 0 and leave some patients for "
                       f"training, got {self.validation_fraction} and {self.test_fraction}")
    for name in self.labels:
      if name in RESERVED_COLUMNS or name in LABEL_GROUPS or "," in name or not name.strip():
        raise ValueError(f"label column {name!r}: a label cannot be named "
                         f"{', '.join(RESERVED_COLUMNS + LABEL_GROUPS)} or contain a comma (data.labels "
                         "lists labels separated by commas); rename the column")
    for name in self.attributes:
      if name in RESERVED_COLUMNS or name in self.labels or not name.strip():
        raise ValueError(f"attribute column {name!r}: an attribute cannot be a label or one of "
                         f"{', '.join(RESERVED_COLUMNS)}")
    unknown = [name for name in self.prognostic if self.labels and name not in self.labels]
    if unknown:
      raise ValueError(f"prognostic names {unknown}, which are not among the labels {list(self.labels)}")


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(ImageTableConfig)
                       if f.name not in {g.name for g in dataclasses.fields(tfds.core.BuilderConfig)})
_DEFAULT = ImageTableConfig(name=DEFAULT_BUILD_NAME, description="every other column a label, 256 px JPEG")


def make_config(**overrides: Any) -> ImageTableConfig:
  """A config from field overrides (command-line strings typed by the defaults); its name is
  ``overrides["name"]``, else "default" while the image settings are the defaults, else one
  derived from them."""
  name = overrides.pop("name", None)
  fields = override_fields(_DEFAULT, _CONFIG_FIELDS, overrides, "image_table")
  if name is None:
    name = DEFAULT_BUILD_NAME
    if any(fields[f] != getattr(_DEFAULT, f) for f in _IMAGE_FIELDS):
      name = f"{fields['image_size']}_{fields['image_format']}"
      if fields["jpeg_quality"] != _DEFAULT.jpeg_quality:
        name += f"_q{fields['jpeg_quality']}"
      if fields["raw_images"] != _DEFAULT.raw_images:
        name += f"_{fields['raw_images'].replace('_', '')}"
  return ImageTableConfig(name=name, **fields)


def _resolve_config(config: Any) -> ImageTableConfig:
  if config is None:
    return _DEFAULT
  if isinstance(config, ImageTableConfig):
    return config
  if isinstance(config, dict):
    return make_config(**config)
  raise ValueError(f"an image_table build is configured by its fields (--builder_config KEY=VALUE), "
                   f"got {config!r}")


# ----------------------------------------------------------------------------- the table

def find_table(manual_dir: Path, table: str | os.PathLike | None = None) -> Path:
  """The table: ``table`` (relative to ``manual_dir`` or absolute), else the only one in
  ``manual_dir``. Raises FileNotFoundError saying what was found."""
  if table is not None:
    path = Path(table).expanduser()
    path = path if path.is_absolute() else manual_dir / path
    if not path.is_file():
      raise FileNotFoundError(f"table {str(path)!r} does not exist.\n{MANUAL_INSTRUCTIONS}")
    return path
  found = sorted(p for p in manual_dir.iterdir() if p.is_file() and p.name.lower().endswith(TABLE_SUFFIXES))
  if len(found) != 1:
    what = "no table" if not found else f"{len(found)} tables ({', '.join(p.name for p in found)})"
    raise FileNotFoundError(f"{manual_dir} holds {what}: name the one to build with --builder_arg "
                            f"table=PATH.\n{MANUAL_INSTRUCTIONS}")
  return found[0]


def complete_config(manual_dir: Path, config: Any = None, *, table: str | None = None) -> ImageTableConfig:
  """The config with its label columns found in the table's header (every column not reserved,
  when ``labels`` is empty). Raises ValueError naming what the header lacks."""
  cfg = _resolve_config(config)
  path = find_table(manual_dir, table)
  header = table_header(path)
  if "report" in header and "report_file" in header:
    raise ValueError(f"{path}: columns report and report_file both present; keep the one that holds the reports")
  missing = [c for c in ("image",) if c not in header]
  if "report" not in header and "report_file" not in header:
    missing.append("report (or report_file)")
  # A nameless column is a trailing delimiter, as spreadsheet exports write them: not a label.
  labels = cfg.labels or tuple(c for c in header if c and c not in RESERVED_COLUMNS + cfg.attributes)
  missing += [f"label {name!r}" for name in labels if name not in header]
  missing += [f"attribute {name!r}" for name in cfg.attributes if name not in header]
  if missing:
    raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; found {header}.\n{MANUAL_INSTRUCTIONS}")
  if not labels:
    raise ValueError(f"{path}: no label column; found {header}.\n{MANUAL_INSTRUCTIONS}")
  return dataclasses.replace(cfg, labels=labels)  # __post_init__ checks the names


def check_manual_dir(manual_dir: Path, *, config: Any = None, table: str | None = None) -> None:
  complete_config(manual_dir, config, table=table)


def label_groups(data_dir: str | os.PathLike, build: str | None = None) -> dict[str, tuple[str, ...]]:
  """{"diagnostic", "prognostic", "all": label names} of the build named ``build`` under
  ``data_dir``, read from its build report. Raises FileNotFoundError when it is not built."""
  folder = Path(data_dir).expanduser() / NAME / (build or DEFAULT_BUILD_NAME) / VERSION
  try:
    with open(folder / REPORT_NAME) as f:
      fields = json.load(f)["config_fields"]
  except (OSError, KeyError, TypeError, ValueError) as e:
    raise FileNotFoundError(f"image_table build {build or DEFAULT_BUILD_NAME!r} is not in {data_dir} "
                            f"(no readable {folder / REPORT_NAME}): run `radjax data build --dataset "
                            f"image_table --manual_dir DIR --data_dir {data_dir}` first") from e
  labels, prognostic = tuple(fields["labels"]), tuple(fields["prognostic"])
  return {"diagnostic": tuple(n for n in labels if n not in prognostic), "prognostic": prognostic,
          "all": labels}


def hashed_split(patient: str, cfg: ImageTableConfig) -> str:
  """The split a patient without a split column goes to: a uniform draw from their id's hash."""
  u = int.from_bytes(hashlib.sha256(f"radjax:{patient}".encode()).digest()[:8], "big") / 2.0**64
  if u < cfg.test_fraction:
    return "test"
  return "validation" if u < cfg.test_fraction + cfg.validation_fraction else "train"


# ----------------------------------------------------------------------------- films

def eight_bit_film(path: str | os.PathLike, cfg: ImageTableConfig) -> np.ndarray:
  """A film file -> uint8 [H, W], its short side resized to ``cfg.image_size``; raw values (DICOM,
  16-bit, float) converted by ``cfg.raw_images``. Raises for unreadable files."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  raw = dicom.raw_pixels(str(path))
  if raw is None:
    return load_cxr(Path(path), cfg.image_size)
  film = dicom.min_max_to_uint8(raw)
  if cfg.raw_images == "equalize":
    film = dicom.equalize_histogram(film)
  return np.asarray(resize_short_side(Image.fromarray(film), cfg.image_size), dtype=np.uint8)


def stored_image(path: str | os.PathLike, cfg: ImageTableConfig) -> np.ndarray:
  """uint8 [H, W]: what a build with ``cfg`` stores for the film at ``path``, as it reads back."""
  return read_back(eight_bit_film(path, cfg), cfg)


# ----------------------------------------------------------------------------- builder

@dataclasses.dataclass(frozen=True)
class _Row:
  key: str
  where: str  # TABLE:LINE
  image: str
  report: str | None  # the text, or None when it is in report_file
  report_file: str | None
  patient: str
  labels: tuple[tuple[str, float], ...]
  attributes: tuple[tuple[str, str], ...]


class ImageTableBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Films, reports and labels listed in a table (see module docstring)."""

  name = NAME
  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = []  # a build's labels come from its table: no build is a registered config
  DEFAULT_BUILD_NAME = DEFAULT_BUILD_NAME
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
  RADJAX_OWN_PROGRESS = True  # generates through BuildContext.map (radjax.data.build)

  check_manual_dir = staticmethod(check_manual_dir)
  complete_config = staticmethod(complete_config)
  make_config = staticmethod(make_config)
  label_groups = staticmethod(label_groups)

  def __init__(self, *, table: str | None = None, **kwargs):
    """table: the table's path, relative to manual_dir or absolute (default: the only one there)."""
    self._table = table
    kwargs.setdefault("config", _DEFAULT)
    super().__init__(**kwargs)

  @property
  def cfg(self) -> ImageTableConfig:
    return self.builder_config  # type: ignore[return-value]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Films, reports and labels listed in a table.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1), encoding_format=self.cfg.image_format),
            "report": tfds.features.Text(),
            "id": tfds.features.Text(),
            "patient_id": tfds.features.Text(),
            "labels": tfds.features.FeaturesDict({n: np.float32 for n in self.cfg.labels}),
            **({"attributes": tfds.features.FeaturesDict({n: tfds.features.Text() for n in self.cfg.attributes})}
               if self.cfg.attributes else {}),
        }),
    )

  def _split_generators(self, dl_manager):
    manual = Path(dl_manager.manual_dir)
    if not self.cfg.labels:
      raise ValueError("an image_table builder needs its label columns: build it with radjax.data.build, "
                       "which finds them in the table (complete_config)")
    rows = self._index(manual, find_table(manual, self._table))
    # An empty split, and a table with no usable row at all, are radjax.data.build's to report (it
    # warns of the one and refuses the other), as for splits whose every film turns out unreadable.
    return {split: self._generate_examples(rows=rows[split], split=split, manual=manual)
            for split in ("train", "validation", "test")}

  def _index(self, manual: Path, path: Path) -> dict[str, list[_Row]]:
    """The table's usable rows per split; logs the others."""
    cfg = self.cfg
    log = build_context(self).drops
    by_split: dict[str, list[_Row]] = {"train": [], "validation": [], "test": []}
    split_of_row: list[tuple[_Row, str]] = []
    patient_splits: dict[str, set[str]] = {}
    first_line: dict[str, str] = {}
    header = table_header(path)
    if "patient_id" not in header:
      log.warn("no_patient_id", id=str(path))
    for line, row in read_table(path, required=("image",)):
      where = f"{path}:{line}"
      if not row_is_complete(row):
        log.drop("malformed_row", path=where, detail="a field too few or too many")
        continue
      image = (row["image"] or "").strip()
      key = (row.get("id") or "").strip() or image
      if not image:
        log.drop("malformed_row", path=where, detail="no image")
        continue
      labels, bad = [], None
      for name in cfg.labels:
        value = _LABEL_VALUES.get((row[name] or "").strip().lower())
        if value is None:
          bad = name
          break
        labels.append((name, value))
      if bad is not None:
        log.drop("malformed_row", path=where, id=key,
                 detail=f"column {bad!r} is not a label value (1, 0, -1 or blank)")
        continue
      if key in first_line:
        log.drop("malformed_row", path=where, id=key, detail=f"id repeats {first_line[key]}")
        continue
      first_line[key] = where
      patient = (row.get("patient_id") or "").strip() or f"row:{key}"
      if "split" in header:
        split = SPLITS.get((row["split"] or "").strip().lower())
        if split is None:
          log.drop("malformed_row", path=where, id=key,
                   detail=f"split must be one of {', '.join(SPLITS)}")
          continue
      else:
        split = hashed_split(patient, cfg)
      entry = _Row(key, where, image, row.get("report"), (row.get("report_file") or "").strip() or None,
                   patient, tuple(labels), tuple((n, (row[n] or "").strip()) for n in cfg.attributes))
      patient_splits.setdefault(patient, set()).add(split)
      split_of_row.append((entry, split))
    for entry, split in split_of_row:
      splits = patient_splits[entry.patient]
      if len(splits) > 1:
        log.drop("patient_straddles_splits", path=entry.where, id=entry.key,
                 detail=f"patient_id in {sorted(splits)}")
        continue
      by_split[split].append(entry)
    return by_split

  def _generate_examples(self, rows: list[_Row], split: str, manual: Path):
    cfg = self.cfg
    ctx = build_context(self)

    def resolve(rel: str) -> Path:
      p = Path(rel).expanduser()
      return p if p.is_absolute() else manual / p

    def process(row: _Row):
      if row.report_file is not None:
        report_path = resolve(row.report_file)
        try:
          text = report_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
          return Drop("missing_report", path=str(report_path), id=row.key)
      elif row.report is not None:
        text = row.report
      else:
        return Drop("missing_report", path=row.where, id=row.key)
      section = reports_lib.extract_section(text, cfg.section) if text.strip() else ""
      if not section:
        return Drop("empty_report", path=row.where, id=row.key,
                    detail=None if not text.strip() else f"no {cfg.section} section")
      image_path = resolve(row.image)
      if not image_path.is_file():
        return Drop("missing_image", path=str(image_path), id=row.key)
      try:
        film = eight_bit_film(image_path, cfg)
      except Exception as e:  # pylint: disable=broad-except  # PIL and pydicom raise many types
        return Drop("corrupt_image", path=str(image_path), id=row.key,
                    detail=f"{type(e).__name__}: {str(e)[:200]}")
      return (row.key, {
          "image": encode_image(film, cfg.image_format, cfg.jpeg_quality),
          "report": section,
          "id": row.key,
          "patient_id": "" if row.patient.startswith("row:") else row.patient,
          "labels": {n: np.float32(v) for n, v in row.labels},
          **({"attributes": dict(row.attributes)} if row.attributes else {}),
      })

    yield from ctx.map(process, rows, split=split, key=repr, chunk_size=512,
                       salt=repr([getattr(cfg, f) for f in _CONFIG_FIELDS]))
