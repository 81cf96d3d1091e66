"""The study's outputs: per-run results CSV, per-setting summary CSV, AUROC-vs-n plots, a Markdown report.

A *result row* is one (dataset, task, pre-training, fine-tuning, training-set size,
seed) run, a dict with at least ``RESULT_COLUMNS``:

  dataset, task, task_kind, pretrain, finetune, n_train, seed, auroc

``n_train`` is an int or ``"all"``. ``pretrain_seed`` (optional, default 0) names the
pre-training run the row's encoder came from; it is written right after the required
columns. Optional extras (written after those, known ones first in this order):
``auroc_lo``, ``auroc_hi`` (bootstrap CI of that run), ``auprc``, ``teacher_auroc`` (the
report-seeing teacher of a distillation run), ``zero_shot_auroc``, ``n_train_actual`` (the
real size behind ``"all"``, used to place it on the plot's x axis); any other numeric or
short string extras are kept.

A *summary row* aggregates the runs of one (dataset, task, pretrain, finetune,
n_train) setting: ``SUMMARY_COLUMNS`` (mean, sample std, t-interval over seeds, or
over the pre-training runs' means when there are several), ``n_pretrain_seeds``,
and ``<extra>_mean`` for every numeric extra.

Patient data: rows must never carry report text. Keys that name text
(``report``, ``impression``, ...) and long string values are rejected, and
nothing here reads reports.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from radjax.eval.metrics import seed_summary

__all__ = [
    "RESULT_COLUMNS",
    "KNOWN_EXTRAS",
    "SUMMARY_COLUMNS",
    "REPORT_PRETRAINS",
    "IMAGE_ONLY_PRETRAINS",
    "write_results_csv",
    "read_results_csv",
    "summarise",
    "write_summary_csv",
    "read_summary_csv",
    "plot_filename",
    "plot_auroc_vs_n",
    "answer_questions",
    "write_report_md",
]

RESULT_COLUMNS: tuple[str, ...] = ("dataset", "task", "task_kind", "pretrain", "finetune", "n_train", "seed", "auroc")
KNOWN_EXTRAS: tuple[str, ...] = ("auroc_lo", "auroc_hi", "auprc", "teacher_auroc", "zero_shot_auroc", "n_train_actual")
# Optional in what is read (older results have one pre-training run, seed 0), always written.
PRETRAIN_SEED = "pretrain_seed"
WRITTEN_COLUMNS: tuple[str, ...] = RESULT_COLUMNS + (PRETRAIN_SEED,)
GROUP_COLUMNS: tuple[str, ...] = ("dataset", "task", "pretrain", "finetune", "n_train")
SUMMARY_COLUMNS: tuple[str, ...] = ("dataset", "task", "task_kind", "pretrain", "finetune", "n_train", "n_seeds",
                                    "auroc_mean", "auroc_std", "auroc_ci95_lo", "auroc_ci95_hi", "ci_source")

# Pre-trainings that read the report vs. those that see images (and labels) only.
REPORT_PRETRAINS: tuple[str, ...] = ("clip", "siglip", "mrm", "clip_ssl", "caption", "unicl")
IMAGE_ONLY_PRETRAINS: tuple[str, ...] = ("none", "ssl", "supervised")
PRETRAIN_ORDER: tuple[str, ...] = ("none", "supervised", "ssl", "clip", "siglip", "mrm", "clip_ssl", "caption", "unicl")
FINETUNE_ORDER: tuple[str, ...] = ("linear", "full", "self_distill", "distill", "full_distill", "zero_shot")
DISTILL_FINETUNES: tuple[str, ...] = ("distill", "full_distill")
# distill with an image-only teacher: the control that tells the report's share of distillation's
# gain from what soft targets do on their own (smoothing, self-distillation).
SELF_DISTILL = "self_distill"
# Fine-tunings that train the encoder end to end (the others fit a head on frozen features).
FULL_FINETUNES: tuple[str, ...] = ("full", "full_distill")
# Fine-tunings that use the report (distillation), a teacher (self-distillation) or no labels
# (zero-shot) do not isolate the effect of pre-training, so pre-training comparisons use the others.
_NOT_PRETRAIN_COMPARABLE = DISTILL_FINETUNES + (SELF_DISTILL, "zero_shot")
_ALIGNMENT = ("clip", "siglip")

_TEXT_KEYS = frozenset({"report", "reports", "report_text", "text", "impression", "impressions", "findings",
                        "caption", "section_text"})
_MAX_STR = 120  # longer strings look like free text, which results must not carry
_SMALL_DIFF = 0.01  # AUROC difference treated as negligible when no CI is available


# ----------------------------------------------------------------------------
# Row normalisation.


def _norm_n(v: Any, where: str) -> int | str:
  if isinstance(v, str):
    s = v.strip()
    if s.lower() == "all":
      return "all"
    try:
      v = float(s)
    except ValueError:
      raise ValueError(f"{where}: n_train must be an int or 'all', got {v!r}") from None
  if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
    raise ValueError(f"{where}: n_train must be an int or 'all', got {v!r}")
  if not float(v).is_integer() or v <= 0:
    raise ValueError(f"{where}: n_train must be a positive integer or 'all', got {v!r}")
  return int(v)


def _to_float(v: Any) -> float:
  if v is None or (isinstance(v, str) and v.strip() in ("", "nan", "NaN", "None")):
    return math.nan
  return float(v)


def _n_key(n: int | str) -> tuple[int, float]:
  return (1, math.inf) if n == "all" else (0, float(n))


def _order_key(value: str, order: Sequence[str]) -> tuple[int, str]:
  return (order.index(value), "") if value in order else (len(order), value)


def _check_extra(key: str, value: Any, where: str) -> Any:
  if key.lower() in _TEXT_KEYS:
    raise ValueError(f"{where}: column {key!r} would carry report text; results must not contain reports")
  if isinstance(value, str):
    if len(value) > _MAX_STR:
      raise ValueError(f"{where}: column {key!r} holds a {len(value)}-character string; results must not carry "
                       "free text (reports)")
    try:
      return float(value) if value.strip() else math.nan
    except ValueError:
      return value
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    return value.item()
  return value


def _normalise_row(row: Mapping[str, Any], i: int) -> dict[str, Any]:
  where = f"result row {i}"
  missing = [c for c in RESULT_COLUMNS if c not in row]
  if missing:
    raise ValueError(f"{where}: missing column(s) {missing}; required {list(RESULT_COLUMNS)}")
  out: dict[str, Any] = {}
  for c in ("dataset", "task", "task_kind", "pretrain", "finetune"):
    v = row[c]
    if not isinstance(v, str) or not v.strip():
      raise ValueError(f"{where}: {c} must be a non-empty string, got {v!r}")
    if len(v) > _MAX_STR:
      raise ValueError(f"{where}: {c} is a {len(v)}-character string; results must not carry free text")
    out[c] = v.strip()
  out["n_train"] = _norm_n(row["n_train"], where)
  for c in ("seed", PRETRAIN_SEED):
    try:
      seed = float(row.get(c, 0))
      if not seed.is_integer():
        raise ValueError
    except (TypeError, ValueError):
      raise ValueError(f"{where}: {c} must be an integer, got {row[c]!r}") from None
    out[c] = int(seed)
  try:
    out["auroc"] = _to_float(row["auroc"])
  except (TypeError, ValueError):
    raise ValueError(f"{where}: auroc must be a number, got {row['auroc']!r}") from None
  if not math.isnan(out["auroc"]) and not 0.0 <= out["auroc"] <= 1.0:
    raise ValueError(f"{where}: auroc must be in [0, 1], got {out['auroc']}")
  for k, v in row.items():
    if k not in out:
      out[k] = _check_extra(k, v, where)
  return out


def _row_sort_key(r: Mapping[str, Any]):
  return (r["dataset"], r["task"], _order_key(r["pretrain"], PRETRAIN_ORDER), _order_key(r["finetune"], FINETUNE_ORDER),
          _n_key(r["n_train"]), r.get(PRETRAIN_SEED, 0), r.get("seed", 0))


def _extra_columns(rows: Sequence[Mapping[str, Any]], fixed: Sequence[str]) -> list[str]:
  seen: "OrderedDict[str, None]" = OrderedDict()
  for r in rows:
    for k in r:
      if k not in fixed:
        seen[k] = None
  known = [k for k in KNOWN_EXTRAS if k in seen]
  return known + [k for k in seen if k not in KNOWN_EXTRAS]


def _fmt_cell(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return "nan" if math.isnan(v) else repr(v)
  return str(v)


def _write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(columns)
    for r in rows:
      w.writerow([_fmt_cell(r.get(c)) for c in columns])
  os.replace(tmp, path)  # readers never see a half-written file
  return path


# ----------------------------------------------------------------------------
# Results and summary CSVs.


def write_results_csv(rows: Iterable[Mapping[str, Any]], path: str) -> str:
  """Writes per-run results, columns ``RESULT_COLUMNS`` then extras; returns ``path``.

  Rows are validated and stably sorted by dataset, task, pre-training and
  fine-tuning (canonical method order), n_train ('all' last), seed.
  """
  norm = sorted((_normalise_row(r, i) for i, r in enumerate(rows)), key=_row_sort_key)
  return _write_csv(norm, list(WRITTEN_COLUMNS) + _extra_columns(norm, WRITTEN_COLUMNS), path)


def _read_csv(path: str, required: Sequence[str]) -> list[dict[str, Any]]:
  with open(path, newline="") as f:
    reader = csv.reader(f)
    try:
      header = next(reader)
    except StopIteration:
      raise ValueError(f"{path}: empty file, expected header {list(required)}") from None
    if tuple(header[:len(required)]) != tuple(required):
      raise ValueError(f"{path}: header starts {header[:len(required)]}, expected {list(required)}")
    rows = []
    for line_no, values in enumerate(reader, start=2):
      if len(values) != len(header):
        raise ValueError(f"{path}:{line_no}: {len(values)} fields, header has {len(header)}")
      rows.append(dict(zip(header, values)))
  return rows


def read_results_csv(path: str) -> list[dict[str, Any]]:
  """Reads a results CSV back into normalised rows (numbers as float/int, 'all' kept)."""
  return [_normalise_row(r, i) for i, r in enumerate(_read_csv(path, RESULT_COLUMNS))]


def summarise(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Aggregates seeds per (dataset, task, pretrain, finetune, n_train).

  Returns summary rows (sorted like the results) with ``SUMMARY_COLUMNS``:
  ``n_seeds`` counts runs with a defined AUROC; ``auroc_ci95_lo/hi`` is the
  t-interval for the mean over seeds (``ci_source = "seeds"``); with a single
  seed it falls back to that run's bootstrap interval ``auroc_lo/hi`` if given
  (``"bootstrap"``), else NaN (``"none"``).

  With several pre-training seeds, the fine-tuning seeds of one pre-training run
  share its encoder and are not independent: ``auroc_mean``, ``auroc_std`` and the
  t-interval are then taken over the pre-training runs' mean AUROCs
  (``ci_source = "pretrain_seeds"``). ``n_pretrain_seeds`` counts those runs.
  Every other numeric extra ``x`` becomes ``x_mean`` (NaN-ignoring mean over runs).
  """
  norm = [_normalise_row(r, i) for i, r in enumerate(rows)]
  kinds: dict[tuple[str, str], str] = {}
  groups: "OrderedDict[tuple, list[dict[str, Any]]]" = OrderedDict()
  for i, r in enumerate(norm):
    dt = (r["dataset"], r["task"])
    if kinds.setdefault(dt, r["task_kind"]) != r["task_kind"]:
      raise ValueError(f"result row {i}: task_kind {r['task_kind']!r} for {dt} conflicts with earlier "
                       f"{kinds[dt]!r}")
    key = tuple(r[c] for c in GROUP_COLUMNS)
    grp = groups.setdefault(key, [])
    if any((g[PRETRAIN_SEED], g["seed"]) == (r[PRETRAIN_SEED], r["seed"]) for g in grp):
      raise ValueError(f"result row {i}: duplicate seed {r['seed']} (pre-training seed {r[PRETRAIN_SEED]}) "
                       f"for {dict(zip(GROUP_COLUMNS, key))}")
    grp.append(r)

  extras = [c for c in _extra_columns(norm, WRITTEN_COLUMNS)
            if all(r.get(c) is None or isinstance(r.get(c), (int, float)) for r in norm)]
  out = []
  for key, grp in groups.items():
    aurocs = np.array([g["auroc"] for g in grp], np.float64)
    runs: dict[int, list[float]] = {}
    for g in grp:
      runs.setdefault(g[PRETRAIN_SEED], []).append(g["auroc"])
    run_means = [float(np.nanmean(v)) for v in runs.values() if np.isfinite(v).any()]
    several = len(runs) > 1
    s = seed_summary(run_means if several else aurocs)
    row: dict[str, Any] = dict(zip(GROUP_COLUMNS, key))
    row["task_kind"] = kinds[(row["dataset"], row["task"])]
    lo, hi, source = s["ci95_lo"], s["ci95_hi"], "pretrain_seeds" if several else "seeds"
    if s["n"] < 2:
      lo = hi = math.nan
      source = "none"
      if s["n"] == 1 and not several:
        only = next(g for g in grp if not math.isnan(g["auroc"]))
        blo, bhi = _to_float(only.get("auroc_lo")), _to_float(only.get("auroc_hi"))
        if not (math.isnan(blo) or math.isnan(bhi)):
          lo, hi, source = blo, bhi, "bootstrap"
    row.update(n_seeds=int(np.isfinite(aurocs).sum()), n_pretrain_seeds=len(run_means), auroc_mean=s["mean"],
               auroc_std=s["std"], auroc_ci95_lo=lo, auroc_ci95_hi=hi, ci_source=source)
    for c in extras:
      vals = np.array([_to_float(g.get(c)) for g in grp], np.float64)
      vals = vals[np.isfinite(vals)]
      row[f"{c}_mean"] = float(vals.mean()) if vals.size else math.nan
    out.append(row)
  out.sort(key=_row_sort_key)
  return out


