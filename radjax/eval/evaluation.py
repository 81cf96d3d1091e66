"""A deployed classifier judged on a split of its dataset, and the decision thresholds it may carry.

    radjax evaluate --workdir runs/ft [--split test] [--by view,sex] [--operating_point sensitivity=0.9]

Per label: AUROC with a bootstrap interval, AUPRC, calibration (Brier score, mean probability
against prevalence, calibration-in-the-large and slope); with an operating point (thresholds chosen
on the validation split, ``choose_operating_point``) sensitivity, specificity, PPV and NPV at them;
with ``by``, the same per group of an attribute of the examples. Only images and labels are read:
no report reaches the scores or their output.
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from radjax.config import ConfigError

if TYPE_CHECKING:
  from radjax.eval.classifier import Deployed


class NoReports:
  """Stands in for the tokenizer: evaluation reads images and labels, never the report."""

  def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    del text
    return np.zeros((max_len,), np.int32), np.zeros((max_len,), np.int32)


def score_split(probabilities: Callable[[np.ndarray], np.ndarray], data: Any, split: str,
                batch_size: int = 64, attributes: Sequence[str] = ()) -> tuple[np.ndarray, ...]:
  """The classifier's probabilities on every example of ``split`` of the dataset ``data`` (a data
  config) -> (probabilities float32 [N, K], labels [N, K], label mask [N, K], the examples'
  ``attributes`` str [N, len(attributes)]), in the split's order."""
  from radjax.data.pipeline import make_loader
  loader = make_loader(data, split, batch_size=batch_size, seed=0, train=False,
                       tokenizer=NoReports(), num_epochs=1, attributes=attributes)
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


def evaluate(classifier: "Deployed", split: str = "test", *, n_boot: int = 1000, batch_size: int = 64,
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


def write_evaluation(result: dict[str, Any], path: str) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=2, allow_nan=False)
  os.replace(path + ".tmp", path)
