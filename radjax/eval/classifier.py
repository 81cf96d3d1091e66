"""A fine-tuned classifier used as it is deployed: images in, label probabilities out.

    radjax evaluate --workdir runs/ft [--split test]          AUROC per label, 95% bootstrap intervals
    radjax predict --workdir runs/ft --out scores.csv FILE_OR_FOLDER ...   a probability per label

Both load the run's saved config and checkpoint (``best/`` when the run kept one, else the latest)
and preprocess each image as training did, without augmentation (``Preprocess.image``); for a
model trained on INSPECT, predict also takes CT volumes, projected as its build did. Neither
reads a report: the deployed model needs the image only, and report text never reaches their
output.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Callable, Sequence

import numpy as np

from radjax.config import ConfigError, apply_override

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_SUFFIXES = (".nii", ".nii.gz")  # CT volumes, for models trained on INSPECT
CHECKPOINTS = ("auto", "best", "latest")
# What the model was trained on: changing it would feed the head inputs it never saw.
_FIXED_DATA_KEYS = ("image_size", "channels", "labels")


def _steps(folder: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def load_classifier(workdir: str, checkpoint: str = "auto", overrides: Sequence[tuple[str, str]] = ()):
  """The classifier trained in ``workdir`` -> ``(model, config, description of the checkpoint)``.

  checkpoint: "best" (``workdir/best``), "latest" (``workdir/checkpoints``) or "auto" (best when
  the run kept one). overrides: ``("data.KEY", value)`` pairs for the saved config (another
  ``data.data_dir`` for an external test set, say); the keys the model depends on cannot change.
  """
  from radjax import paths
  from radjax.methods.supervised import Classifier
  from radjax.train.checkpoint import load_pretrained
  from radjax.data.pipeline import label_names
  if checkpoint not in CHECKPOINTS:
    raise ConfigError(f"--checkpoint {checkpoint!r}; expected one of {', '.join(CHECKPOINTS)}")
  for key, _ in overrides:
    section, _, field = key.partition(".")
    if section != "data" or field in _FIXED_DATA_KEYS:
      raise ConfigError(f"--config.{key}: only the data.* keys the model does not depend on can change "
                        f"here (not {', '.join('data.' + k for k in _FIXED_DATA_KEYS)})")
  workdir = paths.local_dir(workdir, "--workdir")
  best_steps = _steps(os.path.join(workdir, "best"))
  use_best = checkpoint == "best" or (checkpoint == "auto" and bool(best_steps))
  steps = best_steps if use_best else _steps(os.path.join(workdir, "checkpoints"))
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'best' if use_best else 'checkpoints')}")
  model, config = load_pretrained(workdir, step=steps[-1], best=use_best)
  if not isinstance(model, Classifier):
    raise ConfigError(f"{workdir} holds a {config.method.name!r} run, which has no classifier head: "
                      "fine-tune it first (configs/finetune_synth.py with "
                      f"--config.method.init_from={workdir}), or compare methods with `radjax study`")
  trained_labels = label_names(config.data)
  for key, raw in overrides:
    apply_override(config, key, raw)
  if label_names(config.data) != trained_labels:  # data.labels may name a group, e.g. "diagnostic"
    raise ConfigError(f"the model predicts {', '.join(trained_labels)}; with these overrides the data "
                      f"gives {', '.join(label_names(config.data))}")
  return model, config, f"{'best' if use_best else 'latest'} checkpoint, step {steps[-1]}"


def probabilities_fn(model) -> Callable[[np.ndarray], np.ndarray]:
  """``images float32 [B, H, W, C] -> probabilities float32 [B, K]`` (one compile per batch shape)."""
  import jax
  from flax import nnx
  graphdef, state = nnx.split(model)

  @jax.jit
  def probabilities(state, images):
    return jax.nn.sigmoid(nnx.merge(graphdef, state)(images))

  return lambda images: np.asarray(probabilities(state, images))


class _NoReports:
  """Stands in for the tokenizer: evaluation reads images and labels, never the report."""

  def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    del text
    return np.zeros((max_len,), np.int32), np.zeros((max_len,), np.int32)


# ----------------------------------------------------------------------------- evaluate


def evaluate(workdir: str, split: str = "test", *, checkpoint: str = "auto", n_boot: int = 1000,
             batch_size: int = 64, overrides: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
  """AUROC (95% percentile-bootstrap interval over examples), AUPRC and class counts per label,
  and the macro AUROC over the labels that have both classes, on ``split`` of the run's dataset.
  Undefined values (a label without positives or negatives) are None."""
  from radjax import paths
  from radjax.data.pipeline import label_names, make_loader
  from radjax.eval import metrics
  model, config, which = load_classifier(workdir, checkpoint, overrides)
  loader = make_loader(config.data, split, batch_size=batch_size, seed=0, train=False,
                       tokenizer=_NoReports(), num_epochs=1)
  probabilities = probabilities_fn(model)
  scores, labels, masks = [], [], []
  for batch in loader:
    scores.append(probabilities(batch["image"]))
    labels.append(batch["labels"])
    masks.append(batch["label_mask"])
  if not scores:
    raise ValueError(f"split {split!r} of {config.data.dataset!r} is empty")
  s, y, m = np.concatenate(scores), np.concatenate(labels), np.concatenate(masks)

  def defined(x: float) -> float | None:
    return None if math.isnan(x) else round(float(x), 6)

  per_label = {}
  for k, name in enumerate(label_names(config.data)):
    point, lo, hi = metrics.bootstrap_ci(metrics.auroc, s[:, k], y[:, k], m[:, k], n_boot=n_boot)
    per_label[name] = {"auroc": defined(point), "auroc_lo": defined(lo), "auroc_hi": defined(hi),
                       "auprc": defined(metrics.auprc(s[:, k], y[:, k], m[:, k])),
                       "positives": int(((y[:, k] == 1) & (m[:, k] > 0)).sum()),
                       "negatives": int(((y[:, k] == 0) & (m[:, k] > 0)).sum())}
  point, lo, hi = metrics.bootstrap_ci(metrics.multilabel_macro_auroc, s, y, m, n_boot=n_boot)
  return {"workdir": paths.local_dir(workdir, "--workdir"), "checkpoint": which, "dataset": config.data.dataset,
          "split": split, "examples": int(len(s)), "labels": per_label,
          "macro_auroc": {"auroc": defined(point), "auroc_lo": defined(lo), "auroc_hi": defined(hi)}}


def format_evaluation(result: dict[str, Any]) -> str:
  def interval(r):
    if r["auroc"] is None:
      return "n/a"
    if r["auroc_lo"] is None:  # no resample held both classes
      return f"{r['auroc']:.3f}"
    return f"{r['auroc']:.3f} [{r['auroc_lo']:.3f}, {r['auroc_hi']:.3f}]"

  width = max(len(n) for n in [*result["labels"], "macro"])
  lines = [f"{result['workdir']} ({result['checkpoint']}) on {result['dataset']}/{result['split']}, "
           f"{result['examples']} examples",
           f"{'label':<{width}}  {'AUROC [95% CI]':<24} {'AUPRC':>6} {'pos':>6} {'neg':>6}"]
  for name, r in result["labels"].items():
    auprc = "n/a" if r["auprc"] is None else f"{r['auprc']:.3f}"
    lines.append(f"{name:<{width}}  {interval(r):<24} {auprc:>6} {r['positives']:>6} {r['negatives']:>6}")
  lines.append(f"{'macro':<{width}}  {interval(result['macro_auroc'])}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- predict


def ct_settings(config):
  """The CT-to-image settings (``radjax.data.ct.CTConfig``) of the INSPECT build the run trained
  on, or None for a dataset of films. A named build's settings are read from its build report."""
  import glob
  from radjax.data.builders import inspect as inspect_builder
  if config.data.dataset != "inspect":
    return None
  name = config.data.get("builder_config") or "default"
  if name == "default":
    return inspect_builder.make_config().ct_config()
  pattern = os.path.join(os.path.expanduser(str(config.data.data_dir)), "inspect", name, "*", "build_report.json")
  reports = sorted(glob.glob(pattern))
  if not reports:
    raise FileNotFoundError(f"the CT settings of INSPECT build {name!r} are in its build report, "
                            f"{pattern}, which is not there: predict where data.data_dir is readable")
  with open(reports[-1]) as f:
    fields = json.load(f)["config_fields"]  # tuples as JSON lists: make_config types them back
  return inspect_builder.make_config(name=name, **fields).ct_config()


