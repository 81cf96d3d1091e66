"""INSPECT (Stanford AIMI: CT pulmonary angiograms + impressions + outcomes) from a user's copy.

Both public layouts of ``manual_dir`` are read (file names are found by prefix, so date
suffixes do not matter; when several dated copies exist the newest name is used):

(a) v2 CSVs, joined on ``impression_id``::

    Final_metadata*.csv      impression_id, image_id (= NIfTI file name, "....nii.gz"), person_id,
                             procedure_DATETIME, ...
    Final_labels*.csv        impression_id + pe_positive_nlp, 1_month_mortality, 6_month_mortality,
                             12_month_mortality, 1_month_readmission, 6_month_readmission,
                             12_month_readmission, 12_month_PH
    Final_splits*.csv        impression_id, split (train / valid / test)
    Final_impressions*.csv   impression_id, impressions
    CTPA/*.nii.gz            the volumes (or anon_nii_gz/, or ``volume_dir=``; searched recursively)

(b) the 2025 TSV release::

    labels_YYYYMMDD.tsv, impressions_YYYYMMDD.tsv, splits_YYYYMMDD.tsv,
    study_mapping_YYYYMMDD.tsv (impression_id -> image_id / person_id / procedure_DATETIME),
    CTPA/*.nii.gz

``layout="auto"`` (default) uses the TSV release when all four of its tables are present,
else the v2 CSVs. Column names are matched case-insensitively; ``image_id`` may carry the
``.nii.gz`` suffix or not.

Labels (for the README): one float32 per task, keyed by the INSPECT column name;
``True`` -> 1.0, ``False`` -> 0.0 (any case; 1/0 too), ``Censored``/``Censor`` or blank ->
NaN: censored outcomes are masked, never counted as negatives. The outcome definitions
(mortality, readmission, pulmonary hypertension within 1/6/12 months of the CTPA) are
INSPECT's own. Splits: train / valid / test -> TFDS train / validation / test. A
person_id found in more than one split has all its examples dropped.

Example: ``image`` uint8 [H, W, 3] multi-window projection, ``slices`` uint8 [S, H, W, 3]
(see ``radjax.data.ct`` for both), ``report`` (the impression, whitespace and ``___``
normalised), ``id`` (impression_id), ``patient_id`` (person_id), ``image_id``, ``labels``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from radjax.data import ct as ct_lib
from radjax.data import reports as reports_lib
from radjax.data.build import Drop, build_context, override_fields, read_table, row_is_complete

TASKS = ("pe_positive_nlp", "1_month_mortality", "6_month_mortality", "12_month_mortality",
         "1_month_readmission", "6_month_readmission", "12_month_readmission", "12_month_PH")
SPLITS = {"train": "train", "valid": "validation", "validation": "validation", "validate": "validation",
          "val": "validation", "test": "test"}
_VALUES = {"true": 1.0, "1": 1.0, "1.0": 1.0, "false": 0.0, "0": 0.0, "0.0": 0.0,
           "censored": math.nan, "censor": math.nan, "": math.nan}
_VOLUME_DIRS = ("CTPA", "ctpa", "anon_nii_gz", "volumes", "images")

MANUAL_INSTRUCTIONS = """\
manual_dir must be your INSPECT copy (Stanford AIMI), in either public layout:
  v2:   Final_metadata*.csv, Final_labels*.csv, Final_splits*.csv, Final_impressions*.csv
  2025: labels_YYYYMMDD.tsv, impressions_YYYYMMDD.tsv, study_mapping_YYYYMMDD.tsv, splits_YYYYMMDD.tsv
