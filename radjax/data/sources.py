"""Random-access data sources: ``get_source(data_cfg, split)`` -> len / [i] -> example dict.

An example is ``dict(image=uint8 [H, W], report=str, labels={name: float}, id=str,
attributes={name: str})``; attributes describe the film or patient (SynthCXR's view, sex and age
band; MIMIC-CXR's view; the columns an image_table build names), for subgroup evaluation.
Labels are 1 / 0, -1 for uncertain (CheXpert) and NaN for missing / censored; the
pipeline applies the uncertainty policy.

- ``data_cfg.data_dir is None`` (SynthCXR only): examples are generated on the fly from
  the structural causal model (deterministic in (seed, split, index)).
- otherwise: the ArrayRecord files written by the dataset's TFDS builder
  (``radjax data build``) under ``data_dir``, read through ``tfds`` data sources (PIL
  decoding, no TensorFlow). The builder config is ``data_cfg.builder_config`` or, for
  SynthCXR, the one derived from ``data_cfg.synth``.

Sources are picklable (grain worker processes): the TFDS reader is opened lazily in
each process.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np

from radjax.config import ConfigError
from radjax.data import builders
from radjax.data import synth_cxr


def known_datasets() -> list[str]:
  return builders.names()


def _check_dataset(data_cfg: Any) -> str:
  name = data_cfg.dataset
  if name not in builders.names():
    raise ConfigError(f"unknown dataset data.dataset={name!r}; known datasets: {', '.join(builders.names())}")
  return name


def _builder_config(data_cfg: Any) -> Any:
  config = data_cfg.get("builder_config", None) if hasattr(data_cfg, "get") else None
  if config is not None:
    return config
  if data_cfg.dataset == "synth_cxr":
    from radjax.data.builders import synth_cxr as synth_builder  # pylint: disable=import-outside-toplevel
    return synth_builder.config_from_data_config(data_cfg)
  return None


def _as_str(x: Any) -> str:
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, np.ndarray):
    return _as_str(x.item())
  return str(x)


def _as_label(x: Any) -> float:
  v = float(np.asarray(x))
  return v if math.isfinite(v) else math.nan


class ArrayRecordSource:
  """A built TFDS dataset's split as a grain RandomAccessDataSource (len / getitem)."""

  def __init__(self, name: str, data_dir: str, split: str, config: Any = None):
    self._name = name
    self._data_dir = data_dir
    self._split = split
    self._config = config
    self._len = len(self._source)
    # Features of the builder's own that describe the film (MIMIC-CXR's view); others keep
    # theirs in an "attributes" dict.
    self._top_level_attributes = tuple(getattr(builders.get_builder_class(name), "ATTRIBUTES", ()))

  @functools.cached_property
  def _builder(self):
    cls = builders.get_builder_class(self._name)
    # image_table's builds are never registered configs (their labels come from the table).
    config = self._config or getattr(cls, "DEFAULT_BUILD_NAME", None)
    if isinstance(config, str) and config not in getattr(cls, "builder_configs", {}):
      # A variant built with other fields (e.g. image_size=512) is not a registered config: TFDS
      # finds it by name only through its folder, whose dataset_info.json describes it.
      folder = os.path.join(self._data_dir, self._name, config, str(cls.VERSION))
      if os.path.isfile(os.path.join(folder, "dataset_info.json")):
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
        return tfds.builder_from_directory(folder)
    else:
      builder = cls(data_dir=self._data_dir, config=config, file_format="array_record")
      if builder.is_prepared():
        return builder
      config, folder = getattr(builder.builder_config, "name", None), builder.data_dir
    raise ConfigError(
        f"dataset {self._name!r}" + (f" (config {config!r})" if config else "") + f" is not built "
        f"in data.data_dir={self._data_dir!r} (looked in {folder}): run "
        f"`radjax data build --dataset {self._name} --data_dir {self._data_dir}` with the same settings")

  @functools.cached_property
  def _source(self):
    builder = self._builder
    if self._split not in builder.info.splits:
      raise ConfigError(f"dataset {self._name!r} has no split {self._split!r}; built splits: "
                        f"{', '.join(sorted(builder.info.splits))}")
    return builder.as_data_source(split=self._split)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> dict[str, Any]:
    ex = self._source[int(i)]
    image = np.asarray(ex["image"])
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    attributes = {k: _as_str(v) for k, v in ex.get("attributes", {}).items()}
    attributes.update((k, _as_str(ex[k])) for k in self._top_level_attributes if k in ex)
    return {
        "image": image,
        "report": _as_str(ex["report"]),
        "labels": {k: _as_label(v) for k, v in ex["labels"].items()},
        "id": _as_str(ex["id"]),
        "attributes": attributes,
    }

  def __getstate__(self):
    state = dict(self.__dict__)
    state.pop("_builder", None)
    state.pop("_source", None)
    return state

  def __repr__(self) -> str:
    return f"ArrayRecordSource({self._name!r}, split={self._split!r}, n={self._len}, data_dir={self._data_dir!r})"