def image_files(inputs: Sequence[str], suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[str]:
  """Files named, and files ending in one of ``suffixes`` under folders named, in sorted order."""
  files = []
  for item in inputs:
    path = os.path.expanduser(item)
    if os.path.isdir(path):
      found = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                     if f.lower().endswith(tuple(suffixes)))
      if not found:
        raise FileNotFoundError(f"{path}: no {', '.join(suffixes)} files in this folder")
      files += found
    elif os.path.exists(path):
      files.append(path)
    else:
      raise FileNotFoundError(f"{path}: no such file or folder")
  return files


def read_image(path: str, ct: Any = None) -> np.ndarray:
  """An image file -> uint8 [H, W] or [H, W, 3]. 16-bit and float images are stretched from their
  own minimum to maximum (their display window is not recorded in a PNG or TIFF). A CT volume
  (``VOLUME_SUFFIXES``) becomes the projection an INSPECT build stores, with ``ct``'s settings."""
  from PIL import Image
  if path.lower().endswith(VOLUME_SUFFIXES):
    from radjax.data import ct as ct_lib
    if ct is None:
      raise ValueError("a CT volume, but this model was trained on films")
    return ct_lib.projection_image(ct_lib.load_nifti(path), ct)
  with Image.open(path) as im:
    im.load()
    if im.mode in ("1", "L", "RGB"):
      return np.asarray(im.convert("L") if im.mode == "1" else im)
    if im.mode in ("P", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
      return np.asarray(im.convert("RGB"))
    if im.mode in ("LA", "PA"):
      return np.asarray(im.convert("L"))
    x = np.asarray(im, dtype=np.float64)
  lo, hi = float(x.min()), float(x.max())
  if not np.isfinite([lo, hi]).all():
    raise ValueError("non-finite pixel values")
  return np.round((x - lo) * (255.0 / max(hi - lo, 1e-12))).astype(np.uint8)


def write_predictions(model, config, files: Sequence[str], out: Any, *, ct: Any = None,
                      batch_size: int = 32) -> tuple[int, int]:
  """Writes a CSV (path, one probability per label, error) for each of ``files`` to the text stream
  ``out``; a file that cannot be read gets an empty row with its error and the rest go on.
  ct: ``ct_settings(config)``, for CT volumes among ``files``. Returns (images scored, files that
  failed)."""
  from radjax.data.pipeline import Preprocess, label_names
  names = label_names(config.data)
  preprocess = Preprocess(config.data, _NoReports(), train=False, names=names)
  probabilities = probabilities_fn(model)
  writer = csv.writer(out)
  writer.writerow(["path", *names, "error"])
  scored = failed = 0
  for start in range(0, len(files), batch_size):
    chunk = files[start:start + batch_size]
    images, errors = [], {}
    for path in chunk:
      try:
        images.append(preprocess.image(read_image(path, ct), None))
      except Exception as e:  # pylint: disable=broad-except
        errors[path] = f"unreadable image: {type(e).__name__}: {e}"
    probs = iter([])
    if images:
      # A full batch every call: the last, short one would compile the model again.
      batch = np.stack(images + images[-1:] * (batch_size - len(images)))
      probs = iter(probabilities(batch)[:len(images)])
    for path in chunk:
      if path in errors:
        writer.writerow([path, *[""] * len(names), errors[path]])
        failed += 1
      else:
        writer.writerow([path, *[f"{p:.6f}" for p in next(probs)], ""])
        scored += 1
  return scored, failed


def write_evaluation(result: dict[str, Any], path: str) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=2, allow_nan=False)
  os.replace(path + ".tmp", path)
