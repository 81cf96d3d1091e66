"""MIMIC-CXR-JPG (+ MIMIC-CXR reports, + MIMIC-IV outcomes) from a user's PhysioNet copy.

Expected layout of ``manual_dir`` (exactly as PhysioNet distributes it)::

    manual_dir/
      files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg       MIMIC-CXR-JPG images (XX = first 2 digits)
      mimic-cxr-2.0.0-metadata.csv.gz              dicom_id, subject_id, study_id, ViewPosition,
                                                   StudyDate, StudyTime, ...
      mimic-cxr-2.0.0-split.csv.gz                 dicom_id, study_id, subject_id, split
      mimic-cxr-2.0.0-chexpert.csv.gz              subject_id, study_id, 14 label columns
      mimic-cxr-2.0.0-negbio.csv.gz                (same columns; ``labeler="negbio"``)
      mimic-cxr-reports.zip                        files/pXX/pSUBJECT/sSTUDY.txt (from MIMIC-CXR),
        or the reports extracted: files/pXX/pSUBJECT/sSTUDY.txt
      hosp/admissions.csv.gz, hosp/patients.csv.gz MIMIC-IV (for the outcome labels); also found
                                                   under mimic-iv*/hosp, mimiciv/*/hosp, or
                                                   ``mimic_iv_dir=``

Label definitions (for the README)
----------------------------------
Diagnostic labels: the 14 CheXpert columns of ``mimic-cxr-2.0.0-chexpert.csv.gz``
(or ``-negbio``), keyed by their exact column names (``Atelectasis``, ``Cardiomegaly``,
``Consolidation``, ``Edema``, ``Enlarged Cardiomediastinum``, ``Fracture``,
``Lung Lesion``, ``Lung Opacity``, ``No Finding``, ``Pleural Effusion``,
``Pleural Other``, ``Pneumonia``, ``Pneumothorax``, ``Support Devices``; TFDS feature
keys may contain spaces, so no renaming), valued 1.0 (positive), 0.0 (negative),
-1.0 (uncertain) or NaN (blank: not mentioned). Uncertain/blank policies are applied
later, by the loss/pipeline, never at build time.

Prognostic labels, from MIMIC-IV ``hosp`` (dates are shifted per patient consistently
across MIMIC-CXR and MIMIC-IV, so they are joined on ``subject_id``):
- study time t0 = the earliest ``StudyDate`` + ``StudyTime`` (HHMMSS.ffffff) over the
  study's rows of the metadata file.
- ``readmission_12m`` = 1 if the patient has a hospital admission with
  t0 < ``admittime`` <= t0 + 365 days that does not contain the study, else 0. An
  admission contains the study when start <= t0 <= ``dischtime``, where start is
  ``edregtime`` (emergency-department registration) when present, else ``admittime``:
  a radiograph taken in the ED of the admission that follows is part of that admission,
  not a readmission. The admission during which the study was taken therefore never
  counts.
- ``mortality_12m`` = 1 if ``dod`` (patients.csv) falls on a day d with
  date(t0) <= d <= date(t0) + 365 days, else 0. A missing ``dod`` counts as alive (0):
  MIMIC-IV records deaths in hospital and, from state records, up to one year after
  the patient's last discharge, so a patient without ``dod`` is treated as having
  survived the year (an assumption for studies more than a year after the last
  discharge). A ``dod`` before the study day is inconsistent: that example's
  ``mortality_12m`` is NaN and a ``dod_before_study`` warning is counted.
- A subject absent from ``patients.csv`` gets NaN for both outcomes (warning
  ``subject_not_in_mimic_iv``).

Attributes (for ``radjax evaluate --by``): ``view`` (ViewPosition), always; with
``demographics=true``, also ``sex`` (MIMIC-IV ``gender``) and ``age``, the band
(``radjax.data.attributes.age_band``) of the age at the study, ``anchor_age`` + year(t0) -
``anchor_year`` (MIMIC-IV's shifted years are consistent per patient; its ``anchor_age`` is 91
for everyone over 89). Blank where the subject is not in MIMIC-IV.

Selection: images whose ``ViewPosition`` is in ``views`` (default PA and AP; empty =
all views); ``images_per_study="one"`` (default) keeps one image per study, the first
usable one in the order of ``views`` then ``dicom_id`` (an unreadable preferred image is
counted as dropped and the next one is used), ``"all"`` keeps every selected image (one
example each, same study labels). Splits: the official ``split`` column, train /
validate / test -> TFDS train / validation / test (validate is never merged into
test). A patient whose rows in the split file name more than one split has all its
examples dropped (``patient_straddles_splits``).

Example: ``image`` uint8 [H, W, 1] (short side resized to ``image_size``, aspect kept,
8-bit grayscale, JPEG or PNG bytes), ``report`` (the configured section, whitespace and
``___`` placeholders normalised), ``id`` (study_id), ``patient_id`` (subject_id),
``dicom_id``, ``view``, ``labels`` {name: float32}.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import math
import threading
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tensorflow_datasets as tfds

from radjax.data import reports as reports_lib
from radjax.data.attributes import age_band
from radjax.data.build import Drop, build_context, override_fields, read_table, row_is_complete

CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)
OUTCOME_LABELS = ("readmission_12m", "mortality_12m")
SPLITS = {"train": "train", "validate": "validation", "test": "test"}
PREFIX = "mimic-cxr-2.0.0"
_LABEL_VALUES = {"": math.nan, "1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0}
_DEFAULT_VIEW_ORDER = ("PA", "AP", "LATERAL", "LL", "AP AXIAL", "PA LLD", "AP LLD")
_YEAR = dt.timedelta(days=365)

MANUAL_INSTRUCTIONS = """\
manual_dir must be your PhysioNet MIMIC-CXR-JPG copy (https://physionet.org/content/mimic-cxr-jpg/):
  files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg, mimic-cxr-2.0.0-metadata.csv.gz,
  mimic-cxr-2.0.0-split.csv.gz, mimic-cxr-2.0.0-chexpert.csv.gz (or -negbio.csv.gz),
plus the MIMIC-CXR reports (mimic-cxr-reports.zip, or its files/pXX/pSUBJECT/sSTUDY.txt
extracted next to the images, or given with --builder_arg reports=PATH) and, for the outcome
labels, MIMIC-IV hosp/admissions.csv.gz and hosp/patients.csv.gz (under manual_dir/hosp,
manual_dir/mimic-iv*/hosp, or given with --builder_arg mimic_iv_dir=DIR)."""


@dataclasses.dataclass(eq=False)
class MimicCXRConfig(tfds.core.BuilderConfig):
  """views: ViewPosition values kept (empty: all). images_per_study: "one" | "all".
  image_size: short side in pixels. image_format: "jpeg" | "png". labeler: "chexpert" |
  "negbio". section: see radjax.data.reports.extract_section. outcomes: add
  readmission_12m / mortality_12m from MIMIC-IV (needs its hosp tables). demographics: add the
  attributes sex and age band from MIMIC-IV's patients table."""
  views: tuple[str, ...] = ("PA", "AP")
  images_per_study: str = "one"
  image_size: int = 256
  image_format: str = "jpeg"
  jpeg_quality: int = 95
  labeler: str = "chexpert"
  section: str = "auto"
  outcomes: bool = True
  demographics: bool = False

  def __post_init__(self):
    self.views = tuple(v.upper() for v in self.views)
    if self.images_per_study not in ("one", "all"):
      raise ValueError(f"images_per_study must be 'one' or 'all', got {self.images_per_study!r}")
    if self.image_format not in ("jpeg", "png"):
      raise ValueError(f"image_format must be 'jpeg' or 'png', got {self.image_format!r}")
    if self.labeler not in ("chexpert", "negbio"):
      raise ValueError(f"labeler must be 'chexpert' or 'negbio', got {self.labeler!r}")
    if self.section not in reports_lib.SECTION_CHOICES:
      raise ValueError(f"section must be one of {reports_lib.SECTION_CHOICES}, got {self.section!r}")
    if self.image_size < 8:
      raise ValueError(f"image_size must be >= 8, got {self.image_size}")


_CONFIG_FIELDS = ("views", "images_per_study", "image_size", "image_format", "jpeg_quality",
                  "labeler", "section", "outcomes", "demographics")
_DEFAULT = MimicCXRConfig(name="default", description="PA/AP, one image per study, 256 px, CheXpert labels")


# ----------------------------------------------------------------------------- helpers

def _find_first(candidates: Sequence[Path]) -> Path | None:
  for c in candidates:
    if c.exists():
      return c
  return None


def find_mimic_iv_hosp(manual_dir: Path, mimic_iv_dir: str | Path | None = None) -> Path | None:
  """The MIMIC-IV ``hosp`` folder holding admissions/patients tables, or None."""
  roots: list[Path] = []
  if mimic_iv_dir is not None:
    roots += [Path(mimic_iv_dir).expanduser() / "hosp", Path(mimic_iv_dir).expanduser()]
  roots += [manual_dir / "hosp", manual_dir / "mimic-iv" / "hosp", manual_dir / "mimiciv" / "hosp"]
  roots += sorted(manual_dir.glob("mimic-iv*/hosp")) + sorted(manual_dir.glob("mimiciv/*/hosp"))
  roots += sorted(manual_dir.glob("mimic-iv*/*/hosp"))
  for root in roots:
    if _table(root, "admissions") is not None and _table(root, "patients") is not None:
      return root
  return None


def _table(folder: Path, stem: str) -> Path | None:
  return _find_first([folder / f"{stem}.csv.gz", folder / f"{stem}.csv"])


def _cxr_table(manual_dir: Path, kind: str) -> Path | None:
  found = _find_first([manual_dir / f"{PREFIX}-{kind}.csv.gz", manual_dir / f"{PREFIX}-{kind}.csv"])
  if found is None:  # other release prefixes (mimic-cxr-2.1.0-...)
    found = next(iter(sorted(manual_dir.glob(f"mimic-cxr-*-{kind}.csv*"))), None)
  return found


def _find_reports(manual_dir: Path, reports: str | Path | None) -> tuple[Path | None, Path | None]:
  """(directory holding files/pXX/..., zip file); either may be None."""
  if reports is not None:
    p = Path(reports).expanduser()
    if p.is_file():
      return None, p
    return (p.parent if p.name == "files" else p), None
  zip_path = _find_first([manual_dir / "mimic-cxr-reports.zip"])
  folder = _find_first([manual_dir / "mimic-cxr-reports", manual_dir])
  return folder, zip_path


def _holds_reports(folder: Path | None, zip_path: Path | None) -> bool:
  """Whether the reports zip exists or the first subject folder under ``folder/files`` holds a
  report (a cheap look: the whole tree is hundreds of thousands of files)."""
  if zip_path is not None:
    return True
  groups = sorted((folder / "files").glob("p[0-9]*")) if folder is not None else []
  subject = next(iter(sorted(groups[0].glob("p[0-9]*"))), None) if groups else None
  return subject is not None and next(subject.glob("s*.txt"), None) is not None


def check_manual_dir(manual_dir: Path, *, config: Any = None, mimic_iv_dir: str | None = None,
                     reports: str | None = None) -> None:
  """Raises FileNotFoundError listing every expected file that is missing."""
  config = _resolve_config(config)
  missing = []
  for kind in ("metadata", "split", config.labeler):
    if _cxr_table(manual_dir, kind) is None:
      missing.append(f"{manual_dir}/{PREFIX}-{kind}.csv.gz")
  if not (manual_dir / "files").is_dir():
    missing.append(f"{manual_dir}/files/ (pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg)")
  if reports is not None and not Path(reports).expanduser().exists():
    missing.append(f"{reports} (reports zip or folder)")
  elif reports is None and not _holds_reports(*_find_reports(manual_dir, None)):
    # Else every study would be read, then dropped for want of its report.
    missing.append(f"the reports: {manual_dir}/mimic-cxr-reports.zip (from the MIMIC-CXR project, not "
                   "MIMIC-CXR-JPG), its files/pXX/pSUBJECT/sSTUDY.txt extracted there, or "
                   "--builder_arg reports=PATH")
  if (config.outcomes or config.demographics) and find_mimic_iv_hosp(manual_dir, mimic_iv_dir) is None:
    missing.append("MIMIC-IV hosp/admissions.csv.gz and hosp/patients.csv.gz (under manual_dir/hosp, "
                   "manual_dir/mimic-iv*/hosp, or --builder_arg mimic_iv_dir=DIR); or build without the "
                   "outcome labels and demographics: --builder_config outcomes=false (demographics=false)")
  if missing:
    raise FileNotFoundError("MIMIC-CXR manual_dir is incomplete; missing:\n  " + "\n  ".join(missing)
                            + "\n" + MANUAL_INSTRUCTIONS)


def _resolve_config(config: Any) -> MimicCXRConfig:
  if config is None or config == "default":
    return _DEFAULT
  if isinstance(config, MimicCXRConfig):
    return config
  if isinstance(config, dict):
    return make_config(**config)
  raise ValueError(f"unknown MIMIC-CXR config {config!r}")


def make_config(**overrides: Any) -> MimicCXRConfig:
  """A config from field overrides; its name is "default" when nothing changes, else
  ``overrides["name"]`` or one derived from the fields (so each variant builds apart)."""
  name = overrides.pop("name", None)
  fields = override_fields(_DEFAULT, _CONFIG_FIELDS, overrides, "MIMIC-CXR")
  fields["views"] = tuple(v.upper() for v in fields["views"])
  if name is None:
    if all(fields[f] == getattr(_DEFAULT, f) for f in _CONFIG_FIELDS):
      return _DEFAULT
    name = "_".join([
        "-".join(v.replace(" ", "") for v in fields["views"]).lower() or "allviews",
        fields["images_per_study"], str(fields["image_size"]), fields["image_format"],
        fields["labeler"], fields["section"]] + ([] if fields["outcomes"] else ["nooutcomes"])
        + (["demographics"] if fields["demographics"] else []))
    if fields["jpeg_quality"] != _DEFAULT.jpeg_quality:
      name += f"_q{fields['jpeg_quality']}"
  return MimicCXRConfig(name=name, **fields)


def parse_study_datetime(date: str, time: str) -> dt.datetime:
  """StudyDate (YYYYMMDD) + StudyTime (HHMMSS[.ffffff], leading zeros may be missing) -> datetime.

  Raises ValueError for anything else."""
  digits = str(int(float(date)))
  if len(digits) != 8:
    raise ValueError(f"bad StudyDate {date!r}")
  d = dt.datetime.strptime(digits, "%Y%m%d")
  t = float(time)
  if not math.isfinite(t) or t < 0:
    raise ValueError(f"bad StudyTime {time!r}")
  hh, rest = divmod(t, 10000.0)
  mm, ss = divmod(rest, 100.0)
  if hh >= 24 or mm >= 60 or ss >= 60:
    raise ValueError(f"bad StudyTime {time!r}")
  return d + dt.timedelta(hours=int(hh), minutes=int(mm), seconds=ss)


def _parse_dt(value: str | None) -> dt.datetime | None:
  value = (value or "").strip()
  if not value:
    return None
  return dt.datetime.fromisoformat(value)


@dataclasses.dataclass(frozen=True)
class Admission:
  admittime: dt.datetime
  dischtime: dt.datetime | None
  edregtime: dt.datetime | None

  def contains(self, t: dt.datetime) -> bool:
    start = self.edregtime if self.edregtime is not None and self.edregtime < self.admittime else self.admittime
    end = self.dischtime if self.dischtime is not None else self.admittime
    return start <= t <= end


def readmission_12m(t0: dt.datetime, admissions: Sequence[Admission]) -> float:
  """1.0 if an admission not containing t0 starts in (t0, t0 + 365 days], else 0.0."""
  for adm in admissions:
    if t0 < adm.admittime <= t0 + _YEAR and not adm.contains(t0):
      return 1.0
  return 0.0


def mortality_12m(t0: dt.datetime, dod: dt.date | None) -> float:
  """1.0 if dod in [date(t0), date(t0) + 365 days], 0.0 if later or missing, NaN if before."""
  if dod is None:
    return 0.0
  day = t0.date()
  if dod < day:
    return math.nan
  return 1.0 if dod <= day + _YEAR else 0.0


def resize_short_side(img: Any, size: int) -> Any:
  """PIL image -> PIL image whose short side is ``size`` (aspect kept, antialiased)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  w, h = img.size
  scale = size / min(w, h)
  new = (max(1, round(w * scale)), max(1, round(h * scale)))
  if new == (w, h):
    return img
  return img.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)


def load_cxr(path: Path | io.BytesIO, size: int) -> np.ndarray:
  """Reads a radiograph as 8-bit grayscale uint8 [H, W] with its short side resized to ``size``.

  Raises OSError/ValueError (from PIL) for unreadable, truncated or corrupt files."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(path) as im:
    w, h = im.size
    scale = size / min(w, h)
    # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale (never below the request): a
    # 3000 px radiograph resized to 256 px decodes ~10x faster.
    im.draft("L", (math.ceil(w * scale), math.ceil(h * scale)))
    im = im.convert("L")  # forces the decode: errors surface here
    im = resize_short_side(im, size)
    return np.asarray(im, dtype=np.uint8)


def encode_image(img: np.ndarray, fmt: str, quality: int = 95) -> bytes:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  if fmt == "jpeg":
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
  else:
    Image.fromarray(img).save(buf, format="PNG")
  return buf.getvalue()


def read_back(pixels: np.ndarray, cfg: Any) -> np.ndarray:
  """uint8 [H, W] -> the same, encoded in the format of a build with ``cfg`` (``image_format``,
  ``jpeg_quality``) and decoded again: what that build's readers get for these pixels."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(io.BytesIO(encode_image(pixels, cfg.image_format, cfg.jpeg_quality))) as im:
    return np.asarray(im)


def stored_image(film: Path | io.BytesIO, cfg: MimicCXRConfig) -> np.ndarray:
  """A MIMIC-CXR-JPG film -> uint8 [H, W], the image a build with ``cfg`` stores for it, as it
  reads back (resized, then encoded in the build's format)."""
  return read_back(load_cxr(film, cfg.image_size), cfg)


def published_jpg(pixels: np.ndarray) -> io.BytesIO:
  """A DICOM radiograph's pixels (``radjax.data.dicom.read_radiograph``) -> the JPEG file
  MIMIC-CXR-JPG publishes for such a DICOM, by the conversion its paper describes (Johnson et
  al. 2019): min-max scaled to 8 bits, histogram-equalised, JPEG quality 95."""
  from radjax.data import dicom  # pylint: disable=import-outside-toplevel
  film = dicom.equalize_histogram(dicom.min_max_to_uint8(pixels))
  return io.BytesIO(encode_image(film, "jpeg", 95))


@dataclasses.dataclass(frozen=True)
class _Image:
  dicom_id: str
  view: str
  path: str


@dataclasses.dataclass(frozen=True)
class _Item:
  key: str
  study_id: str
  subject_id: str
  report_rel: str  # pXX/pSUBJECT/sSTUDY.txt
  images: tuple[_Image, ...]  # candidates, in preference order
  labels: tuple[tuple[str, float], ...]
  attributes: tuple[tuple[str, str], ...] = ()  # sex and age band, with demographics


@dataclasses.dataclass(frozen=True)
class _Patient:
  """A MIMIC-IV patients row: date of death, and what the demographics attributes need."""
  dod: dt.date | None
  sex: str
  anchor_age: int | None
  anchor_year: int | None

  def age_at(self, t: dt.datetime) -> float | None:
    if self.anchor_age is None or self.anchor_year is None:
      return None
    return float(self.anchor_age + t.year - self.anchor_year)


class _Reports:
  """Reads report texts from the extracted files or the zip (thread-safe)."""

  def __init__(self, folder: Path | None, zip_path: Path | None):
    self.folder = folder
    self.zip_path = zip_path
    self._zip = None
    self._members: dict[str, str] = {}
    self._lock = threading.Lock()
    if zip_path is not None:
      self._zip = zipfile.ZipFile(zip_path)
      for name in self._zip.namelist():
        if name.endswith(".txt"):
          parts = name.split("/")
          if len(parts) >= 3:
            self._members["/".join(parts[-3:])] = name

  def describe(self, rel: str) -> str:
    if self.folder is not None and (self.folder / "files" / rel).exists():
      return str(self.folder / "files" / rel)
    if self.zip_path is not None:
      return f"{self.zip_path}!files/{rel}"
    return str((self.folder or Path(".")) / "files" / rel)

  def read(self, rel: str) -> str | None:
    if self.folder is not None:
      p = self.folder / "files" / rel
      if p.is_file():
        return p.read_text(encoding="utf-8", errors="replace")
    if self._zip is not None and rel in self._members:
      with self._lock:  # ZipFile reads share one file handle
        return self._zip.read(self._members[rel]).decode("utf-8", errors="replace")
    return None

  def close(self):
    if self._zip is not None:
      self._zip.close()


class MimicCXRBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """MIMIC-CXR-JPG with CheXpert/NegBio labels and MIMIC-IV outcomes (see module docstring)."""

  name = "mimic_cxr"
  DIAGNOSTIC_LABELS = CHEXPERT_LABELS
  PROGNOSTIC_LABELS = OUTCOME_LABELS
  ATTRIBUTES = ("view",)  # a feature of its own that `radjax evaluate --by` groups by
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [_DEFAULT]
  DEFAULT_CONFIG_NAME = "default"
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
  RADJAX_OWN_PROGRESS = True  # generates through BuildContext.map (radjax.data.build)

  check_manual_dir = staticmethod(check_manual_dir)
  make_config = staticmethod(make_config)

  def __init__(self, *, mimic_iv_dir: str | None = None, reports: str | None = None, **kwargs):
    """mimic_iv_dir: MIMIC-IV root or hosp folder (default: searched under manual_dir).
    reports: the reports zip or the folder holding files/pXX/... (default: manual_dir)."""
    self._mimic_iv_dir = mimic_iv_dir
    self._reports_path = reports
    super().__init__(**kwargs)

  @property
  def cfg(self) -> MimicCXRConfig:
    return self.builder_config  # type: ignore[return-value]

  def label_names(self) -> tuple[str, ...]:
    return CHEXPERT_LABELS + (OUTCOME_LABELS if self.cfg.outcomes else ())

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="MIMIC-CXR-JPG radiographs with report sections, CheXpert/NegBio labels and "
                    "MIMIC-IV 12-month readmission/mortality.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 1), encoding_format=self.cfg.image_format),
            "report": tfds.features.Text(),
            "id": tfds.features.Text(),
            "patient_id": tfds.features.Text(),
            "dicom_id": tfds.features.Text(),
            "view": tfds.features.Text(),
            "labels": tfds.features.FeaturesDict({n: np.float32 for n in self.label_names()}),
            **({"attributes": tfds.features.FeaturesDict({"sex": tfds.features.Text(), "age": tfds.features.Text()})}
               if self.cfg.demographics else {}),
        }),
        homepage="https://physionet.org/content/mimic-cxr-jpg/",
    )

  # --------------------------------------------------------------------------- index

  def _split_generators(self, dl_manager):
    manual = Path(dl_manager.manual_dir)
    check_manual_dir(manual, config=self.cfg, mimic_iv_dir=self._mimic_iv_dir, reports=self._reports_path)
    items = self._index(manual)
    reports = _Reports(*_find_reports(manual, self._reports_path))
    ctx = build_context(self)
    gens = {}
    for split in ("train", "validation", "test"):
      if items[split]:
        gens[split] = self._generate_examples(items=items[split], split=split, reports=reports)
      else:
        ctx.drops.warn("empty_split", id=split)
    return gens

  def _index(self, manual: Path) -> dict[str, list[_Item]]:
    """Joins the CSVs into per-split lists of studies; logs row-level drops."""
    cfg = self.cfg
    log = build_context(self).drops
    meta_path = _cxr_table(manual, "metadata")
    split_path = _cxr_table(manual, "split")
    label_path = _cxr_table(manual, cfg.labeler)

    # dicom_id -> split; subject -> splits (every row counts towards straddling).
    dicom_split: dict[str, str] = {}
    subject_splits: dict[str, set[str]] = {}
    for line, row in read_table(split_path, required=("dicom_id", "study_id", "subject_id", "split")):
      dicom, subject = (row.get("dicom_id") or "").strip(), (row.get("subject_id") or "").strip()
      split = SPLITS.get((row.get("split") or "").strip().lower())
      if not row_is_complete(row) or not dicom or not subject.isdigit() or split is None:
        log.drop("malformed_row", path=f"{split_path}:{line}", detail="split file")
        continue
      dicom_split[dicom] = split
      subject_splits.setdefault(subject, set()).add(split)

    # Metadata: group selected images by study.
    studies: dict[str, dict[str, Any]] = {}
    order = {v: i for i, v in enumerate(cfg.views or _DEFAULT_VIEW_ORDER)}
    for line, row in read_table(meta_path, required=("dicom_id", "subject_id", "study_id", "ViewPosition",
                                                     "StudyDate", "StudyTime")):
      dicom = (row.get("dicom_id") or "").strip()
      subject, study = (row.get("subject_id") or "").strip(), (row.get("study_id") or "").strip()
      if not row_is_complete(row) or not dicom or not subject.isdigit() or not study.isdigit():
        log.drop("malformed_row", path=f"{meta_path}:{line}", detail="metadata file")
        continue
      try:
        t = parse_study_datetime(row["StudyDate"], row["StudyTime"])
      except (ValueError, TypeError, OverflowError):
        log.drop("malformed_row", path=f"{meta_path}:{line}", id=dicom, detail="StudyDate/StudyTime")
        continue
      view = (row.get("ViewPosition") or "").strip().upper()
      entry = studies.setdefault(study, {"subject": subject, "t0": t, "images": [], "splits": set()})
      if entry["subject"] != subject:
        log.drop("malformed_row", path=f"{meta_path}:{line}", id=dicom,
                 detail=f"study {study} listed under subjects {entry['subject']} and {subject}")
        continue
      entry["t0"] = min(entry["t0"], t)
      if cfg.views and view not in cfg.views:
        log.filter("view")
        continue
      if dicom not in dicom_split:
        log.drop("split_row_missing", id=dicom, detail=f"study {study}")
        continue
      entry["splits"].add(dicom_split[dicom])
      rel = f"p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
      entry["images"].append(_Image(dicom, view, str(manual / "files" / rel)))

    labels = self._read_labels(label_path, log)
    hosp = find_mimic_iv_hosp(manual, self._mimic_iv_dir) if cfg.outcomes or cfg.demographics else None
    patients = self._patients(hosp, {e["subject"] for e in studies.values()}, log) if hosp else {}
    outcomes = self._outcomes(hosp, studies, patients, log) if cfg.outcomes else {}

    items: dict[str, list[_Item]] = {"train": [], "validation": [], "test": []}
    for study in sorted(studies, key=int):
      entry = studies[study]
      images = sorted(entry["images"], key=lambda im: (order.get(im.view, len(order)), im.view, im.dicom_id))
      if not images:
        continue  # every image filtered out (counted) or dropped (counted)
      subject = entry["subject"]
      if len(subject_splits.get(subject, ())) > 1 or len(entry["splits"]) > 1:
        found = sorted(subject_splits.get(subject, set()) | entry["splits"])
        for _ in images if cfg.images_per_study == "all" else images[:1]:
          log.drop("patient_straddles_splits", id=study, detail=f"subject {subject} in {found}")
        continue
      split = next(iter(entry["splits"]))
      if study not in labels:
        for _ in images if cfg.images_per_study == "all" else images[:1]:
          log.drop("label_row_missing", id=study, detail=f"{label_path.name}", split=split)
        continue
      row_labels = labels[study]
      if row_labels is None:  # malformed label row, already counted
        continue
      values = dict(zip(CHEXPERT_LABELS, row_labels))
      if cfg.outcomes:
        values.update(outcomes[study])
      label_tuple = tuple((n, values[n]) for n in self.label_names())
      attributes = ()
      if cfg.demographics:
        person = patients.get(subject)
        attributes = (("sex", person.sex if person else ""),
                      ("age", age_band(person.age_at(entry["t0"]) if person else None)))
      report_rel = f"p{subject[:2]}/p{subject}/s{study}.txt"
      if cfg.images_per_study == "one":
        if len(images) > 1:
          log.filter("other_images_of_study", len(images) - 1)
        items[split].append(_Item(study, study, subject, report_rel, tuple(images), label_tuple, attributes))
      else:
        for im in images:
          items[split].append(_Item(im.dicom_id, study, subject, report_rel, (im,), label_tuple, attributes))
    return items

  def _read_labels(self, path: Path, log) -> dict[str, tuple[float, ...] | None]:
    """study_id -> 14 floats, or None for a malformed row (dropped here)."""
    out: dict[str, tuple[float, ...] | None] = {}
    for line, row in read_table(path, required=("subject_id", "study_id") + CHEXPERT_LABELS):
      study = (row.get("study_id") or "").strip()
      values = None
      if row_is_complete(row) and study.isdigit():
        try:
          values = tuple(_LABEL_VALUES[(row[c] or "").strip()] for c in CHEXPERT_LABELS)
        except KeyError:
          values = None
      if values is None:
        log.drop("malformed_row", path=f"{path}:{line}", id=study or None, detail="label file")
        if study.isdigit():
          out[study] = None
        continue
      if study in out and out[study] is not None and not _same(out[study], values):
        log.drop("malformed_row", path=f"{path}:{line}", id=study, detail="conflicting duplicate label row")
        out[study] = None
        continue
      if study not in out:
        out[study] = values
    return out

  def _patients(self, hosp: Path, subjects: set[str], log) -> dict[str, _Patient]:
    """MIMIC-IV's patients table, for ``subjects``."""
    def integer(value: str | None) -> int | None:
      value = (value or "").strip()
      return int(value) if value.isdigit() else None

    patients = {}
    pat_path = _table(hosp, "patients")
    for line, row in read_table(pat_path, required=("subject_id", "dod")):
      subject = (row.get("subject_id") or "").strip()
      if subject not in subjects:
        continue
      try:
        dod = _parse_dt(row.get("dod"))
      except ValueError:
        log.warn("malformed_patient_row", path=f"{pat_path}:{line}")
        continue
      patients[subject] = _Patient(dod.date() if dod is not None else None, (row.get("gender") or "").strip(),
                                   integer(row.get("anchor_age")), integer(row.get("anchor_year")))
    return patients

  def _outcomes(self, hosp: Path, studies: dict[str, dict[str, Any]], patients: dict[str, _Patient],
                log) -> dict[str, dict[str, float]]:
    subjects = {e["subject"] for e in studies.values()}
    admissions: dict[str, list[Admission]] = {}
    adm_path = _table(hosp, "admissions")
    for line, row in read_table(adm_path, required=("subject_id", "admittime", "dischtime")):
      subject = (row.get("subject_id") or "").strip()
      if subject not in subjects:
        continue
      try:
        adm = Admission(_parse_dt(row.get("admittime")), _parse_dt(row.get("dischtime")),
                        _parse_dt(row.get("edregtime")))
        if adm.admittime is None:
          raise ValueError("no admittime")
      except (ValueError, TypeError):
        log.warn("malformed_admission_row", path=f"{adm_path}:{line}")
        continue
      admissions.setdefault(subject, []).append(adm)
    out = {}
    for study, entry in studies.items():
      subject, t0 = entry["subject"], entry["t0"]
      if subject not in patients:
        if entry["images"]:
          log.warn("subject_not_in_mimic_iv", id=study, detail=f"subject {subject}")
        out[study] = {"readmission_12m": math.nan, "mortality_12m": math.nan}
        continue
      mort = mortality_12m(t0, patients[subject].dod)
      if math.isnan(mort) and entry["images"]:
        log.warn("dod_before_study", id=study, detail=f"subject {subject}")
      out[study] = {"readmission_12m": readmission_12m(t0, admissions.get(subject, [])),
                    "mortality_12m": mort}
    return out

  # --------------------------------------------------------------------------- examples

  def _generate_examples(self, items: list[_Item], split: str, reports: _Reports):
    cfg = self.cfg
    ctx = build_context(self)

    def process(item: _Item):
      report_path = reports.describe(item.report_rel)
      text = reports.read(item.report_rel)
      if text is None:
        return Drop("missing_report", path=report_path)
      if not text.strip():
        return Drop("empty_report", path=report_path)
      section = reports_lib.extract_section(text, cfg.section)
      if not section:
        return Drop("empty_report", path=report_path, detail=f"no {cfg.section} section")
      out: list[Any] = []
      for im in item.images:
        path = Path(im.path)
        if not path.is_file():
          out.append(Drop("missing_image", path=im.path))
          continue
        try:
          pixels = load_cxr(path, cfg.image_size)
        except Exception as e:  # pylint: disable=broad-except  # PIL raises many types
          out.append(Drop("corrupt_image", path=im.path, detail=type(e).__name__))
          continue
        out.append((item.key, {
            "image": encode_image(pixels, cfg.image_format, cfg.jpeg_quality),
            "report": section,
            "id": item.study_id,
            "patient_id": item.subject_id,
            "dicom_id": im.dicom_id,
            "view": im.view,
            "labels": {n: np.float32(v) for n, v in item.labels},
            **({"attributes": dict(item.attributes)} if cfg.demographics else {}),
        }))
        break
      return out

    yield from ctx.map(process, items, split=split, key=repr, chunk_size=512,
                       salt=repr([getattr(cfg, f) for f in _CONFIG_FIELDS]))


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
  return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))
