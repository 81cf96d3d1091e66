"""A fine-tuned classifier used as it is deployed: images in, label probabilities out.

    radjax evaluate --workdir runs/ft [--split test]          AUROC per label, 95% bootstrap intervals,
                                                              calibration [, decisions at an operating point]
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


class _NoReports:
  """Stands in for the tokenizer: evaluation reads images and labels, never the report."""

  def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    del text
    return np.zeros((max_len,), np.int32), np.zeros((max_len,), np.int32)


# ----------------------------------------------------------------------------- evaluate


def score_split(probabilities: Callable[[np.ndarray], np.ndarray], data: Any, split: str,
                batch_size: int = 64, attributes: Sequence[str] = ()) -> tuple[np.ndarray, ...]:
  """The classifier's probabilities on every example of ``split`` of the dataset ``data`` (a data
  config) -> (probabilities float32 [N, K], labels [N, K], label mask [N, K], the examples'
  ``attributes`` str [N, len(attributes)]), in the split's order."""
  from radjax.data.pipeline import make_loader
  loader = make_loader(data, split, batch_size=batch_size, seed=0, train=False,
                       tokenizer=_NoReports(), num_epochs=1, attributes=attributes)
  scores, labels, masks, groups = [], [], [], []
  for batch in loader:
    scores.append(probabilities(batch["image"]))
    labels.append(batch["labels"])
    masks.append(batch["label_mask"])
    groups.append(batch.get("attributes", np.zeros((len(batch["labels"]), 0), str)))
  if not scores:
    raise ValueError(f"split {split!r} of {data.dataset!r} is empty")
  return (np.concatenate(scores), np.concatenate(labels), np.concatenate(masks),
          np.concatenate(groups).astype(str))


def dataset_attributes(data: Any, split: str) -> tuple[str, ...]:
  """The attributes the examples of ``split`` carry (``radjax.data.sources``), read off its first one."""
  from radjax.data.sources import get_source
  source = get_source(data, split)
  return tuple(source[0]["attributes"]) if len(source) else ()


def _defined(x: float) -> float | None:
  """A metric for JSON: None when undefined (NaN), else rounded to 6 decimals."""
  return None if math.isnan(x) else round(float(x), 6)


def parse_operating_point(text: str) -> tuple[str, float | None]:
  """``--operating_point`` -> (rule, target): ``sensitivity=0.9``, ``specificity=0.95``, ``youden``
  or ``threshold=0.5`` (``metrics.operating_threshold``)."""
  from radjax.eval.metrics import OPERATING_RULES
  rule, sep, value = text.partition("=")
  usage = ("expected sensitivity=P or specificity=P (P in (0, 1]: the share of positives found, or "
           "of negatives cleared, on the validation split), youden, or threshold=T")
  if rule not in OPERATING_RULES or (rule == "youden") == bool(sep):
    raise ConfigError(f"--operating_point {text!r}: {usage}")
  if rule == "youden":
    return rule, None
  try:
    target = float(value)
  except ValueError:
    raise ConfigError(f"--operating_point {text!r}: {value!r} is not a number; {usage}") from None
  if not math.isfinite(target) or (rule != "threshold" and not 0.0 < target <= 1.0):
    raise ConfigError(f"--operating_point {text!r}: {usage}")
  return rule, target


def choose_operating_point(probabilities: Callable[[np.ndarray], np.ndarray], data: Any, text: str,
                           split: str = "validation") -> dict[str, Any]:
  """Per-label decision thresholds chosen by the rule ``text`` (``parse_operating_point``) on
  ``split`` of the classifier's own dataset ``data``: the split training picked its best checkpoint
  on, never the test split the thresholds are then judged on. A threshold the rule cannot define
  there (a label without positives, say) is None: that label gets no decision."""
  from radjax.data.pipeline import label_names
  from radjax.eval import metrics
  rule, target = parse_operating_point(text)
  s, y, m, _ = score_split(probabilities, data, split)
  thresholds, rates = {}, {}
  for k, name in enumerate(label_names(data)):
    t = metrics.operating_threshold(s[:, k], y[:, k], m[:, k], rule, target)
    thresholds[name] = None if math.isnan(t) else t  # exact: a probability, or just above one
    rates[name] = ({} if math.isnan(t) else
                   {r: _defined(v) for r, v in metrics.rates_at(s[:, k], y[:, k], m[:, k], t).items()
                    if r in ("sensitivity", "specificity")})
  return {"rule": text, "chosen_on": f"{data.dataset}/{split}", "examples": int(len(s)),
          "thresholds": thresholds, "rates_where_chosen": rates}


def describe_operating_point(point: dict[str, Any]) -> str:
  return f"{point['rule']} (chosen on {point['chosen_on']})"


