"""Build a registered dataset into ArrayRecord files, with a data-quality report.

    report = build_dataset("mimic_cxr", data_dir="~/radjax_data", manual_dir="~/physionet/mimic-cxr-jpg/2.0.0")

writes ``DATA_DIR/NAME/[CONFIG/]VERSION/*.array_record-*`` through TFDS
(``file_format="array_record"``; TensorFlow is not needed: builders hand TFDS images as
already-encoded PNG/JPEG bytes, which TFDS stores without touching TensorFlow) and
``DATA_DIR/NAME/build_report.json``::

    {"splits":   {split: n_examples},
     "labels":   {split: {label: {"pos": n, "neg": n, "uncertain": n, "missing": n}}},
     "dropped":  {reason: n},                       # data-quality drops
     "dropped_examples": [{"path" or "id": ..., "reason": ..., "split"?: ..., "detail"?: ...}],
     "filtered": {reason: n},                       # excluded on purpose by the config (e.g. view)
     "warnings": {reason: n},                       # oddities that did not drop an example
     ...provenance: dataset, config, version, data_dir, manual_dir, strict, elapsed_s}

Labels are counted from the examples as written: 1 -> pos, 0 -> neg, -1 -> uncertain,
NaN -> missing (blank / censored / not mentioned).

Builder protocol (how a TFDS builder takes part; SynthCXRBuilder needs none of it):
- ``build_context(builder)`` returns the builder's ``BuildContext``: ``ctx.drops`` (a
  ``DropLog``) and ``ctx.map(fn, items, split=..., key=...)``, which runs ``fn`` over the
  items with a thread pool, a progress bar and an on-disk chunk cache (interrupted builds
  resume from the last finished chunk), yields ``fn``'s ``(key, example)`` results in
  order and logs the ``Drop`` results it returns. Builders used outside ``build_dataset``
  (plain ``tfds`` calls) get a default, non-strict context.
- Data-quality problems are reported with ``ctx.drops.drop(reason, path=... or id=...)``
  (or by returning a ``Drop`` from a ``ctx.map`` function) and never raise, except in
  strict mode, where the first drop raises ``DataQualityError`` naming the file/row.
  Standard reasons: see ``REASONS``.
- Optional class attributes/methods: ``RADJAX_OWN_PROGRESS = True`` (the builder
  generates through ``ctx.map``, whose progress bars replace TFDS's),
  ``MANUAL_DOWNLOAD_INSTRUCTIONS`` (TFDS; means the builder needs ``manual_dir``),
  ``complete_config(manual_dir, config, **builder_kwargs)`` (the config with the fields that
  depend on the files filled in, e.g. image_table's label columns, found in its table),
  ``check_manual_dir(manual_dir, **builder_kwargs)``
  (raise ``FileNotFoundError`` naming the expected files), ``make_config(**overrides)``
  (turns ``builder_kwargs["config"]`` given as a dict into a BuilderConfig).

Resumability: re-running a finished build does nothing (and says so). A build that
stops half-way leaves its finished preprocessing chunks under
``DATA_DIR/NAME/.build_cache/``; the next run reuses them (TFDS itself then rewrites the
ArrayRecord shards, which is cheap next to decoding images/volumes). The cache is
removed when the build succeeds. Parallelism: preprocessing (image decoding, resizing,
CT resampling) runs in ``num_workers`` threads (PIL, zlib and numpy release the GIL);
TFDS writes the shards sequentially.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import gzip
import hashlib
import inspect
import io
import itertools
import json
import logging
import math
import os
import pickle
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from radjax import paths
from radjax.config import parse_value

# Standard drop reasons (builders may add their own; keep them snake_case).
REASONS = {
    "missing_image": "image/volume file not found",
    "corrupt_image": "image/volume file unreadable or corrupt",
    "missing_report": "report file/row not found",
    "empty_report": "report (or the configured section of it) is empty",
    "label_row_missing": "no label row for the example",
    "metadata_row_missing": "no metadata/mapping row for the example",
    "split_row_missing": "no split row for the example",
    "malformed_row": "a row with missing/invalid fields",
    "patient_straddles_splits": "the patient's examples are in more than one split",
}
REPORT_NAME = "build_report.json"
_END = object()
MAX_DROPPED_EXAMPLES = 100_000


class DataQualityError(ValueError):
  """A strict build met a file or row it would otherwise have skipped."""


@dataclasses.dataclass
class Drop:
  """One skipped example/file/row. ``detail`` must never contain report text."""
  reason: str
  path: str | None = None
  id: str | None = None
  detail: str | None = None
  split: str | None = None

  def as_dict(self) -> dict[str, str]:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

  def describe(self) -> str:
    where = self.path or (f"id {self.id}" if self.id is not None else "?")
    extra = f" ({self.detail})" if self.detail else ""
    return f"{where}: {self.reason}{extra}"


class DropLog:
  """Counts what a build skipped, excluded or found odd.

  drop(): a data-quality skip (missing/corrupt file, bad row): counted by reason and
    listed with its path or id; in strict mode raises DataQualityError instead.
  filter(): an exclusion the config asked for (e.g. a lateral view): counted only.
  warn(): something odd that did not drop the example (e.g. a death date before the
    study, which masks that label): counted, listed with its path or id, never raises.
  """

  def __init__(self, strict: bool = False, max_examples: int = MAX_DROPPED_EXAMPLES):
    self.strict = strict
    self.max_examples = max_examples
    self.dropped: dict[str, int] = {}
    self.dropped_examples: list[dict[str, str]] = []
    self.filtered: dict[str, int] = {}
    self.warnings: dict[str, int] = {}
    self.warning_examples: list[dict[str, str]] = []

  def add(self, drop: Drop) -> None:
    if self.strict:
      raise DataQualityError(f"strict build: {drop.describe()}")
    self.dropped[drop.reason] = self.dropped.get(drop.reason, 0) + 1
    if len(self.dropped_examples) < self.max_examples:
      self.dropped_examples.append(drop.as_dict())

  def drop(self, reason: str, *, path: str | os.PathLike | None = None, id: Any = None,
           detail: str | None = None, split: str | None = None) -> None:
    self.add(Drop(reason, None if path is None else str(path),
                  None if id is None else str(id), detail, split))

  def filter(self, reason: str, n: int = 1) -> None:
    self.filtered[reason] = self.filtered.get(reason, 0) + n

  def warn(self, reason: str, *, path: str | os.PathLike | None = None, id: Any = None,
           detail: str | None = None) -> None:
    self.warnings[reason] = self.warnings.get(reason, 0) + 1
    if len(self.warning_examples) < self.max_examples:
      self.warning_examples.append(
          Drop(reason, None if path is None else str(path),
               None if id is None else str(id), detail).as_dict())

  @property
  def num_dropped(self) -> int:
    return sum(self.dropped.values())


@dataclasses.dataclass
class BuildContext:
  """What ``build_dataset`` hands a builder (see the module docstring)."""
  drops: DropLog = dataclasses.field(default_factory=DropLog)
  num_workers: int = 0  # 0: min(4, cpu count)
  cache_dir: Path | None = None
  progress: bool = True
  desc: str = ""

  def workers(self) -> int:
    return self.num_workers if self.num_workers > 0 else max(1, min(4, os.cpu_count() or 1))

  def map(self, fn: Callable[[Any], Any], items: Sequence[Any], *, split: str,
          key: Callable[[Any], str], chunk_size: int = 256, salt: str = "") -> Iterator[Any]:
    """Yields ``fn(item)`` for each item, in order, skipping (and logging) ``Drop`` results.

    fn: item -> a (key, example) tuple, a Drop, or a list of those (e.g. the drops of
      unusable files followed by the example built from a usable one). Runs in threads;
      must not touch shared state.
    key: item -> a stable string naming the item's inputs; with ``salt`` (the builder's
      config) it names the cache chunk, so changed inputs or configs are recomputed.
    """
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    cache = None
    if self.cache_dir is not None:
      cache = self.cache_dir / split
      cache.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(items), desc=f"{self.desc} {split}".strip(), unit=" ex",
               disable=not self.progress, mininterval=1.0, dynamic_ncols=True)
    pool = concurrent.futures.ThreadPoolExecutor(self.workers()) if self.workers() > 1 else None
    try:
      for c, start in enumerate(range(0, len(items), chunk_size)):
        chunk = items[start:start + chunk_size]
        results = None
        path = None
        if cache is not None:
          digest = hashlib.sha1(
              json.dumps([salt, [key(it) for it in chunk]]).encode()).hexdigest()[:16]
          path = cache / f"chunk{c:06d}_{digest}.pkl"
          if path.exists():
            try:
              with open(path, "rb") as f:
                results = pickle.load(f)
            except Exception:  # a torn cache file: recompute the chunk
              results = None
        if results is None:
          results = list(pool.map(fn, chunk)) if pool is not None else [fn(it) for it in chunk]
          if path is not None:
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
              pickle.dump(results, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        for result in results:
          bar.update(1)
          for out in (result if isinstance(result, list) else [result]):
            if isinstance(out, Drop):
              if out.split is None:
                out = dataclasses.replace(out, split=split)
              self.drops.add(out)
            else:
              yield out
    finally:
      bar.close()
      if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def build_context(builder: Any) -> BuildContext:
  """The builder's BuildContext; a default (non-strict, no cache) one outside build_dataset."""
  ctx = getattr(builder, "_radjax_ctx", None)
  if ctx is None:
    ctx = BuildContext(desc=getattr(builder, "name", ""))
    builder._radjax_ctx = ctx  # pylint: disable=protected-access
  return ctx


