"""A fine-tuned classifier used as it is deployed: images in, label probabilities out.

    radjax evaluate --workdir runs/ft [--split test]          AUROC per label, calibration, ...
                                                              (radjax.eval.evaluation)
    radjax predict --workdir runs/ft --out scores.csv FILE_OR_FOLDER ...   a probability per label
                                                              [, a decision per label]
    radjax export --workdir runs/ft --out ft.radjax           the classifier as one file
    radjax predict --model ft.radjax ...                      (evaluate too) from that file

Both load the run's saved config and checkpoint (``best/`` when the run kept one, else the latest),
or an exported file (``radjax.eval.exported``), and preprocess each image as training did, without
augmentation (``Preprocess.image``); predict first turns each file (a film, a DICOM, a CT volume)
into the image the run's build would have stored for it (``ImageReader``). Neither reads a report:
the deployed model needs the image only, and report text never reaches their output.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import numpy as np

from radjax.config import ConfigError, apply_override
from radjax.eval.evaluation import (NoReports, choose_operating_point, describe_operating_point,
                                    parse_operating_point)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_SUFFIXES = (".nii", ".nii.gz")  # CT volumes, for models trained on INSPECT
CHECKPOINTS = ("auto", "best", "latest")
# What the model was trained on: changing it would feed the head inputs it never saw.
_FIXED_DATA_KEYS = ("image_size", "channels", "labels")


def _steps(folder: str) -> list[int]:
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def load_classifier(workdir: str, checkpoint: str = "auto"):
  """The classifier trained in ``workdir`` -> ``(model, config, description of the checkpoint)``.

  checkpoint: "best" (``workdir/best``), "latest" (``workdir/checkpoints``) or "auto" (best when
  the run kept one). The model is in inference mode (``model.eval()``)."""
  from radjax import paths
  from radjax.methods.supervised import Classifier
  from radjax.train.checkpoint import load_pretrained
  if checkpoint not in CHECKPOINTS:
    raise ConfigError(f"--checkpoint {checkpoint!r}; expected one of {', '.join(CHECKPOINTS)}")
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
  return model, config, f"{'best' if use_best else 'latest'} checkpoint, step {steps[-1]}"


@dataclasses.dataclass(frozen=True)
class Deployed:
  """A classifier as evaluate and predict use it, from a run or from an exported file.

  probabilities: normalised images float32 [B, S, S, C] -> probabilities float32 [B, K].
  data: the data config (``config.data``) its inputs are prepared by, overrides applied.
  description: which weights ("best checkpoint, step 40", "exported ...").
  workdir / model_file: where it came from (the other is None).
  read_build: () -> the settings of the build it trained on (``build_settings``).
  trained_dataset: the dataset it trained on, whose conversion new files go through.
  operating_point: the thresholds that turn its probabilities into decisions, and how they were
    chosen (``choose_operating_point``), or None."""
  probabilities: Callable[[np.ndarray], np.ndarray]
  data: Any
  description: str
  workdir: str | None
  model_file: str | None
  read_build: Callable[[], Any]
  trained_dataset: str
  operating_point: dict[str, Any] | None = None

  def image_reader(self) -> ImageReader:
    return ImageReader(self.trained_dataset, self.read_build())


def open_classifier(workdir: str | None = None, *, model_file: str | None = None, checkpoint: str = "auto",
                    overrides: Sequence[tuple[str, str]] = (), operating_point: str | None = None) -> Deployed:
  """The classifier of a fine-tuning run (``workdir``) or of an exported file (``model_file``).

  overrides: ``("data.KEY", value)`` pairs for its data config (another ``data.data_dir`` for an
  external test set, say); the keys the model depends on cannot change.
  operating_point: a rule (``parse_operating_point``) that chooses a run's decision thresholds on
  the validation split of the data it trained on, whatever the overrides; an exported file
  carries the thresholds chosen when it was exported."""
  import ml_collections
  from radjax import paths
  from radjax.data.pipeline import image_norm, label_names
  from radjax.data.sources import dataset_label_names
  from radjax.eval import exported
  if (workdir is None) == (model_file is None):
    raise ConfigError("give one of --workdir (a fine-tuning run) and --model (an exported classifier)")
  if model_file is not None and checkpoint != "auto":
    raise ConfigError(f"--checkpoint {checkpoint} chooses among a run's checkpoints; an exported file "
                      "holds one (radjax export --checkpoint chooses it)")
  for key, _ in overrides:
    section, _, field = key.partition(".")
    if section != "data" or field in _FIXED_DATA_KEYS:
      raise ConfigError(f"--config.{key}: only the data.* keys the model does not depend on can change "
                        f"here (not {', '.join('data.' + k for k in _FIXED_DATA_KEYS)})")
  if operating_point is not None:
    parse_operating_point(operating_point)  # a typo fails before the model loads
  if workdir is not None:
    model, config, description = load_classifier(workdir, checkpoint)
    probabilities, trained = probabilities_fn(model), copy.deepcopy(config.data)
    read_build = lambda: build_settings(trained)
    workdir = paths.local_dir(workdir, "--workdir")
    if operating_point is not None:
      operating_point = choose_operating_point(probabilities, trained, operating_point)
  else:
    model_file = os.path.abspath(os.path.expanduser(model_file))
    if not os.path.isfile(model_file):
      raise FileNotFoundError(f"{model_file}: no such file")
    probabilities, meta = exported.load(model_file)
    if operating_point is not None:
      # The thresholds are part of what was validated and deployed: they change with a new export.
      held = meta.get("operating_point")
      raise ConfigError(f"--operating_point: {model_file} "
                        + (f"decides at the thresholds it was exported with, {describe_operating_point(held)}"
                           if held else "holds no thresholds")
                        + "; export the run again with --operating_point RULE for a file that decides "
                        + ("otherwise" if held else "at them"))
    config = ml_collections.ConfigDict({"data": meta["data"]})
    description = f"exported from the {meta['source']['checkpoint']}"
    read_build = lambda: exported_build(meta)
    operating_point = meta.get("operating_point")
  trained_labels, trained_dataset = label_names(config.data), config.data.dataset
  trained_norm = image_norm(config.data)
  if overrides:
    # Another build (an external test set, perhaps a hospital's image_table) is matched by label
    # name: a group such as "diagnostic" is each dataset's own.
    config.data.labels = ",".join(trained_labels)
  for key, raw in overrides:
    apply_override(config, key, raw)
  if image_norm(config.data) != trained_norm:
    raise ConfigError(f"the model was trained on {trained_dataset}, whose images are normalised with "
                      f"(mean, std) {trained_norm}; {config.data.dataset}'s are normalised with "
                      f"{image_norm(config.data)}: score it on a {trained_dataset} build")
  known = dataset_label_names(config.data, "all", unbuilt_ok=True)
  missing = [name for name in trained_labels if known and name not in known]
  if missing:
    raise ConfigError(f"the model predicts {', '.join(trained_labels)}; dataset {config.data.dataset!r} "
                      f"has no label(s) {', '.join(missing)} (its labels: {', '.join(known)})")
  return Deployed(probabilities, config.data, description, workdir, model_file, read_build, trained_dataset,
                  operating_point)


def export_classifier(workdir: str, out: str, checkpoint: str = "auto",
                      operating_point: str | None = None) -> dict[str, Any]:
  """Writes the run's classifier to the file ``out`` (``radjax.eval.exported``), with the decision
  thresholds ``operating_point`` chooses on its validation split when given; returns its metadata."""
  from radjax.eval import exported
  if operating_point is not None:
    parse_operating_point(operating_point)
  model, config, description = load_classifier(workdir, checkpoint)
  if operating_point is not None:
    operating_point = choose_operating_point(probabilities_fn(model), config.data, operating_point)
  return exported.export(model, config, build_settings(config.data), description, out,
                         operating_point=operating_point)


def probability_function(model) -> tuple[Callable[..., Any], list[Any]]:
  """The classifier ``model`` in inference mode as ``(fn, weights)``: ``fn(weights, images float32
  [B, H, W, C]) -> probabilities float32 [B, K]``, with ``weights`` its Params and BatchStats as a
  flat list (what ``radjax export`` writes, one array per argument)."""
  import jax
  from flax import nnx
  graphdef, arrays, rest = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)
  weights, treedef = jax.tree.flatten(arrays)

  def probabilities(weights, images):
    classifier = nnx.merge(graphdef, jax.tree.unflatten(treedef, weights), rest)
    classifier.eval()  # on the traced copy: the caller's model keeps its mode
    return jax.nn.sigmoid(classifier(images))

  return probabilities, weights


def probabilities_fn(model) -> Callable[[np.ndarray], np.ndarray]:
  """``images float32 [B, H, W, C] -> probabilities float32 [B, K]`` (one compile per batch shape)."""
  import jax
  probabilities, weights = probability_function(model)
  probabilities = jax.jit(probabilities)
  return lambda images: np.asarray(probabilities(weights, images))


# ----------------------------------------------------------------------------- predict


def build_settings(data):
  """The builder config of the build a run read (``data``: its data config; ``MimicCXRConfig``,
  ``InspectConfig``), whose resizing and CT settings raw files must go through, or None for
  SynthCXR (its films are generated, not converted). A named build's settings are read from its
  build report."""
  import glob
  dataset = data.dataset
  if dataset not in _CONVERTED_DATASETS:
    return None
  builder = _builder_module(dataset)
  name = data.get("builder_config") or "default"
  if name == "default":
    return builder.make_config()
  data_dir = os.path.expanduser(str(data.data_dir))
  pattern = os.path.join(data_dir, dataset, name, "*", "build_report.json")
  reports = sorted(glob.glob(pattern))
  if not reports:
    raise FileNotFoundError(f"the settings of {dataset} build {name!r} are in its build report, "
                            f"{pattern}, which is not there: predict where data.data_dir is readable")
  with open(reports[-1]) as f:
    fields = json.load(f)["config_fields"]  # tuples as JSON lists: make_config types them back
  return builder.make_config(name=name, **fields)


def exported_build(meta: dict[str, Any]):
  """The build settings an exported file (``exported.load``'s metadata) holds, as a builder config."""
  if meta["build"] is None:
    return None
  return _builder_module(meta["data"]["dataset"]).make_config(name=meta["build"]["name"],
                                                              **meta["build"]["fields"])


_CONVERTED_DATASETS = ("mimic_cxr", "inspect", "image_table")


def _builder_module(dataset: str):
  """The module of ``dataset``'s registered builder (it holds ``make_config``)."""
  import sys
  from radjax.data import builders
  return sys.modules[builders.get_builder_class(dataset).__module__]


class ImageReader:
  """Files -> uint8 [H, W] (or [H, W, 3]): the image the run's build would have stored for them.

  - MIMIC-CXR: a MIMIC-CXR-JPG film is resized and encoded as the build did; a DICOM is first
    converted as MIMIC-CXR-JPG converts its DICOMs (8 bits, histogram equalisation, JPEG).
  - INSPECT: a CT volume (``VOLUME_SUFFIXES``) becomes the projection the build stores.
  - image_table: a film is converted, resized and encoded as the build did (``raw_images``).
  - SynthCXR: a file is read as it is; 16-bit and float images and DICOMs are stretched from their
    own minimum to maximum (a PNG or TIFF records no display window).
  """

  def __init__(self, dataset: str, build: Any):
    """dataset: ``data.dataset`` of the run; build: its ``build_settings``."""
    from radjax.data import dicom
    self.dataset, self.build = dataset, build
    self.suffixes = IMAGE_SUFFIXES + dicom.SUFFIXES + (VOLUME_SUFFIXES if self.dataset == "inspect" else ())

  def __call__(self, path: str) -> np.ndarray:
    from radjax.data import dicom
    if path.lower().endswith(VOLUME_SUFFIXES):
      if self.dataset != "inspect":
        raise ValueError("a CT volume, but this model was trained on films")
      from radjax.data import ct as ct_lib
      return ct_lib.projection_image(ct_lib.load_nifti(path), self.build.ct_config())
    if self.dataset == "inspect":
      raise ValueError("a film or a single slice, but this model reads CT volumes (.nii.gz; a DICOM "
                       "series converts with dcm2niix)")
    raw = dicom.raw_pixels(path)
    if self.dataset == "mimic_cxr":
      from radjax.data.builders import mimic_cxr
      # An 8-bit film is taken to be a MIMIC-CXR-JPG file (read from disk as the build read it);
      # raw detector values are converted to one first.
      return mimic_cxr.stored_image(path if raw is None else mimic_cxr.published_jpg(raw), self.build)
    if self.dataset == "image_table":
      from radjax.data.builders import image_table
      return image_table.stored_image(path, self.build)
    return _eight_bit(path) if raw is None else dicom.min_max_to_uint8(raw)


def _eight_bit(path: str) -> np.ndarray:
  """An 8-bit image -> uint8 [H, W] (grayscale) or [H, W, 3] (colour)."""
  from PIL import Image
  with Image.open(path) as im:
    if im.mode in ("1", "LA", "PA"):
      im = im.convert("L")
    elif im.mode not in ("L", "RGB"):
      im = im.convert("RGB")
    return np.asarray(im)


def image_files(inputs: Sequence[str], suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[str]:
  """Files named, and under folders named the files ending in one of ``suffixes`` or, without
  a suffix (as DICOM exports often are), starting as a DICOM file does; in sorted order."""
  from radjax.data import dicom
  files = []
  for item in inputs:
    path = os.path.expanduser(item)
    if os.path.isdir(path):
      found = sorted(p for p in (os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
                     if p.lower().endswith(tuple(suffixes))
                     or ("." not in os.path.basename(p) and dicom.is_dicom(p)))
      if not found:
        raise FileNotFoundError(f"{path}: no {', '.join(suffixes)} or DICOM files in this folder")
      files += found
    elif os.path.exists(path):
      files.append(path)
    else:
      raise FileNotFoundError(f"{path}: no such file or folder")
  return files


def write_predictions(classifier: Deployed, files: Sequence[str], out: Any, *,
                      read_image: ImageReader | None = None, batch_size: int = 32,
                      readers: int | None = None) -> tuple[int, int]:
  """Writes a CSV (path, one probability per label, with an operating point one decision per
  label, ``LABEL_positive`` 1 or 0 (blank where it has no threshold), error) for each of ``files``
  to the text stream ``out``, in their order; a file that cannot be read gets an empty row with its
  error and the rest go on. read_image: ``classifier.image_reader()`` unless given. ``readers`` threads (default: one
  per core, at most 8) decode and prepare files, the next batch's while the model scores this one:
  decoding a full-size film costs far more than scoring it. Returns (images scored, files that
  failed)."""
  import concurrent.futures
  from radjax.data.pipeline import Preprocess, label_names
  from radjax.hostcpu import host_cpus
  names = label_names(classifier.data)
  preprocess = Preprocess(classifier.data, NoReports(), train=False, names=names)
  probabilities = classifier.probabilities
  read_image = read_image or classifier.image_reader()

  def prepare(path: str) -> tuple[np.ndarray | None, str | None]:
    try:
      return preprocess.image(read_image(path), None), None
    except Exception as e:  # pylint: disable=broad-except
      return None, f"unreadable image: {type(e).__name__}: {e}"

  thresholds = ([classifier.operating_point["thresholds"].get(n) for n in names]
                if classifier.operating_point else [])

  def decisions(probs: np.ndarray) -> list[str]:
    return ["" if t is None else str(int(p >= t)) for p, t in zip(probs, thresholds)]

  writer = csv.writer(out)
  writer.writerow(["path", *names, *[f"{n}_positive" for n in names if thresholds], "error"])
  scored = failed = 0
  chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]
  with concurrent.futures.ThreadPoolExecutor(readers or min(8, host_cpus())) as pool:
    upcoming = [pool.submit(prepare, path) for path in chunks[0]] if chunks else []
    for k, chunk in enumerate(chunks):
      prepared = [future.result() for future in upcoming]
      upcoming = [pool.submit(prepare, path) for path in chunks[k + 1]] if k + 1 < len(chunks) else []
      images = [image for image, _ in prepared if image is not None]
      probs = iter([])
      if images:
        # A full batch every call: the last, short one would compile the model again.
        batch = np.stack(images + images[-1:] * (batch_size - len(images)))
        probs = iter(probabilities(batch)[:len(images)])
      for path, (image, error) in zip(chunk, prepared):
        if image is None:
          writer.writerow([path, *[""] * (len(names) + len(thresholds)), error])
          failed += 1
        else:
          p = next(probs)
          writer.writerow([path, *[f"{v:.6f}" for v in p], *decisions(p), ""])
          scored += 1
  return scored, failed