def write_summary_csv(summary: Sequence[Mapping[str, Any]], path: str) -> str:
  """Writes summary rows, ``SUMMARY_COLUMNS`` first then the ``*_mean`` extras; returns ``path``."""
  return _write_csv(list(summary), list(SUMMARY_COLUMNS) + _extra_columns(summary, SUMMARY_COLUMNS), path)


def read_summary_csv(path: str) -> list[dict[str, Any]]:
  """Reads a summary CSV (numbers parsed, n_train int or 'all')."""
  rows = _read_csv(path, SUMMARY_COLUMNS)
  for i, r in enumerate(rows):
    for k, v in list(r.items()):
      if k == "n_train":
        r[k] = _norm_n(v, f"{path} row {i}")
      elif k in ("n_seeds", "n_pretrain_seeds"):
        r[k] = int(float(v))
      elif k not in ("dataset", "task", "task_kind", "pretrain", "finetune", "ci_source"):
        try:
          r[k] = _to_float(v)
        except ValueError:
          pass
  return rows


def _coerce_summary(summary: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  out = []
  for i, r in enumerate(summary):
    missing = [c for c in ("dataset", "task", "pretrain", "finetune", "n_train", "auroc_mean") if c not in r]
    if missing:
      raise ValueError(f"summary row {i}: missing column(s) {missing}")
    d = dict(r)
    d["n_train"] = _norm_n(d["n_train"], f"summary row {i}")
    for c in ("auroc_mean", "auroc_ci95_lo", "auroc_ci95_hi", "teacher_auroc_mean", "n_train_actual_mean"):
      if c in d:
        d[c] = _to_float(d[c])
    out.append(d)
  return out


def _by_task(summary: Sequence[Mapping[str, Any]]) -> "OrderedDict[tuple[str, str], list[dict[str, Any]]]":
  tasks: "OrderedDict[tuple[str, str], list[dict[str, Any]]]" = OrderedDict()
  for r in sorted(summary, key=_row_sort_key):
    tasks.setdefault((r["dataset"], r["task"]), []).append(r)
  return tasks


def _task_keys(tasks: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
  """Answer keys: the task name, or ``dataset/task`` where two datasets share a task name."""
  tasks = list(tasks)
  names = [t for _, t in tasks]
  return {(d, t): (t if names.count(t) == 1 else f"{d}/{t}") for d, t in tasks}


# ----------------------------------------------------------------------------
# Plots.


def plot_filename(dataset: str, task: str) -> str:
  """File name of the AUROC-vs-n plot of one task."""
  safe = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "_", s)
  return f"auroc_vs_n__{safe(dataset)}__{safe(task)}.png"


def _method_label(pretrain: str, finetune: str) -> str:
  return f"{pretrain} / {finetune}"


def _x_positions(rows: Sequence[Mapping[str, Any]]) -> tuple[dict[Any, float], str]:
  """x coordinate of each n_train; 'all' goes one log-step right of the largest n unless its real size is known."""
  numeric = sorted({r["n_train"] for r in rows if r["n_train"] != "all"})
  pos: dict[Any, float] = {n: float(n) for n in numeric}
  all_label = "all"
  if any(r["n_train"] == "all" for r in rows):
    actual = [r.get("n_train_actual_mean", math.nan) for r in rows if r["n_train"] == "all"]
    actual = [a for a in actual if isinstance(a, (int, float)) and math.isfinite(a)]
    largest = numeric[-1] if numeric else 1.0
    if actual and max(actual) > largest:
      pos["all"] = float(max(actual))
      all_label = f"all\n({int(round(max(actual)))})"
    else:
      pos["all"] = float(largest) * 2.0
  return pos, all_label


def plot_auroc_vs_n(summary: Sequence[Mapping[str, Any]], out_dir: str, dpi: int = 120) -> list[str]:
  """One PNG per (dataset, task): AUROC vs training-set size, one line per pretrain x finetune.

  Log x axis; ``"all"`` is drawn at its real size when ``n_train_actual`` was
  recorded, else one step right of the largest n, with an "all" tick. Shaded
  bands are the summary's 95% CIs; colour = pre-training, line style =
  fine-tuning. Returns the PNG paths in task order.
  """
  from matplotlib.figure import Figure  # no pyplot: no global backend state, safe headless

  summary = _coerce_summary(summary)
  os.makedirs(out_dir, exist_ok=True)
  cmap = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]
  styles = {"linear": "--", "full": "-", "self_distill": (0, (1, 2)), "distill": "-.",
            "full_distill": (0, (5, 1, 1, 1)), "zero_shot": ":"}
  markers = {"linear": "s", "full": "o", "self_distill": "d", "distill": "^", "full_distill": "v", "zero_shot": "x"}
  paths = []
  for (dataset, task), rows in _by_task(summary).items():
    pos, all_label = _x_positions(rows)
    pretrains = sorted({r["pretrain"] for r in rows}, key=lambda p: _order_key(p, PRETRAIN_ORDER))
    colour = {p: cmap[(PRETRAIN_ORDER.index(p) if p in PRETRAIN_ORDER else len(PRETRAIN_ORDER) + i) % len(cmap)]
              for i, p in enumerate(pretrains)}
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    methods: "OrderedDict[tuple[str, str], list[dict[str, Any]]]" = OrderedDict()
    for r in rows:
      methods.setdefault((r["pretrain"], r["finetune"]), []).append(r)
    for (p, f), mrows in methods.items():
      mrows = sorted(mrows, key=lambda r: _n_key(r["n_train"]))
      x = np.array([pos[r["n_train"]] for r in mrows])
      y = np.array([r["auroc_mean"] for r in mrows], np.float64)
      lo = np.array([r.get("auroc_ci95_lo", math.nan) for r in mrows], np.float64)
      hi = np.array([r.get("auroc_ci95_hi", math.nan) for r in mrows], np.float64)
      ax.plot(x, y, linestyle=styles.get(f, "-"), marker=markers.get(f, "o"), markersize=4, color=colour[p],
              label=_method_label(p, f))
      band = np.isfinite(lo) & np.isfinite(hi)
      if band.any():
        ax.fill_between(x, np.where(band, lo, np.nan), np.where(band, hi, np.nan), color=colour[p], alpha=0.12,
                        linewidth=0)
    if ax.get_ylim()[0] <= 0.5:  # a chance line, but without stretching the axis down to it
      ax.axhline(0.5, color="0.6", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ticks = sorted(pos.items(), key=lambda kv: kv[1])
    ax.set_xticks([v for _, v in ticks])
    ax.set_xticklabels([all_label if k == "all" else str(k) for k, _ in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training examples (n_train)")
    ax.set_ylabel("AUROC")
    kind = rows[0].get("task_kind", "")
    ax.set_title(f"{dataset}: {task}" + (f" ({kind})" if kind else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    path = os.path.join(out_dir, plot_filename(dataset, task))
    fig.savefig(path, dpi=dpi)
    paths.append(path)
  return paths


# ----------------------------------------------------------------------------
# Plain-language answers.


def _finite(v: Any) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(v)


def _fmt_ci(r: Mapping[str, Any]) -> str:
  lo, hi = r.get("auroc_ci95_lo", math.nan), r.get("auroc_ci95_hi", math.nan)
  ci = f" [{lo:.3f}, {hi:.3f}]" if _finite(lo) and _finite(hi) else ""
  return f"{r['auroc_mean']:.3f}{ci}"


def _describe(r: Mapping[str, Any]) -> str:
  return f"{r['pretrain']} + {r['finetune']} fine-tuning, AUROC {_fmt_ci(r)}"


def _overlap(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool | None:
  """Whether the two 95% CIs overlap; None when either is missing."""
  vals = [a.get("auroc_ci95_lo"), a.get("auroc_ci95_hi"), b.get("auroc_ci95_lo"), b.get("auroc_ci95_hi")]
  if not all(_finite(v) for v in vals):
    return None
  return not (vals[0] > vals[3] or vals[2] > vals[1])


def _diff_text(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[float, bool | None, str]:
  diff = a["auroc_mean"] - b["auroc_mean"]
  diff = 0.0 if abs(diff) < 5e-4 else diff  # no "-0.000"
  ov = _overlap(a, b)
  if ov is None:
    ci = "no confidence intervals are available (single seed without bootstrap), so this is tentative"
  elif ov:
    ci = "the 95% CIs overlap"
  else:
    ci = "the 95% CIs do not overlap"
  return diff, ov, f"difference {diff:+.3f} AUROC; {ci}"


def _direction(diff: float, ov: bool | None) -> int:
  """+1 / -1 for a difference worth stating, 0 for none (overlapping CIs or a negligible gap)."""
  if ov is True or (ov is None and abs(diff) < _SMALL_DIFF):
    return 0
  return 1 if diff > 0 else -1


def _best(rows: Sequence[Mapping[str, Any]], pretrains: Sequence[str], n: Any,
          finetunes: Sequence[str] | None = None) -> dict[str, Any] | None:
  cands = [r for r in rows if r["pretrain"] in pretrains and r["n_train"] == n and _finite(r["auroc_mean"])
           and (r["finetune"] in finetunes if finetunes is not None else r["finetune"] not in _NOT_PRETRAIN_COMPARABLE)]
  return max(cands, key=lambda r: r["auroc_mean"]) if cands else None


def _n_text(n: Any) -> str:
  return "n = all" if n == "all" else f"n = {n}"


def _answer_reports_helped(rows, sizes) -> str:
  parts = []
  for n in sizes:
    rep, img = _best(rows, REPORT_PRETRAINS, n), _best(rows, IMAGE_ONLY_PRETRAINS, n)
    if rep is None or img is None:
      continue
    diff, ov, dt = _diff_text(rep, img)
    d = _direction(diff, ov)
    verdict = {1: "reports in pre-training appear to help here",
               -1: "reports in pre-training appear to hurt here",
               0: "there is no clear difference between report-using and image-only pre-training here"}[d]
    if ov is None and d != 0:
      verdict = verdict.replace("appear to", "may")
    parts.append(f"At {_n_text(n)}, the best report-using pre-training ({_describe(rep)}) vs the best image-only "
                 f"pre-training ({_describe(img)}): {dt}, so {verdict}.")
  if not parts:
    return ("Did reports help in pre-training? Not answerable: the results lack a report-using or an image-only "
            "pre-training at a common training-set size.")
  return "Did reports help in pre-training? " + " ".join(parts)


def _answer_alignment(rows, sizes) -> str:
  align_name = next((p for p in _ALIGNMENT if any(r["pretrain"] == p for r in rows)), None)
  if align_name is None or not any(r["pretrain"] == "ssl" for r in rows):
    return "Did alignment hurt compared with self-supervision? Not answerable: needs both clip (or siglip) and ssl."
  parts = []
  for n in sizes:
    al, ssl, mix = _best(rows, (align_name,), n), _best(rows, ("ssl",), n), _best(rows, ("clip_ssl",), n)
    if al is None or ssl is None:
      continue
    diff, ov, dt = _diff_text(al, ssl)
    d = _direction(diff, ov)
    hedge = "may" if ov is None else "appears to"
    if d < 0:
      s = f"At {_n_text(n)}, alignment ({_describe(al)}) vs ssl ({_describe(ssl)}): {dt}, so alignment {hedge} hurt."
    elif d > 0:
      s = (f"At {_n_text(n)}, alignment ({_describe(al)}) vs ssl ({_describe(ssl)}): {dt}, so alignment does not "
           f"appear to hurt (it {'may help' if ov is None else 'appears to help'}).")
    else:
      s = (f"At {_n_text(n)}, alignment ({_describe(al)}) vs ssl ({_describe(ssl)}): {dt}, so there is no clear sign "
           "that alignment hurts.")
    if mix is not None:
      d_mix_al, ov_mix_al, _ = _diff_text(mix, al)
      d_mix_ssl, ov_mix_ssl, _ = _diff_text(mix, ssl)
      vs = (f"clip_ssl ({_describe(mix)}) differs from alignment by {d_mix_al:+.3f} and from ssl by "
            f"{d_mix_ssl:+.3f}")
      if d < 0:
        if _direction(d_mix_ssl, ov_mix_ssl) >= 0:
          s += f" Adding self-supervision appears to recover it: {vs}, on par with or above ssl."
        elif _direction(d_mix_al, ov_mix_al) > 0:
          s += f" Adding self-supervision appears to recover it partly: {vs}, still below ssl."
        else:
          s += f" Adding self-supervision does not appear to recover it: {vs}."
      else:
        s += f" For reference, {vs}."
    parts.append(s)
  if not parts:
    return "Did alignment hurt compared with self-supervision? Not answerable: no common training-set size."
  return "Did alignment hurt compared with self-supervision? " + " ".join(parts)


def _paired(rows, n, treated: Sequence[str], control: Sequence[str]) -> list[tuple]:
  """Per pre-training at ``n``: the best of ``treated`` fine-tunings against the best of
  ``control`` -> [(pretrain, control row, difference, CIs overlap, direction)]."""
  comps = []
  for p in sorted({r["pretrain"] for r in rows}, key=lambda p: _order_key(p, PRETRAIN_ORDER)):
    a, b = _best(rows, (p,), n, finetunes=treated), _best(rows, (p,), n, finetunes=control)
    if a is not None and b is not None:
      diff, ov, _ = _diff_text(a, b)
      comps.append((p, b, diff, ov, _direction(diff, ov)))
  return comps


def _answer_distillation(rows, sizes) -> str:
  parts = []
  for n in sizes:
    comps = _paired(rows, n, DISTILL_FINETUNES, ("linear", "full"))
    if not comps:
      continue
    detail = "; ".join(f"{p}: {diff:+.3f} vs {base['finetune']} (CIs {_ci_word(ov)})" for p, base, diff, ov, _ in comps)
    helped = [c for c in comps if c[4] > 0]
    hurt = [c for c in comps if c[4] < 0]
    if helped and len(helped) >= len(hurt):
      best = max(helped, key=lambda c: c[2])
      verdict = (f"distillation appears to help for {len(helped)} of {len(comps)} pre-training(s) "
                 f"(largest gain {best[2]:+.3f} with {best[0]})")
    elif hurt:
      verdict = f"distillation appears to hurt for {len(hurt)} of {len(comps)} pre-training(s)"
    else:
      verdict = "distillation shows no clear benefit"
    parts.append(f"At {_n_text(n)}, distillation vs the better of linear / full fine-tuning with the same "
                 f"pre-training: {detail}; so {verdict}.")
    own = _report_share(rows, n)
    if own:
      parts.append(own)
  if not parts:
    return "Did distillation help? Not answerable: no distill runs with a linear or full fine-tuning counterpart."
  return "Did distillation help? " + " ".join(parts)


def _ci_word(ov: bool | None) -> str:
  return "overlap" if ov else "do not overlap" if ov is False else "unavailable"


def _report_share(rows, n) -> str | None:
  """distill vs self_distill (the same soft-target objective with an image-only teacher) at ``n``:
  how much of distillation's effect the report itself brings."""
  comps = _paired(rows, n, ("distill",), (SELF_DISTILL,))
  if not comps:
    return None
  detail = "; ".join(f"{p}: {diff:+.3f} (CIs {_ci_word(ov)})" for p, _, diff, ov, _ in comps)
  helped = sum(c[4] > 0 for c in comps)
  hurt = sum(c[4] < 0 for c in comps)
  verdict = (f"the report itself appears to add to it for {helped} of {len(comps)}" if helped > hurt else
             f"the report itself appears to take away from it for {hurt} of {len(comps)}" if hurt else
             "what distillation changes is not clearly the report's doing: an image-only teacher does about as well")
  return (f"Against self-distillation (the same objective with an image-only teacher), the report-seeing "
          f"teacher's students differ by {detail}; so {verdict}.")


def _teacher_note(rows, near_perfect: float) -> str | None:
  vals = [r.get("teacher_auroc_mean") for r in rows if _finite(r.get("teacher_auroc_mean"))]
  if not vals:
    return None
  top = max(vals)
  if top >= near_perfect:
    return (f"Note: the report-seeing teacher reaches AUROC {top:.3f}, which is near-perfect: the report appears to "
            "be overly predictive of this label (it nearly states it). The paper found that distillation's gain "
            "vanishes in this regime, so read the distillation result with that in mind.")
  return f"The report-seeing teacher reaches AUROC up to {top:.3f} (not near-perfect)."


def answer_questions(summary: Sequence[Mapping[str, Any]], *, small_n: int | None = None,
                     near_perfect: float = 0.97) -> dict[str, str]:
  """Plain-language, hedged answers to the study's questions, one text per task.

  For each task, at the smallest training-set size (or ``small_n``) and at
  ``"all"`` (or the largest n): (1) did reports help in pre-training (best
  report-using vs best image-only pre-training, over linear / full fine-tuning);
  (2) did alignment (clip, else siglip) hurt vs ssl, and did clip_ssl recover
  it; (3) did distillation help vs linear / full fine-tuning with the same
  pre-training; (4) a note when the teacher's AUROC is >= ``near_perfect``.
  Differences are stated with their 95% CIs and whether those overlap.

  Returns:
    dict keyed by task name (``dataset/task`` where a task name occurs in
    several datasets).
  """
  summary = _coerce_summary(summary)
  tasks = _by_task(summary)
  keys = _task_keys(tasks)
  answers = {}
  for dt, rows in tasks.items():
    numeric = sorted({r["n_train"] for r in rows if r["n_train"] != "all"})
    has_all = any(r["n_train"] == "all" for r in rows)
    small = small_n if small_n is not None else (numeric[0] if numeric else ("all" if has_all else None))
    large = "all" if has_all else (numeric[-1] if numeric else None)
    sizes = [s for s in dict.fromkeys([small, large]) if s is not None]
    texts = [_answer_reports_helped(rows, sizes), _answer_alignment(rows, sizes), _answer_distillation(rows, sizes)]
    note = _teacher_note(rows, near_perfect)
    if note:
      texts.append(note)
    answers[keys[dt]] = "\n\n".join(texts)
  return answers


# ----------------------------------------------------------------------------
# Markdown report.


def _md_escape(s: str) -> str:
  return str(s).replace("|", "\\|")


def _pivot_table(rows: Sequence[Mapping[str, Any]], column: str, with_ci: bool) -> str | None:
  """Markdown table method x n_train of ``column``; methods without any value are left out."""
  sizes = sorted({r["n_train"] for r in rows}, key=_n_key)
  methods: "OrderedDict[tuple[str, str], dict[Any, Mapping[str, Any]]]" = OrderedDict()
  for r in sorted(rows, key=_row_sort_key):
    if _finite(r.get(column)):
      methods.setdefault((r["pretrain"], r["finetune"]), {})[r["n_train"]] = r
  if not methods:
    return None
  best = {}
  for n in sizes:
    vals = [m[n][column] for m in methods.values() if n in m]
    best[n] = max(vals) if vals else None
  lines = ["| pre-training | fine-tuning | " + " | ".join(f"n = {n}" for n in sizes) + " |",
           "|---|---|" + "---|" * len(sizes)]
  for (p, f), cells in methods.items():
    out = []
    for n in sizes:
      r = cells.get(n)
      if r is None:
        out.append("–")
        continue
      txt = f"{_fmt_ci(r)} ({_runs_text(r)})" if with_ci else f"{r[column]:.3f}"
      out.append(f"**{txt}**" if with_ci and r[column] == best[n] else txt)
    lines.append(f"| {_md_escape(p)} | {_md_escape(f)} | " + " | ".join(out) + " |")
  return "\n".join(lines)


def _runs_text(r: Mapping[str, Any]) -> str:
  """"3" for three seeds; "3×3" for three pre-training runs of three fine-tuning seeds each."""
  n, runs = r.get("n_seeds", "?"), r.get("n_pretrain_seeds", 1)
  if isinstance(n, int) and isinstance(runs, int) and runs > 1 and n % runs == 0:
    return f"{runs}×{n // runs}"
  return str(n)


_EXTRA_TABLES = (("teacher_auroc_mean", "Teacher AUROC (image + report; mean over seeds)"),
                 ("zero_shot_auroc_mean", "Zero-shot AUROC (mean over seeds)"),
                 ("auprc_mean", "AUPRC (mean over seeds)"))


def write_report_md(rows: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]], plots: Sequence[str],
                    path: str, config_text: str | None = None, *, title: str = "radjax study report") -> str:
  """Writes the Markdown report: per task a plot, an AUROC table and the answers; returns ``path``.

  Args:
    rows: the per-run result rows (validated; used for run counts).
    summary: ``summarise(rows)`` (or ``read_summary_csv``).
    plots: PNG paths from ``plot_auroc_vs_n``; matched to tasks by ``plot_filename``,
      linked relative to the report.
    path: output .md path.
    config_text: the exact experiment config, appended verbatim in a code block.
  """
  norm = [_normalise_row(r, i) for i, r in enumerate(rows)]
  summary = _coerce_summary(summary)
  tasks = _by_task(summary)
  keys = _task_keys(tasks)
  answers = answer_questions(summary)
  report_dir = os.path.dirname(os.path.abspath(path))
  plot_by_name = {os.path.basename(p): p for p in plots}

  out = [f"# {title}", ""]
  datasets = sorted({r["dataset"] for r in norm} | {d for d, _ in tasks})
  out.append(f"{len(norm)} runs, {len(summary)} settings, {len(tasks)} task(s) on {', '.join(datasets) or '-'}. "
             "Cells give mean AUROC over seeds [95% CI] (number of seeds, or pre-training runs × fine-tuning "
             "seeds); the best mean per column is bold. CIs are t-intervals over seeds (over the pre-training "
             "runs' means when there are several), or a single run's bootstrap interval. Pre-trainings that read reports: "
             f"{', '.join(REPORT_PRETRAINS)}; image-only: {', '.join(IMAGE_ONLY_PRETRAINS)}. "
             "This report contains no report text.")
  out.append("")
  for (dataset, task), trows in tasks.items():
    kind = trows[0].get("task_kind", "")
    out += [f"## {dataset}: {task}" + (f" ({kind})" if kind else ""), ""]
    plot = plot_by_name.pop(plot_filename(dataset, task), None)
    if plot is not None:
      out += [f"![AUROC vs n_train for {task}]({os.path.relpath(os.path.abspath(plot), report_dir)})", ""]
    out += ["### AUROC", "", _pivot_table(trows, "auroc_mean", with_ci=True) or "(no results)", ""]
    for column, heading in _EXTRA_TABLES:
      table = _pivot_table(trows, column, with_ci=False)
      if table:
        out += [f"### {heading}", "", table, ""]
    out += ["### What the numbers say", "", answers[keys[(dataset, task)]], "",
            "_Automated, hedged reading of the table above; overlapping CIs mean the data do not separate the "
            "methods, not that they are equal._", ""]
  if plot_by_name:
    out += ["## Other plots", ""]
    out += [f"![{name}]({os.path.relpath(os.path.abspath(p), report_dir)})" for name, p in plot_by_name.items()]
    out.append("")
  if config_text is not None:
    out += ["## Configuration", "", "```", config_text.rstrip("\n"), "```", ""]
  os.makedirs(report_dir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(out))
  os.replace(tmp, path)
  return path
