"""TFDS builder materialising SynthCXR as ArrayRecord (no TensorFlow needed).

    builder = SynthCXRBuilder(data_dir="/tmp/data", config={"image_size": 224}, file_format="array_record")
    builder.download_and_prepare()

TFDS's ``Image`` feature encodes numpy arrays with TensorFlow, so examples hand it
already-encoded PNG bytes (PIL), which TFDS stores as is; reading back
(``as_data_source``) decodes with PIL, also without TensorFlow. Shuffling is disabled,
so record ``i`` of a split is SynthCXR example ``i`` of that split.

Layout: ``DATA_DIR/synth_cxr/CONFIG/1.1.0/synth_cxr-SPLIT.array_record-XXXXX-of-YYYYY``,
where CONFIG is "default" for the default knobs, else a name derived from them (so
variants built into one DATA_DIR never collide).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from radjax.data import synth_cxr

_FIELDS = tuple(f.name for f in dataclasses.fields(synth_cxr.SynthParams))


@dataclasses.dataclass(eq=False)
class SynthCXRConfig(tfds.core.BuilderConfig):
  """The SynthCXR knobs (see radjax.defaults.synth_cxr_config); ``prevalence`` is a tuple of
  (label, probability) pairs."""
  seed: int = 0
  image_size: int = 64
  n_pretrain: int = 4000
  n_train: int = 2000
  n_validation: int = 500
  n_test: int = 1000
  text_label_association: float = 0.0
  text_leak: float = 0.0
  report_error_rate: float = 0.05
  report_image_evidence: float = 0.0
  prevalence: tuple[tuple[str, float], ...] = ()

  def params(self) -> synth_cxr.SynthParams:
    return synth_cxr.SynthParams(**{f: getattr(self, f) for f in _FIELDS})


# Knobs added after datasets were first built: left out of the name's digest while at their
# default, so that those datasets keep their names.
_ADDED_LATER = {"report_image_evidence": 0.0}


def _name_for(params: synth_cxr.SynthParams) -> str:
  if params == synth_cxr.SynthParams():
    return "default"
  d = {k: v for k, v in dataclasses.asdict(params).items() if _ADDED_LATER.get(k, None) != v}
  digest = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]
  tag = lambda x: f"{x:g}".replace(".", "p").replace("-", "m")
  return (f"px{params.image_size}_tla{tag(params.text_label_association)}_leak{tag(params.text_leak)}"
          f"_err{tag(params.report_error_rate)}_s{params.seed}_{digest}")


def config_from_params(params: synth_cxr.SynthParams) -> SynthCXRConfig:
  return SynthCXRConfig(name=_name_for(params), description="SynthCXR " + json.dumps(
      dataclasses.asdict(params), sort_keys=True), **dataclasses.asdict(params))


def make_config(**overrides: Any) -> SynthCXRConfig:
  """A config from knob overrides (validated; errors name the key as ``synth.KEY``)."""
  overrides.pop("name", None)
  unknown = sorted(set(overrides) - set(_FIELDS))
  if unknown:
    raise ValueError(f"unknown SynthCXR config field(s) {unknown}; known: {list(_FIELDS)}")
  return config_from_params(synth_cxr.SynthParams.from_config(overrides))


def config_from_data_config(data_cfg: Any) -> SynthCXRConfig:
  """The builder config matching ``data_cfg.synth`` (what ``get_source`` reads back)."""
  return config_from_params(synth_cxr.SynthParams.from_config(data_cfg.synth))


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


class SynthCXRBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """SynthCXR image/report/labels, splits pretrain/train/validation/test."""

  name = "synth_cxr"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": "attributes: view, sex, age band."}
  BUILDER_CONFIGS = [config_from_params(synth_cxr.SynthParams())]
  DEFAULT_CONFIG_NAME = "default"
  DIAGNOSTIC_LABELS = synth_cxr.DIAGNOSTIC_LABELS
  PROGNOSTIC_LABELS = synth_cxr.PROGNOSTIC_LABELS

  make_config = staticmethod(make_config)

  def __init__(self, *, config: Any = None, **kwargs):
    if isinstance(config, Mapping):
      config = make_config(**dict(config))
    if isinstance(config, SynthCXRConfig) and config.name == self.DEFAULT_CONFIG_NAME:
      # TFDS accepts the registered instance only, not an equal copy (default knobs read back
      # through data.data_dir give such a copy).
      config = self.DEFAULT_CONFIG_NAME
    super().__init__(config=config, **kwargs)

  @property
  def params(self) -> synth_cxr.SynthParams:
    return self.builder_config.params()  # type: ignore[attr-defined]

  def label_names(self) -> tuple[str, ...]:
    return synth_cxr.ALL_LABELS

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.params.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description="SynthCXR: synthetic chest radiographs, reports and outcomes from a seeded "
                    "structural causal model (radjax.data.synth_cxr).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, 1), encoding_format="png"),
            "report": tfds.features.Text(),
            "id": tfds.features.Text(),
            "labels": tfds.features.FeaturesDict(
                {n: tfds.features.Scalar(np.float32) for n in synth_cxr.ALL_LABELS}),
            "attributes": tfds.features.FeaturesDict({n: tfds.features.Text() for n in synth_cxr.ATTRIBUTES}),
        }),
        # Record i of a split must be example i: the pipeline's `index` and label subsets rely on it.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split=split) for split in synth_cxr.SPLITS
            if self.params.num_examples(split) > 0}

  def _generate_examples(self, split: str):
    synth = synth_cxr.SynthCXR(self.params)
    for i in range(synth.num_examples(split)):
      ex = synth.example(split, i)
      yield i, {
          "image": encode_png(ex["image"]),
          "report": ex["report"],
          "id": ex["id"],
          "labels": {k: np.float32(v) for k, v in ex["labels"].items()},
          "attributes": ex["attributes"],
      }