and the CT volumes as .nii.gz under CTPA/ (or anon_nii_gz/, or pass --builder_arg volume_dir=DIR).
Reading volumes needs nibabel: pip install 'radjax[inspect]'."""


@dataclasses.dataclass(eq=False)
class InspectConfig(tfds.core.BuilderConfig):
  """CT-to-image settings (see radjax.data.ct.CTConfig) and the label tasks kept."""
  image_size: int = 256
  num_slices: int = 16
  slice_spacing_mm: float = 5.0
  windows: tuple[str, ...] = ct_lib.DEFAULT_WINDOWS
  projection: str = "mean"
  projection_axis: str = "coronal"
  tasks: tuple[str, ...] = TASKS

  def __post_init__(self):
    self.windows = tuple(self.windows)
    self.tasks = tuple(self.tasks)
    self.ct_config()  # validates
    if not self.tasks:
      raise ValueError("InspectConfig.tasks is empty")

  def ct_config(self) -> ct_lib.CTConfig:
    return ct_lib.CTConfig(image_size=self.image_size, num_slices=self.num_slices,
                           slice_spacing_mm=float(self.slice_spacing_mm), windows=tuple(self.windows),
                           projection=self.projection, projection_axis=self.projection_axis)


_CONFIG_FIELDS = ("image_size", "num_slices", "slice_spacing_mm", "windows", "projection", "projection_axis",
                  "tasks")
_DEFAULT = InspectConfig(name="default", description="256 px, 16 slices at 5 mm, lung/PE/mediastinal windows")


def make_config(**overrides: Any) -> InspectConfig:
  """A config from field overrides ("default" when nothing changes; else ``name`` or a derived one)."""
  name = overrides.pop("name", None)
  fields = override_fields(_DEFAULT, _CONFIG_FIELDS, overrides, "INSPECT")
  if name is None:
    if all(fields[f] == getattr(_DEFAULT, f) for f in _CONFIG_FIELDS):
      return _DEFAULT
    name = (f"{fields['image_size']}px_{fields['num_slices']}x{fields['slice_spacing_mm']:g}mm_"
            f"{'-'.join(fields['windows'])}_{fields['projection']}-{fields['projection_axis']}")
    if tuple(fields["tasks"]) != TASKS:
      name += "_" + "-".join(fields["tasks"])
  return InspectConfig(name=name, **fields)


def _resolve_config(config: Any) -> InspectConfig:
  if config is None or config == "default":
    return _DEFAULT
  if isinstance(config, InspectConfig):
    return config
  if isinstance(config, dict):
    return make_config(**config)
  raise ValueError(f"unknown INSPECT config {config!r}")


# ----------------------------------------------------------------------------- files

def _newest(folder: Path, pattern: re.Pattern) -> Path | None:
  matches = sorted(p for p in folder.iterdir() if p.is_file() and pattern.fullmatch(p.name))
  return matches[-1] if matches else None


_V2 = {
    "metadata": re.compile(r"final_metadata.*\.csv(\.gz)?", re.I),
    "labels": re.compile(r"final_labels.*\.csv(\.gz)?", re.I),
    "splits": re.compile(r"final_splits.*\.csv(\.gz)?", re.I),
    "impressions": re.compile(r"final_impressions.*\.csv(\.gz)?", re.I),
}
_TSV = {
    "metadata": re.compile(r"study_mapping_.*\.tsv(\.gz)?", re.I),
    "labels": re.compile(r"labels_.*\.tsv(\.gz)?", re.I),
    "splits": re.compile(r"splits_.*\.tsv(\.gz)?", re.I),
    "impressions": re.compile(r"impressions_.*\.tsv(\.gz)?", re.I),
}


def find_tables(manual_dir: Path, layout: str = "auto") -> tuple[str, dict[str, Path]]:
  """("v2" | "2025", {"metadata", "labels", "splits", "impressions": path}); raises
  FileNotFoundError naming what is missing."""
  if layout not in ("auto", "v2", "2025"):
    raise ValueError(f"layout must be 'auto', 'v2' or '2025', got {layout!r}")
  found = {}
  for name, patterns in (("2025", _TSV), ("v2", _V2)):
    found[name] = {k: _newest(manual_dir, p) for k, p in patterns.items()}
  order = ["2025", "v2"] if layout == "auto" else [layout]
  for name in order:
    if all(found[name].values()):
      return name, found[name]  # type: ignore[return-value]
  missing = []
  for name in order:
    want = {"2025": {"metadata": "study_mapping_YYYYMMDD.tsv", "labels": "labels_YYYYMMDD.tsv",
                     "splits": "splits_YYYYMMDD.tsv", "impressions": "impressions_YYYYMMDD.tsv"},
            "v2": {"metadata": "Final_metadata*.csv", "labels": "Final_labels*.csv",
                   "splits": "Final_splits*.csv", "impressions": "Final_impressions*.csv"}}[name]
    missing.append(f"{name} layout: " + ", ".join(want[k] for k, v in found[name].items() if v is None))
  raise FileNotFoundError(f"INSPECT tables not found in {manual_dir}; missing:\n  " + "\n  ".join(missing)
                          + "\n" + MANUAL_INSTRUCTIONS)


def find_volume_dir(manual_dir: Path, volume_dir: str | os.PathLike | None = None) -> Path:
  if volume_dir is not None:
    p = Path(volume_dir).expanduser()
    if not p.is_dir():
      raise FileNotFoundError(f"INSPECT volume_dir {str(p)!r} does not exist")
    return p
  for name in _VOLUME_DIRS:
    if (manual_dir / name).is_dir():
      return manual_dir / name
  return manual_dir


def check_manual_dir(manual_dir: Path, *, config: Any = None, volume_dir: str | None = None,
                     layout: str = "auto") -> None:
  _resolve_config(config)
  find_tables(manual_dir, layout)
  find_volume_dir(manual_dir, volume_dir)
  ct_lib._nibabel()  # pylint: disable=protected-access  # fail before the build, not in it


def _columns(path: Path, header: list[str], wanted: dict[str, tuple[str, ...]]) -> dict[str, str]:
  """Maps our names to the file's column names (case-insensitive, with aliases)."""
  lower = {h.lower(): h for h in header}
  out = {}
  for ours, aliases in wanted.items():
    for alias in aliases:
      if alias.lower() in lower:
        out[ours] = lower[alias.lower()]
        break
    else:
      raise ValueError(f"{path}: no {ours!r} column (looked for {list(aliases)}); found {header}")
  return out