# ----------------------------------------------------------------------------- tables

def open_text(path: str | os.PathLike) -> io.TextIOBase:
  """Opens a text file, transparently gunzipping ``*.gz``; UTF-8 (a BOM is skipped)."""
  path = str(path)
  if path.endswith(".gz"):
    return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
  return open(path, "r", encoding="utf-8-sig", newline="")


@contextlib.contextmanager
def _opened_table(path: str) -> Iterator[tuple[Any, list[str]]]:
  """(a csv reader past the header row, the stripped header) of a table; the file cannot be
  read, while open or while the caller reads rows, raises ValueError naming it."""
  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
  try:
    with open_text(path) as f:
      reader = csv.reader(f, delimiter=_delimiter(path))
      header = next(reader, None)
      if header is None:
        raise ValueError(f"{path}: empty table (no header row)")
      yield reader, [h.strip() for h in header]
  except (OSError, EOFError, csv.Error, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: cannot be read as a table: {type(e).__name__}: {e}") from e


def read_table(path: str | os.PathLike, required: Iterable[str] = ()) -> Iterator[tuple[int, dict[str, str | None]]]:
  """Yields (the row's first line number, row dict) from a CSV/TSV (``.tsv``/``.tsv.gz`` -> tab), gzipped or not.

  Header names are stripped; a row with too few or too many fields has ``None`` values
  or a ``None`` key (see ``row_is_complete``). Raises ValueError naming the file when a
  ``required`` column is missing or the file cannot be read as a table (e.g. a
  truncated gzip).
  """
  path = str(path)
  with _opened_table(path) as (reader, header):
    missing = [c for c in required if c not in header]
    if missing:
      raise ValueError(f"{path}: missing column(s) {missing}; found {header}")
    first_line = reader.line_num + 1
    for values in reader:
      line, first_line = first_line, reader.line_num + 1  # a quoted field may span lines
      if not values or all(not v.strip() for v in values):
        continue
      row: dict[str | None, Any] = dict(zip(header, values))
      if len(values) < len(header):
        row.update({h: None for h in header[len(values):]})
      elif len(values) > len(header):
        row[None] = values[len(header):]
      yield line, row


def table_header(path: str | os.PathLike) -> list[str]:
  """The column names of a table ``read_table`` reads (stripped). Raises ValueError naming the
  file when it cannot be read or is empty."""
  with _opened_table(str(path)) as (_, header):
    return header


def _delimiter(path: str) -> str:
  return "\t" if path.removesuffix(".gz").endswith(".tsv") else ","


def row_is_complete(row: Mapping[Any, Any]) -> bool:
  """False for a row with a missing or an extra field."""
  return None not in row and all(v is not None for v in row.values())


# ----------------------------------------------------------------------------- build

def override_fields(defaults: Any, names: Sequence[str], overrides: Mapping[str, Any],
                    what: str) -> dict[str, Any]:
  """Fields ``names`` of builder config ``defaults`` with ``overrides`` applied, each converted to
  its default's type, so command-line strings work: "PA,AP" for a tuple of names, "false" for a
  bool, "512" for an int. An unknown field or a value of the wrong kind raises ValueError naming
  the field."""
  unknown = sorted(set(overrides) - set(names))
  if unknown:
    raise ValueError(f"unknown {what} config field(s) {unknown}; known: {list(names)}")
  fields = {name: getattr(defaults, name) for name in names}
  for name, value in overrides.items():
    fields[name] = _as_type_of(fields[name], value, f"{what} config field {name}")
  return fields


def _as_type_of(default: Any, value: Any, what: str) -> Any:
  where = f"{what}={value!r}"
  if isinstance(value, str):
    return parse_value(value, default, where)
  if isinstance(default, tuple) and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
    return tuple(value)
  if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if type(value) is type(default):  # so that True is no int
    return value
  raise ValueError(f"{where}: expected {type(default).__name__}"
                   + (" of names" if isinstance(default, tuple) else ""))


def _label_tally(labels: Mapping[str, Any], tally: dict[str, dict[str, int]]) -> None:
  for name, value in labels.items():
    counts = tally.setdefault(name, {"pos": 0, "neg": 0, "uncertain": 0, "missing": 0})
    v = float(value)
    if math.isnan(v):
      counts["missing"] += 1
    elif v == 1.0:
      counts["pos"] += 1
    elif v == 0.0:
      counts["neg"] += 1
    elif v == -1.0:
      counts["uncertain"] += 1
    else:  # soft labels: counted as positive mass would mislead, count them apart
      counts["other"] = counts.get("other", 0) + 1


def _wrap_split_generators(builder: Any, tallies: dict[str, dict[str, dict[str, int]]]) -> None:
  """Makes the builder's split generators count labels per split as examples are written,
  and fail with the example's key (never its content, which may hold report text) when an
  example does not match the features."""
  original = builder._split_generators  # pylint: disable=protected-access
  features = builder.info.features

  def counted(split: str, gen: Iterable[Any]) -> Iterator[Any]:
    tally = tallies.setdefault(split, {})
    for key, example in gen:
      try:
        features.encode_example(example)
      except Exception as e:  # pylint: disable=broad-except
        # TFDS's own message would print the whole example, report text included.
        detail = str(e)[:300]
        report = example.get("report") if isinstance(example, Mapping) else None
        if isinstance(report, (str, bytes)) and report and str(report)[:40] in detail:
          detail = "<message withheld: it quotes the report>"
        raise ValueError(f"{builder.name}: example {key!r} of split {split!r} does not match "
                         f"the dataset features: {type(e).__name__}: {detail}") from None
      labels = example.get("labels") if isinstance(example, Mapping) else None
      if isinstance(labels, Mapping):
        _label_tally(labels, tally)
      yield key, example

  def wrapped(dl_manager):
    gens = original(dl_manager)
    if not isinstance(gens, Mapping):
      return gens  # legacy list of SplitGenerators: leave untouched
    out = {}
    for split, gen in gens.items():
      if not hasattr(gen, "__iter__"):
        out[split] = gen  # a Beam PCollection
        continue
      # TFDS cannot write a split without examples, and whether every example of a split
      # is dropped (all its images corrupt, say) is only known by generating it: peek at
      # the first example and leave empty splits out (with a warning) instead of crashing.
      it = iter(gen)
      first = next(it, _END)
      if first is _END:
        build_context(builder).drops.warn("empty_split", id=str(split))
        continue
      out[split] = counted(str(split), itertools.chain([first], it))
    if gens and not out:
      log = build_context(builder).drops
      raise DataQualityError(f"{builder.name}: every example was dropped: {dict(sorted(log.dropped.items()))}; "
                             f"first drops: {log.dropped_examples[:5]}")
    return out

  builder._split_generators = wrapped  # pylint: disable=protected-access


def _write_json(path: Path, obj: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=False, allow_nan=False)
    f.write("\n")
  os.replace(tmp, path)


def format_summary(report: Mapping[str, Any], max_examples: int = 10) -> str:
  """A terminal summary of a build report (counts, paths and ids only; never report text)."""
  lines = [f"{report.get('dataset', '?')} ({report.get('config') or 'default'}, "
           f"v{report.get('version', '?')}) -> {report.get('data_dir', '?')}"]
  splits = report.get("splits", {})
  lines.append("  examples: " + ", ".join(f"{s} {n}" for s, n in splits.items())
               + f" (total {sum(splits.values())})")
  labels = report.get("labels", {})
  names = sorted({n for per in labels.values() for n in per})
  if names:
    width = max(len(n) for n in names)
    lines.append("  labels (pos/neg/uncertain/missing):")
    for name in names:
      cells = []
      for split in labels:
        c = labels[split].get(name)
        if c:
          cells.append(f"{split} {c['pos']}/{c['neg']}/{c['uncertain']}/{c['missing']}")
      lines.append(f"    {name:<{width}}  " + "  ".join(cells))
  dropped = report.get("dropped", {})
  if dropped:
    lines.append(f"  dropped {sum(dropped.values())}: "
                 + ", ".join(f"{r} {n}" for r, n in sorted(dropped.items())))
    for d in report.get("dropped_examples", [])[:max_examples]:
      lines.append(f"    {d.get('path') or 'id ' + str(d.get('id'))}: {d['reason']}"
                   + (f" ({d['detail']})" if d.get("detail") else ""))
    more = len(report.get("dropped_examples", [])) - max_examples
    if more > 0:
      lines.append(f"    ... {more} more in build_report.json")
  else:
    lines.append("  dropped: none")
  for key in ("filtered", "warnings"):
    if report.get(key):
      lines.append(f"  {key}: " + ", ".join(f"{r} {n}" for r, n in sorted(report[key].items())))
  return "\n".join(lines)


def _jsonable(value: Any) -> Any:
  if isinstance(value, (tuple, list)):
    return [_jsonable(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return repr(value)


def config_fields(builder: Any) -> dict[str, Any] | None:
  """The builder config's own fields (beyond TFDS's name/version/...), JSON-able, or None."""
  return builder_config_fields(getattr(builder, "builder_config", None))


def builder_config_fields(config: Any) -> dict[str, Any] | None:
  """A builder config's own fields (beyond TFDS's name/version/...), JSON-able, or None."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  if config is None or not dataclasses.is_dataclass(config):
    return None
  base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)
          if f.name not in base}


def _config_name(builder: Any) -> str | None:
  config = getattr(builder, "builder_config", None)
  return getattr(config, "name", None) if config is not None else None


def _resolve_builder_kwargs(cls: Any, builder_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
  kwargs = dict(builder_kwargs or {})
  own = [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind == p.KEYWORD_ONLY]
  unknown = sorted(set(kwargs) - set(own) - {"config"})
  if unknown:
    raise ValueError(f"{cls.name} takes no builder argument(s) {unknown}"
                     + (f"; it takes {', '.join(own)}" if own else ""))
  config = kwargs.get("config")
  if isinstance(config, Mapping):
    if not hasattr(cls, "make_config"):
      raise ValueError(f"{cls.__name__} takes no config overrides (got {sorted(config)})")
    kwargs["config"] = cls.make_config(**config)
  return kwargs


def check_manual_dir(cls: Any, name: str, manual_dir: str | os.PathLike | None,
                     builder_kwargs: Mapping[str, Any]) -> Path | None:
  """Fails early, naming the expected files, when a builder needs a manual_dir that is missing."""
  instructions = getattr(cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if not instructions:
    return Path(manual_dir).expanduser() if manual_dir else None
  if not manual_dir:
    raise ValueError(f"dataset {name!r} is built from your own copy of the data: pass "
                     f"--manual_dir DIR (manual_dir=...).\n{instructions}")
  path = Path(manual_dir).expanduser()
  if not path.is_dir():
    raise FileNotFoundError(f"manual_dir {str(path)!r} for dataset {name!r} does not exist or "
                            f"is not a directory.\n{instructions}")
  check = getattr(cls, "check_manual_dir", None)
  if check is not None:
    check(path, **{k: v for k, v in builder_kwargs.items() if k != "config"},
          config=builder_kwargs.get("config"))
  return path


class _ExpectedTfdsNotices(logging.Filter):
  """Drops TFDS's warnings about what radjax does on purpose: builds with unregistered configs
  (MIMIC-CXR variants, every image_table build), whose folders have no dataset_info.json until
  built. Printed at every build, they read as problems; they are not."""
  EXPECTED = ("Using custom data configuration", "Variant folder ")

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.EXPECTED)


# On the absl logger TFDS writes to, for as long as builds may run: only these two notices go.
logging.getLogger("absl").addFilter(_ExpectedTfdsNotices())


def build_dataset(name: str, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None,
                  strict: bool = False, builder_kwargs: Mapping[str, Any] | None = None, *,
                  num_workers: int = 0, progress: bool = True, verbose: bool = True,
                  keep_cache: bool = False) -> dict[str, Any]:
  """Builds dataset ``name`` (a key of ``radjax.data.builders``) into ``data_dir``.

  manual_dir: the user's copy of the raw data, for builders that need one (checked
    first; the error names the expected files).
  strict: the first file/row that would be skipped raises DataQualityError instead.
  builder_kwargs: passed to the builder class; ``config`` may be a config name, a
    BuilderConfig, or a dict of overrides (``{"image_size": 224, "views": ["PA"]}``).
  num_workers: preprocessing threads (0: min(4, cpus)).
  Returns the build report (see the module docstring); a finished build is not
  rebuilt: its report is returned as is (with ``"status": "already_built"``).
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from radjax.data.builders import get_builder_class  # pylint: disable=import-outside-toplevel

  cls = get_builder_class(name)
  kwargs = _resolve_builder_kwargs(cls, builder_kwargs)
  manual_path = check_manual_dir(cls, name, manual_dir, kwargs)
  complete = getattr(cls, "complete_config", None)
  if complete is not None:
    kwargs["config"] = complete(manual_path, kwargs.get("config"),
                                **{k: v for k, v in kwargs.items() if k != "config"})
  data_root = Path(paths.local_dir(data_dir, "--data_dir"))
  builder = cls(data_dir=str(data_root), file_format="array_record", **kwargs)
  version_dir = Path(str(builder.data_dir))
  top_report = data_root / name / REPORT_NAME
  version_report = version_dir / REPORT_NAME

  def say(msg: str) -> None:
    if verbose:
      print(msg, flush=True)

  def say_summary(report: Mapping[str, Any]) -> None:
    say(format_summary(report))
    if report.get("config") not in (None, "default"):
      say(f"  read it with --config.data.data_dir={data_root} --config.data.builder_config={report['config']}")

  fields = config_fields(builder)
  if builder.is_prepared():
    if version_report.exists():
      with open(version_report) as f:
        report = json.load(f)
      built_with = report.get("config_fields")
      if built_with is not None and fields is not None and built_with != fields:
        raise ValueError(f"{version_dir} was built with config {built_with}, not {fields}: give this "
                         f"config another name (or delete that folder to rebuild it)")
    else:  # built by plain TFDS: only the split sizes are known
      report = {"dataset": name, "config": _config_name(builder), "version": str(builder.version),
                "data_dir": str(version_dir),
                "splits": {s: int(i.num_examples) for s, i in builder.info.splits.items()},
                "labels": {}, "dropped": {}, "dropped_examples": [],
                "note": "built outside radjax.data.build: label and drop counts unknown"}
      _write_json(version_report, report)
    _write_json(top_report, report)
    say(f"{name}: already built at {version_dir}; nothing to do.")
    say_summary(report)
    return {**report, "status": "already_built"}

  config_name = _config_name(builder) or "default"
  cache_dir = data_root / name / ".build_cache" / config_name / str(builder.version)
  ctx = BuildContext(drops=DropLog(strict=strict), num_workers=num_workers, cache_dir=cache_dir,
                     progress=progress, desc=name)
  builder._radjax_ctx = ctx  # pylint: disable=protected-access
  tallies: dict[str, dict[str, dict[str, int]]] = {}
  _wrap_split_generators(builder, tallies)

  download_config = tfds.download.DownloadConfig(
      manual_dir=str(manual_path) if manual_path else None)
  start = time.time()
  say(f"{name}: building into {version_dir}" + (f" from {manual_path}" if manual_path else ""))
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=import-outside-toplevel
  previous = getattr(tqdm_utils, "_active", True)
  # Builders that run through ctx.map have bars that know the totals (RADJAX_OWN_PROGRESS);
  # TFDS's would duplicate them. Other builders keep TFDS's example counters.
  tfds.display_progress_bar(progress and not getattr(cls, "RADJAX_OWN_PROGRESS", False))
  try:
    builder.download_and_prepare(download_config=download_config)
  finally:
    tfds.display_progress_bar(previous)

  splits = {s: int(i.num_examples) for s, i in builder.info.splits.items()}
  log = ctx.drops
  report = {
      "dataset": name,
      "config": _config_name(builder),
      "config_fields": fields,
      "version": str(builder.version),
      "data_dir": str(version_dir),
      "manual_dir": str(manual_path) if manual_path else None,
      "strict": strict,
      "splits": splits,
      "labels": {s: tallies.get(s, {}) for s in splits},
      "dropped": dict(sorted(log.dropped.items())),
      "dropped_examples": log.dropped_examples,
      "filtered": dict(sorted(log.filtered.items())),
      "warnings": dict(sorted(log.warnings.items())),
      "warning_examples": log.warning_examples,
      "elapsed_s": round(time.time() - start, 2),
  }
  if log.num_dropped > len(log.dropped_examples):
    report["dropped_examples_truncated"] = True
  _write_json(version_report, report)
  _write_json(top_report, report)
  if not keep_cache:
    shutil.rmtree(cache_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # remove empty parents of the cache
      cache_dir.parent.rmdir()
      cache_dir.parent.parent.rmdir()
  say_summary(report)
  return report


# ----------------------------------------------------------------------------- command line

def key_values(pairs: Sequence[str], flag: str) -> dict[str, Any]:
  """``["k=v", ...]`` from a repeatable command-line flag -> ``{k: v}``, values as Python literals
  where they parse as one (``512``, ``False``, ``['PA']``), else as strings."""
  import ast  # pylint: disable=import-outside-toplevel
  out = {}
  for pair in pairs:
    key, sep, raw = pair.partition("=")
    if not sep or not key.strip():
      raise ValueError(f"{flag} expects KEY=VALUE, got {pair!r}")
    try:
      out[key.strip()] = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      out[key.strip()] = raw
  return out


def build_main(argv: Sequence[str] | None = None) -> int:
  """``python -m radjax.data.build ARGS`` is ``radjax data build ARGS``."""
  from radjax import cli  # pylint: disable=import-outside-toplevel
  return cli.main(["data", "build", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
  # Run as radjax.data.build, not __main__: the builders import Drop from that module, and a
  # second copy of the class here would not recognise their Drops.
  from radjax.data import build as _build  # pylint: disable=import-self
  sys.exit(_build.build_main())