def format_operating_point(point: dict[str, Any]) -> str:
  """The thresholds of ``choose_operating_point`` and what they achieved where they were chosen."""
  width = max(len(n) for n in point["thresholds"])
  lines = [f"decision thresholds at {describe_operating_point(point)}, {point['examples']} examples:"]
  for name, threshold in point["thresholds"].items():
    if threshold is None:
      lines.append(f"  {name:<{width}}  none: the rule has no answer there (one class only); no decision")
    else:
      rates = point["rates_where_chosen"][name]
      lines.append(f"  {name:<{width}}  {threshold:.4g}  (sensitivity {_number(rates['sensitivity'])}, "
                   f"specificity {_number(rates['specificity'])})")
  return "\n".join(lines)


MISSING_GROUP = "(missing)"  # the group of examples whose attribute is blank


def _group_order(value: str) -> tuple:
  """Age bands youngest first, other values alphabetically, the blank group last."""
  from radjax.data.attributes import AGE_BANDS
  bands = [name for _, name in AGE_BANDS]
  return (value == "", bands.index(value) if value in bands else len(bands), value)


def _scores_of(s: np.ndarray, y: np.ndarray, m: np.ndarray, names: Sequence[str],
               thresholds: dict[str, float | None], n_boot: int) -> dict[str, Any]:
  """``evaluate``'s figures for probabilities ``s`` [N, K], labels ``y`` and mask ``m`` [N, K]."""
  from radjax.eval import metrics
  per_label = {}
  for k, name in enumerate(names):
    sk, yk, mk = s[:, k], y[:, k], m[:, k]
    observed = mk > 0
    point, lo, hi = metrics.bootstrap_ci(metrics.auroc, sk, yk, mk, n_boot=n_boot)
    r = per_label[name] = {
        "auroc": _defined(point), "auroc_lo": _defined(lo), "auroc_hi": _defined(hi),
        "auprc": _defined(metrics.auprc(sk, yk, mk)),
        "positives": int(((yk == 1) & observed).sum()), "negatives": int(((yk == 0) & observed).sum()),
        "brier": _defined(metrics.brier(sk, yk, mk)),
        "mean_probability": _defined(float(sk[observed].mean()) if observed.any() else math.nan),
        "prevalence": _defined(float(yk[observed].mean()) if observed.any() else math.nan),
        "calibration_in_the_large": _defined(metrics.calibration_in_the_large(sk, yk, mk))}
    point, lo, hi = metrics.bootstrap_ci(metrics.calibration_slope, sk, yk, mk, n_boot=n_boot)
    r["calibration_slope"], r["calibration_slope_lo"], r["calibration_slope_hi"] = (
        _defined(point), _defined(lo), _defined(hi))
    threshold = thresholds.get(name)
    if threshold is not None:
      r["threshold"] = threshold
      for rate, (value, lo, hi) in metrics.rates_with_ci(sk, yk, mk, threshold, n_boot=n_boot).items():
        r[rate], r[f"{rate}_lo"], r[f"{rate}_hi"] = _defined(value), _defined(lo), _defined(hi)
  point, lo, hi = metrics.bootstrap_ci(metrics.multilabel_macro_auroc, s, y, m, n_boot=n_boot)
  return {"examples": int(len(s)), "labels": per_label,
          "macro_auroc": {"auroc": _defined(point), "auroc_lo": _defined(lo), "auroc_hi": _defined(hi)}}


def evaluate(classifier: Deployed, split: str = "test", *, n_boot: int = 1000, batch_size: int = 64,
             by: Sequence[str] = (), min_group: int = 20) -> dict[str, Any]:
  """On ``split`` of the classifier's dataset (``open_classifier``), per label: AUROC (95%
  percentile-bootstrap interval over examples), AUPRC, class counts, and calibration (Brier score,
  mean probability against prevalence, calibration-in-the-large, and the calibration slope with
  an interval); the macro AUROC over the labels that have both classes;
  and with an operating point, sensitivity, specificity, PPV and NPV at its thresholds, with
  intervals. Undefined values (a label without positives or negatives) are None.

  by: attributes of the examples (``dataset_attributes``) whose groups are scored apart as well,
  in ``subgroups[attribute]``; a group of fewer than ``min_group`` examples is neither scored
  nor named (a handful of films says little, and a rare value can single a patient out): they
  are counted together in ``smaller_groups``."""
  from radjax.data.pipeline import label_names
  data = classifier.data
  if by:
    known = dataset_attributes(data, split)
    unknown = [a for a in by if a not in known]
    if unknown:
      raise ConfigError(f"--by {','.join(unknown)}: {data.dataset} examples have "
                        + (f"the attributes {', '.join(known)}" if known else "no attributes")
                        + ("; an image_table build keeps the columns named by --builder_config attributes=..."
                           if data.dataset == "image_table" else ""))
  if min_group < 1:
    raise ConfigError(f"--min_group must be >= 1, got {min_group}")
  s, y, m, groups = score_split(classifier.probabilities, data, split, batch_size, attributes=by)
  names = label_names(data)
  point_of = classifier.operating_point
  thresholds = point_of["thresholds"] if point_of else {}
  result = {"workdir": classifier.workdir, "model_file": classifier.model_file,
            "checkpoint": classifier.description, "dataset": data.dataset, "split": split,
            **_scores_of(s, y, m, names, thresholds, n_boot),
            "operating_point": None if point_of is None else {
                k: point_of[k] for k in ("rule", "chosen_on", "examples")}}
  if by:
    result["subgroups"] = {}
    for a, attribute in enumerate(by):
      values, counts = np.unique(groups[:, a], return_counts=True)
      scored = {}
      for value, count in sorted(zip(values, counts), key=lambda vc: _group_order(vc[0])):
        if count >= min_group:
          rows = groups[:, a] == value
          scored[str(value) or MISSING_GROUP] = _scores_of(s[rows], y[rows], m[rows], names, thresholds, n_boot)
      small = counts < min_group
      result["subgroups"][attribute] = {
          "groups": scored, "min_group": min_group,
          "smaller_groups": {"groups": int(small.sum()), "examples": int(counts[small].sum())}}
  return result