def _rows(path: Path, wanted: dict[str, tuple[str, ...]]):
  """Yields (line, row with our column names) and checks the columns once."""
  columns = None
  for line, row in read_table(path):
    if columns is None:
      columns = _columns(path, [k for k in row if k is not None], wanted)
    complete = row_is_complete(row)
    yield line, complete, {ours: (row.get(theirs) or "").strip() for ours, theirs in columns.items()}


def volume_file_name(image_id: str) -> str:
  image_id = image_id.strip()
  if image_id.endswith(".nii.gz") or image_id.endswith(".nii"):
    return image_id
  return image_id + ".nii.gz"


@dataclasses.dataclass(frozen=True)
class _Item:
  key: str
  person_id: str
  image_id: str
  volume: str  # path; may not exist (dropped as missing_image by the worker)
  report: str
  labels: tuple[tuple[str, float], ...]


class InspectBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """INSPECT CTPA volumes, impressions and outcome labels (see module docstring)."""

  name = "inspect"
  DIAGNOSTIC_LABELS = ("pe_positive_nlp",)
  PROGNOSTIC_LABELS = tuple(t for t in TASKS if t != "pe_positive_nlp")
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [_DEFAULT]
  DEFAULT_CONFIG_NAME = "default"
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
  RADJAX_OWN_PROGRESS = True  # generates through BuildContext.map (radjax.data.build)

  check_manual_dir = staticmethod(check_manual_dir)
  make_config = staticmethod(make_config)

  def __init__(self, *, volume_dir: str | None = None, layout: str = "auto", **kwargs):
    """volume_dir: folder of .nii.gz volumes (default: manual_dir/CTPA, anon_nii_gz, ...).
    layout: "auto" | "v2" | "2025" (see module docstring)."""
    self._volume_dir = volume_dir
    self._layout = layout
    super().__init__(**kwargs)

  @property
  def cfg(self) -> InspectConfig:
    return self.builder_config  # type: ignore[return-value]

  def _info(self) -> tfds.core.DatasetInfo:
    c = len(self.cfg.windows)
    return tfds.core.DatasetInfo(
        builder=self,
        description="INSPECT CT pulmonary angiograms as multi-window projections and slice stacks, with "
                    "impressions and PE / mortality / readmission / pulmonary-hypertension labels.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, c), encoding_format="png"),
            "slices": tfds.features.Sequence(
                tfds.features.Image(shape=(None, None, c), encoding_format="png"), length=self.cfg.num_slices),
            "report": tfds.features.Text(),
            "id": tfds.features.Text(),
            "patient_id": tfds.features.Text(),
            "image_id": tfds.features.Text(),
            "labels": tfds.features.FeaturesDict({t: np.float32 for t in self.cfg.tasks}),
        }),
        homepage="https://aimi.stanford.edu/datasets/inspect",
    )

  def _split_generators(self, dl_manager):
    manual = Path(dl_manager.manual_dir)
    items = self._index(manual)
    ctx = build_context(self)
    gens = {}
    for split in ("train", "validation", "test"):
      if items[split]:
        gens[split] = self._generate_examples(items=items[split], split=split)
      else:
        ctx.drops.warn("empty_split", id=split)
    return gens

  def _index(self, manual: Path) -> dict[str, list[_Item]]:
    log = build_context(self).drops
    layout, tables = find_tables(manual, self._layout)
    volume_dir = find_volume_dir(manual, self._volume_dir)
    volumes: dict[str, str] = {}
    for folder, _, files in os.walk(volume_dir):
      for f in files:
        if f.endswith(".nii.gz") or f.endswith(".nii"):
          volumes.setdefault(f, os.path.join(folder, f))

    splits: dict[str, str | None] = {}
    listed: set[str] = set()  # every impression_id of the splits file, malformed rows included
    for line, ok, row in _rows(tables["splits"], {"impression_id": ("impression_id",), "split": ("split",)}):
      imp, split = row["impression_id"], SPLITS.get(row["split"].lower()) if ok else None
      listed.add(imp)
      if not ok or not imp or split is None:
        log.drop("malformed_row", path=f"{tables['splits']}:{line}", id=imp or None, detail="splits file")
        continue
      if imp in splits and splits[imp] != split:
        log.drop("malformed_row", path=f"{tables['splits']}:{line}", id=imp, detail="conflicting split rows")
        splits[imp] = None
        continue
      splits.setdefault(imp, split)

    meta: dict[str, tuple[str, str] | None] = {}
    for line, ok, row in _rows(tables["metadata"], {"impression_id": ("impression_id",),
                                                    "image_id": ("image_id",),
                                                    "person_id": ("person_id", "patient_id")}):
      imp = row["impression_id"]
      if not ok or not imp or not row["image_id"] or not row["person_id"]:
        log.drop("malformed_row", path=f"{tables['metadata']}:{line}", id=imp or None, detail="metadata file")
        if imp:
          meta[imp] = None
        continue
      value = (volume_file_name(row["image_id"]), row["person_id"])
      if imp in meta and meta[imp] is not None and meta[imp] != value:
        log.drop("malformed_row", path=f"{tables['metadata']}:{line}", id=imp, detail="conflicting metadata rows")
        meta[imp] = None
        continue
      meta.setdefault(imp, value)

    tasks = self.cfg.tasks
    labels: dict[str, tuple[float, ...] | None] = {}
    wanted = {"impression_id": ("impression_id",), **{t: (t,) for t in tasks}}
    for line, ok, row in _rows(tables["labels"], wanted):
      imp = row["impression_id"]
      values = None
      if ok and imp:
        try:
          values = tuple(_VALUES[row[t].lower()] for t in tasks)
        except KeyError:
          values = None
      if values is None:
        log.drop("malformed_row", path=f"{tables['labels']}:{line}", id=imp or None, detail="labels file")
        if imp:
          labels[imp] = None
        continue
      labels.setdefault(imp, values)

    texts: dict[str, str] = {}
    for line, ok, row in _rows(tables["impressions"], {"impression_id": ("impression_id",),
                                                       "text": ("impressions", "impression", "text")}):
      if not ok or not row["impression_id"]:
        log.drop("malformed_row", path=f"{tables['impressions']}:{line}", detail="impressions file")
        continue
      texts.setdefault(row["impression_id"], row["text"])

    person_splits: dict[str, set[str]] = {}
    for imp, split in splits.items():
      if split is not None and meta.get(imp):
        person_splits.setdefault(meta[imp][1], set()).add(split)

    items: dict[str, list[_Item]] = {"train": [], "validation": [], "test": []}
    for imp in sorted(splits):
      split = splits[imp]
      if split is None:
        continue  # conflicting split rows: counted above
      if imp not in meta:
        log.drop("metadata_row_missing", id=imp, detail=tables["metadata"].name, split=split)
        continue
      if meta[imp] is None:
        continue  # malformed: counted above
      image_id, person = meta[imp]
      if len(person_splits[person]) > 1:
        log.drop("patient_straddles_splits", id=imp,
                 detail=f"person {person} in {sorted(person_splits[person])}", split=split)
        continue
      if imp not in labels:
        log.drop("label_row_missing", id=imp, detail=tables["labels"].name, split=split)
        continue
      if labels[imp] is None:
        continue
      if imp not in texts:
        log.drop("missing_report", id=imp, detail=tables["impressions"].name, split=split)
        continue
      report = reports_lib.normalize_text(texts[imp])
      if not report:
        log.drop("empty_report", id=imp, detail=tables["impressions"].name, split=split)
        continue
      path = volumes.get(image_id, str(volume_dir / image_id))
      items[split].append(_Item(imp, person, image_id, path, report, tuple(zip(tasks, labels[imp]))))
    unused = sum(1 for imp in labels if imp not in listed)
    if unused:
      log.filter("not_in_splits_file", unused)
    return items

  def _generate_examples(self, items: list[_Item], split: str):
    ct_cfg = self.cfg.ct_config()
    ctx = build_context(self)

    def process(item: _Item):
      if not os.path.isfile(item.volume):
        return Drop("missing_image", path=item.volume, id=item.key)
      try:
        vol = ct_lib.load_nifti(item.volume)
      except ImportError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # nibabel/gzip/zlib raise many types
        return Drop("corrupt_image", path=item.volume, id=item.key, detail=type(e).__name__)
      inputs = ct_lib.volume_to_inputs(vol, ct_cfg)
      return (item.key, {
          "image": ct_lib.encode_png(inputs["image"]),
          "slices": [ct_lib.encode_png(s) for s in inputs["slices"]],
          "report": item.report,
          "id": item.key,
          "patient_id": item.person_id,
          "image_id": item.image_id,
          "labels": {n: np.float32(v) for n, v in item.labels},
      })

    # Chunks stay small: one CT's encoded slices are a few MB.
    yield from ctx.map(process, items, split=split, key=repr, chunk_size=16,
                       salt=repr([getattr(self.cfg, f) for f in _CONFIG_FIELDS]))