def get_source(data_cfg: Any, split: str):
  """The examples of ``split`` (see module docstring). Raises ValueError naming the bad key."""
  name = _check_dataset(data_cfg)
  if data_cfg.data_dir is None:
    if name != "synth_cxr":
      raise ConfigError(f"dataset {name!r} is read from files: set data.data_dir to the folder given to "
                        f"`radjax data build --dataset {name} --data_dir DIR`")
    synth = synth_cxr.SynthCXR(data_cfg.synth)
    synth.num_examples(split)  # validates the split name
    return synth.source(split)
  return ArrayRecordSource(name, os.path.expanduser(str(data_cfg.data_dir)), split, _builder_config(data_cfg))


def dataset_label_names(data_cfg: Any, kind: str, *, unbuilt_ok: bool = False) -> tuple[str, ...]:
  """Label names of kind "diagnostic" / "prognostic" / "all" for ``data_cfg.dataset``.

  unbuilt_ok: () rather than an error where the names are the build's (image_table) and it cannot
  be read here (an exported model scoring files away from its data)."""
  name = _check_dataset(data_cfg)
  if name == "synth_cxr":
    return synth_cxr.label_names(kind)
  cls = builders.get_builder_class(name)
  if hasattr(cls, "label_groups"):  # the labels are the build's (image_table: its table's columns)
    try:
      if data_cfg.data_dir is None:
        raise FileNotFoundError(f"dataset {name!r} takes its label names from its build: set data.data_dir")
      return cls.label_groups(os.path.expanduser(str(data_cfg.data_dir)), _builder_config(data_cfg))[kind]
    except FileNotFoundError as e:
      if unbuilt_ok:
        return ()
      raise ConfigError(str(e)) from None
  diag = tuple(getattr(cls, "DIAGNOSTIC_LABELS", ()))
  prog = tuple(getattr(cls, "PROGNOSTIC_LABELS", ()))
  if not diag and not prog:
    raise ConfigError(f"dataset {name!r} does not declare DIAGNOSTIC_LABELS / PROGNOSTIC_LABELS: "
                      f"set data.labels to a comma-separated list of its label names")
  return {"diagnostic": diag, "prognostic": prog, "all": diag + prog}[kind]


def sample_reports(data_cfg: Any, n: int = 5000, split: str = "pretrain") -> list[str]:
  """Up to ``n`` reports, evenly spaced over ``split`` (falls back to "train" if it is empty/absent).

  SynthCXR without data_dir writes the reports without rendering images.
  """
  name = _check_dataset(data_cfg)
  if data_cfg.data_dir is None and name == "synth_cxr":
    synth = synth_cxr.SynthCXR(data_cfg.synth)
    if synth.num_examples(split) == 0:
      split = "train"
    total = synth.num_examples(split)
    idx = np.unique(np.linspace(0, total - 1, min(n, total)).astype(np.int64)) if total else []
    return [synth.report(split, int(i)) for i in idx]
  try:
    src = get_source(data_cfg, split)
    if len(src) == 0:
      raise ValueError("empty split")
  except ValueError:
    src = get_source(data_cfg, "train")
  total = len(src)
  idx = np.unique(np.linspace(0, total - 1, min(n, total)).astype(np.int64)) if total else []
  return [src[int(i)]["report"] for i in idx]