def _interval(r: dict[str, Any], key: str) -> str:
  if r.get(key) is None:
    return "n/a"
  if r[f"{key}_lo"] is None:  # no resample held what the metric needs
    return f"{r[key]:.3f}"
  return f"{r[key]:.3f} [{r[f'{key}_lo']:.3f}, {r[f'{key}_hi']:.3f}]"


def _number(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def format_evaluation(result: dict[str, Any]) -> str:
  width = max(len(n) for n in [*result["labels"], "macro"])
  lines = [f"{result['workdir'] or result['model_file']} ({result['checkpoint']}) on "
           f"{result['dataset']}/{result['split']}, {result['examples']} examples",
           f"{'label':<{width}}  {'AUROC [95% CI]':<24} {'AUPRC':>6} {'Brier':>6} {'mean p':>7} "
           f"{'prev.':>6} {'slope':>6} {'pos':>6} {'neg':>6}"]
  for name, r in result["labels"].items():
    lines.append(f"{name:<{width}}  {_interval(r, 'auroc'):<24} {_number(r['auprc']):>6} "
                 f"{_number(r['brier']):>6} {_number(r['mean_probability']):>7} {_number(r['prevalence']):>6} "
                 f"{_number(r['calibration_slope']):>6} {r['positives']:>6} {r['negatives']:>6}")
  lines.append(f"{'macro':<{width}}  {_interval(result['macro_auroc'], 'auroc')}")
  if result["operating_point"]:
    lines += ["", f"decisions at {describe_operating_point(result['operating_point'])}:",
              f"{'label':<{width}}  {'threshold':>9}  {'sensitivity [95% CI]':<24} "
              f"{'specificity [95% CI]':<24} {'PPV':>6} {'NPV':>6}"]
    for name, r in result["labels"].items():
      if "threshold" not in r:
        lines.append(f"{name:<{width}}  {'none':>9}  (the rule had no answer where it was chosen)")
        continue
      lines.append(f"{name:<{width}}  {r['threshold']:>9.4g}  {_interval(r, 'sensitivity'):<24} "
                   f"{_interval(r, 'specificity'):<24} {_number(r['ppv']):>6} {_number(r['npv']):>6}")
  for attribute, sub in result.get("subgroups", {}).items():
    groups, smaller = sub["groups"], sub["smaller_groups"]
    lines += ["", f"by {attribute}: AUROC [95% CI] per group"
              + (f" (left out, under {sub['min_group']} examples each: {smaller['groups']} group(s), "
                 f"{smaller['examples']} examples)" if smaller["groups"] else "")]
    if not groups:
      continue
    heads = [f"{value} ({g['examples']})" for value, g in groups.items()]
    lines.append(f"{'label':<{width}}  " + " ".join(f"{h:<24}" for h in heads).rstrip())
    for name in result["labels"]:
      lines.append(f"{name:<{width}}  " + " ".join(f"{_interval(g['labels'][name], 'auroc'):<24}"
                                                   for g in groups.values()).rstrip())
    lines.append(f"{'macro':<{width}}  " + " ".join(f"{_interval(g['macro_auroc'], 'auroc'):<24}"
                                                    for g in groups.values()).rstrip())
    if result["operating_point"]:
      lines += [f"sensitivity / specificity at {result['operating_point']['rule']}:",
                f"{'label':<{width}}  " + " ".join(f"{h:<24}" for h in heads).rstrip()]
      for name in result["labels"]:
        cells = [f"{_number(r.get('sensitivity'))} / {_number(r.get('specificity'))}"
                 if "threshold" in r else "none" for r in (g["labels"][name] for g in groups.values())]
        lines.append(f"{name:<{width}}  " + " ".join(f"{c:<24}" for c in cells).rstrip())
  return "\n".join(lines)


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
  preprocess = Preprocess(classifier.data, _NoReports(), train=False, names=names)
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


def write_evaluation(result: dict[str, Any], path: str) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=2, allow_nan=False)
  os.replace(path + ".tmp", path)
