"""A fine-tuned classifier as one file: ``radjax export`` writes it, evaluate and predict read it.

The file is a zip archive:
  deployment.json            labels, the data config inputs are prepared by, the settings of
                             the build the model trained on, where the weights came from, and
                             the decision thresholds when exported with an operating point
  probabilities.jax_exported jax.export of (weights, images float32 [batch, S, S, C], normalised)
                             -> probabilities float32 [batch, K]; batch symbolic; lowered for
                             CPU and CUDA with every layer on its standard path
  weights/NNNNN.npy          the weights, in the function's argument order

Running it needs JAX and NumPy only: ``jax.export.deserialize(blob).call(weights, images)``; the
model's code is not needed, so a validated file keeps working when radjax's modules change.
What it holds: weights and config values. No report text, no data, no patient attribute.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any

import numpy as np

FORMAT = "radjax.classifier"
FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda")
_FUNCTION = "probabilities.jax_exported"
_META = "deployment.json"


class UnreadableExport(ValueError):
  """A file that is not a classifier this radjax can read."""


def export(model: Any, config: Any, build: Any, description: str, out: str,
           operating_point: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes the classifier ``model`` (a ``methods.supervised.Classifier`` as loaded, with its run's
  ``config`` and the ``build`` settings of ``classifier.build_settings``) to ``out``, in
  inference mode (``model.eval()``: BatchNorm on its running averages), with the decision
  thresholds of ``operating_point`` (``evaluation.choose_operating_point``) if given; returns the
  metadata written."""
  import jax
  import jax.numpy as jnp
  from importlib import metadata
  from radjax.data.build import builder_config_fields
  from radjax.data.pipeline import image_norm, label_names
  from radjax.eval.classifier import probability_function
  from radjax.models import layers
  probabilities, weights = probability_function(model)
  size, channels = int(config.data.image_size), int(config.data.channels)
  batch, = jax.export.symbolic_shape("batch")
  with layers.portable_paths():
    exported = jax.export.export(jax.jit(probabilities), platforms=PLATFORMS)(
        [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights],
        jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32))
  mean, std = image_norm(config.data)
  labels = label_names(config.data)
  meta = {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "labels": list(labels),
      "inputs": {"shape": ["batch", size, size, channels], "dtype": "float32",
                 "preparation": "8-bit image, resized to image_size x image_size (bilinear), / 255, "
                                "minus mean, over std; repeated to channels",
                 "mean": mean, "std": std},
      "outputs": {"shape": ["batch", len(labels)], "dtype": "float32",
                  "meaning": "sigmoid probability per label, in labels order"},
      # Decisions: positive when probability >= thresholds[label] (None: no decision for it).
      "operating_point": operating_point,
      # The names, not a group ("diagnostic"): a group of image_table labels is its build's.
      "data": {**config.data.to_dict(), "labels": ",".join(labels)},
      "build": None if build is None else {"name": build.name, "fields": builder_config_fields(build)},
      "source": {"checkpoint": description, "method": config.method.name,
                 "image_model": config.model.image.to_dict()},
      "platforms": list(PLATFORMS), "jax": jax.__version__, "radjax": metadata.version("radjax"),
  }
  tmp = out + ".tmp"
  with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(_META, json.dumps(meta, indent=2, allow_nan=False))
    zf.writestr(_FUNCTION, exported.serialize())
    for i, w in enumerate(weights):
      buf = io.BytesIO()
      np.save(buf, np.asarray(w), allow_pickle=False)
      zf.writestr(f"weights/{i:05d}.npy", buf.getvalue())
  os.replace(tmp, out)
  return meta


def load(path: str) -> tuple[Any, dict[str, Any]]:
  """An exported file -> (probabilities: images float32 [B, S, S, C] -> float32 [B, K], metadata).

  Raises UnreadableExport naming what is wrong with a file that is not one radjax wrote."""
  import jax
  try:
    with zipfile.ZipFile(path) as zf:
      names = set(zf.namelist())
      if _META not in names or _FUNCTION not in names:
        raise UnreadableExport(f"{path}: not a classifier `radjax export` wrote (no {_META} / {_FUNCTION})")
      meta = json.loads(zf.read(_META))
      if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise UnreadableExport(f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                         f"this radjax reads {FORMAT!r} version {FORMAT_VERSION}")
      function = jax.export.deserialize(bytearray(zf.read(_FUNCTION)))
      weights = [jax.numpy.asarray(np.load(io.BytesIO(zf.read(n)), allow_pickle=False))
                 for n in sorted(n for n in names if n.startswith("weights/"))]
  except zipfile.BadZipFile as e:
    raise UnreadableExport(f"{path}: not a classifier `radjax export` wrote ({e})") from e
  call = jax.jit(function.call)
  return (lambda images: np.asarray(call(weights, images))), meta
