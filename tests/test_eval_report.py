"""Tests for radjax.eval.report: results/summary CSVs, AUROC-vs-n plots, answers, Markdown report."""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest

from radjax.eval import report as R

PRETRAINS = ("none", "supervised", "ssl", "clip", "clip_ssl")
FINETUNES = ("linear", "full", "distill")
SIZES = (10, 100, "all")

# Effect of each pre-training relative to ssl, per task: clip helps the diagnostic task (the
# report states the finding) and hurts the prognostic one; clip_ssl recovers ssl's level there.
EFFECT = {
    "diagnostic": {"none": -0.10, "supervised": -0.03, "ssl": 0.0, "clip": 0.08, "clip_ssl": 0.06},
    "prognostic": {"none": -0.08, "supervised": -0.02, "ssl": 0.0, "clip": -0.06, "clip_ssl": 0.0},
}
FT_EFFECT = {"linear": -0.01, "full": 0.0, "distill": 0.04}
N_EFFECT = {10: 0.0, 100: 0.05, "all": 0.09}


def _grid(tasks=("diagnostic", "prognostic"), pretrains=PRETRAINS, seeds=(0, 1, 2), teacher=0.85):
  rng = np.random.default_rng(0)
  rows = []
  for task in tasks:
    for p in pretrains:
      for f in FINETUNES:
        for n in SIZES:
          for seed in seeds:
            # Distillation's gain is a small-n effect, as in the paper.
            ft = FT_EFFECT[f] * (1.0 if n == 10 else 0.0) if f == "distill" else FT_EFFECT[f]
            auc = 0.70 + EFFECT[task][p] + ft + N_EFFECT[n] + rng.normal(0, 0.004)
            kind = "multilabel" if task == "diagnostic" else "binary"
            row = {"dataset": "synth_cxr", "task": task, "task_kind": kind,
                   "pretrain": p, "finetune": f, "n_train": n, "seed": seed, "auroc": float(np.clip(auc, 0, 1)),
                   "auroc_lo": auc - 0.02, "auroc_hi": auc + 0.02, "auprc": auc - 0.2}
            if f == "distill":
              row["teacher_auroc"] = teacher + rng.normal(0, 0.001)
            if n == "all":
              row["n_train_actual"] = 5000
            rows.append(row)
  order = np.random.default_rng(1).permutation(len(rows))
  return [rows[i] for i in order]


def test_results_csv_exact_columns_and_stable_sort(tmp_path):
  rows = _grid(tasks=("diagnostic",))
  rows[0] = dict(rows[0], custom_note="ok")
  path = R.write_results_csv(rows, str(tmp_path / "results.csv"))
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = next(reader)
    body = list(reader)
  assert header[:9] == ["dataset", "task", "task_kind", "pretrain", "finetune", "n_train", "seed", "auroc",
                        "pretrain_seed"]  # rows without one came from a single pre-training run, seed 0
  assert {r[8] for r in body} == {"0"}
  assert header[9:] == ["auroc_lo", "auroc_hi", "auprc", "teacher_auroc", "n_train_actual", "custom_note"]
  assert len(body) == len(rows)
  # Canonical order: pretrain none first, n_train ascending with 'all' last, seeds ascending.
  assert body[0][3:7] == ["none", "linear", "10", "0"]
  ns = [r[5] for r in body if r[3] == "none" and r[4] == "linear"]
  assert ns == ["10"] * 3 + ["100"] * 3 + ["all"] * 3
  back = R.read_results_csv(path)
  assert len(back) == len(rows) and back[0]["n_train"] == 10 and back[-1]["n_train"] == "all"
  # Writing twice gives identical bytes (deterministic, order-independent of input).
  path2 = R.write_results_csv(list(reversed(rows)), str(tmp_path / "results2.csv"))
  assert open(path).read() == open(path2).read()


def test_rows_validated_and_report_text_rejected(tmp_path):
  good = _grid(tasks=("diagnostic",))[0]
  for bad, match in [({k: v for k, v in good.items() if k != "seed"}, "missing"),
                     (dict(good, n_train="lots"), "n_train"),
                     (dict(good, auroc=1.5), r"\[0, 1\]"),
                     (dict(good, report="No acute cardiopulmonary process."), "report text"),
                     (dict(good, note="x" * 500), "free text")]:
    with pytest.raises(ValueError, match=match):
      R.write_results_csv([bad], str(tmp_path / "r.csv"))
  with pytest.raises(ValueError, match="duplicate seed"):
    R.summarise([good, dict(good)])
  with pytest.raises(ValueError, match="task_kind"):
    R.summarise([good, dict(good, seed=9, task_kind="binary")])


def test_summarise(tmp_path):
  rows = _grid()
  summary = R.summarise(rows)
  assert len(summary) == 2 * len(PRETRAINS) * len(FINETUNES) * len(SIZES)
  s = next(r for r in summary if r["task"] == "diagnostic" and r["pretrain"] == "clip" and r["finetune"] == "full"
           and r["n_train"] == 10)
  vals = [r["auroc"] for r in rows if r["task"] == "diagnostic" and r["pretrain"] == "clip"
          and r["finetune"] == "full" and r["n_train"] == 10]
  assert s["n_seeds"] == 3 and s["ci_source"] == "seeds"
  assert s["auroc_mean"] == pytest.approx(np.mean(vals))
  assert s["auroc_std"] == pytest.approx(np.std(vals, ddof=1))
  assert s["auroc_ci95_lo"] < s["auroc_mean"] < s["auroc_ci95_hi"]
  assert s["auprc_mean"] == pytest.approx(np.mean(vals) - 0.2)
  assert math.isnan(s["teacher_auroc_mean"])
  path = R.write_summary_csv(summary, str(tmp_path / "summary.csv"))
  with open(path, newline="") as f:
    header = next(csv.reader(f))
  assert tuple(header[:len(R.SUMMARY_COLUMNS)]) == R.SUMMARY_COLUMNS
  back = R.read_summary_csv(path)
  assert back[0]["auroc_mean"] == pytest.approx(summary[0]["auroc_mean"])
  # One seed: fall back to that run's bootstrap CI.
  one = R.summarise([r for r in rows if r["seed"] == 0])
  assert all(r["ci_source"] == "bootstrap" and r["n_seeds"] == 1 for r in one)


def test_summarise_several_pretraining_seeds_takes_the_interval_over_pretraining_runs():
  from scipy import stats
  rng = np.random.default_rng(3)
  base = dict(dataset="synth_cxr", task="mortality", task_kind="binary", pretrain="clip", finetune="linear",
              n_train=50)
  # Three pre-training runs far apart; the fine-tuning seeds of each close together.
  auroc = {(p, k): 0.60 + 0.05 * p + rng.normal(0, 0.002) for p in range(3) for k in range(4)}
  auroc[(2, 3)] = math.nan  # a run whose AUROC is undefined
  rows = [dict(base, pretrain_seed=p, seed=k, auroc=a) for (p, k), a in auroc.items()]
  [s] = R.summarise(rows)
  means = np.array([np.nanmean([auroc[(p, k)] for k in range(4)]) for p in range(3)])
  half = stats.t.ppf(0.975, df=2) * means.std(ddof=1) / np.sqrt(3)
  assert s["ci_source"] == "pretrain_seeds" and s["n_pretrain_seeds"] == 3 and s["n_seeds"] == 11
  assert s["auroc_mean"] == pytest.approx(means.mean())
  assert s["auroc_std"] == pytest.approx(means.std(ddof=1))
  assert (s["auroc_ci95_lo"], s["auroc_ci95_hi"]) == pytest.approx((means.mean() - half, means.mean() + half))
  # The 11 runs taken as independent seeds would claim an interval several times narrower.
  pooled = R.summarise([dict(r, pretrain_seed=0, seed=10 * r["pretrain_seed"] + r["seed"]) for r in rows])[0]
  assert pooled["ci_source"] == "seeds"
  assert 3 * (pooled["auroc_ci95_hi"] - pooled["auroc_ci95_lo"]) < 2 * half
  # A fine-tuning seed may recur under another pre-training seed, but not under the same one.
  with pytest.raises(ValueError, match="duplicate seed 0 \\(pre-training seed 1\\)"):
    R.summarise(rows + [dict(rows[4])])
  one_run = R.summarise([r for r in rows if r["pretrain_seed"] == 1])[0]
  assert one_run["ci_source"] == "seeds" and one_run["n_pretrain_seeds"] == 1


def test_plots_created(tmp_path):
  summary = R.summarise(_grid())
  paths = R.plot_auroc_vs_n(summary, str(tmp_path / "plots"))
  assert [os.path.basename(p) for p in paths] == [R.plot_filename("synth_cxr", "diagnostic"),
                                                  R.plot_filename("synth_cxr", "prognostic")]
  for p in paths:
    with open(p, "rb") as f:
      data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_answers_clip_helps_diagnostic_hurts_prognostic():
  answers = R.answer_questions(R.summarise(_grid()))
  assert set(answers) == {"diagnostic", "prognostic"}
  diag, prog = answers["diagnostic"], answers["prognostic"]
  assert "reports in pre-training appear to help here" in diag
  assert "best report-using pre-training (clip + full" in diag
  assert "At n = 10" in diag and "At n = all" in diag
  assert "CIs do not overlap" in diag
  # Prognostic: alignment hurts vs ssl, and alignment + SSL recovers it.
  assert "so alignment appears to hurt" in prog
  assert "appears to recover it" in prog
  assert "alignment appears to hurt" not in diag
  # Distillation helps at small n (gain 0.04) but not at n = all (no gain built in).
  small, large = prog.split("Did distillation help?")[1].split("At n = all")
  assert "distillation appears to help" in small
  assert "no clear benefit" in large
  # Teacher 0.85: mentioned, not flagged as overly predictive.
  assert "not near-perfect" in diag and "overly predictive" not in diag
  # Numbers are included.
  assert "+0.0" in diag and "[" in diag


def test_answers_clip_only_hurts_and_near_perfect_teacher():
  rows = _grid(tasks=("prognostic",), pretrains=("none", "ssl", "clip"), teacher=0.995)
  text = R.answer_questions(R.summarise(rows))["prognostic"]
  assert "reports in pre-training appear to hurt here" in text
  assert "near-perfect" in text and "overly predictive" in text


def test_answers_single_seed_are_tentative():
  rows = [dict(r, auroc_lo=None, auroc_hi=None) for r in _grid(tasks=("diagnostic",), seeds=(0,))]
  text = R.answer_questions(R.summarise(rows))["diagnostic"]
  assert "tentative" in text and "reports in pre-training may help" in text


def test_write_report_md(tmp_path):
  rows = _grid()
  summary = R.summarise(rows)
  plots = R.plot_auroc_vs_n(summary, str(tmp_path / "out" / "plots"))
  path = R.write_report_md(rows, summary, plots, str(tmp_path / "out" / "report.md"),
                           config_text="config.data.name = 'synth_cxr'")
  md = open(path).read()
  assert "## synth_cxr: diagnostic (multilabel)" in md and "## synth_cxr: prognostic (binary)" in md
  assert f"](plots/{R.plot_filename('synth_cxr', 'diagnostic')})" in md
  assert "| pre-training | fine-tuning | n = 10 | n = 100 | n = all |" in md
  assert "| clip_ssl | distill |" in md
  assert "**" in md  # best per column in bold
  assert "### Teacher AUROC" in md and "### AUPRC" in md and "Zero-shot" not in md
  assert "reports in pre-training appear to help here" in md
  assert "```\nconfig.data.name = 'synth_cxr'\n```" in md


@pytest.mark.parametrize("own_gain, expected", [
    (0.04, "not clearly the report's doing"),     # an image-only teacher does as well
    (-0.01, "the report itself appears to add to it for 5 of 5"),
])
def test_answers_separate_the_report_from_self_distillation(own_gain, expected):
  """self_distill rows (distillation with an image-only teacher) decide how much of distill's gain
  the answer attributes to the report."""
  rows = _grid(tasks=("prognostic",))
  own = []
  for r in rows:
    if r["finetune"] == "distill":
      gain = own_gain if r["n_train"] == 10 else 0.0
      base = r["auroc"] - (FT_EFFECT["distill"] if r["n_train"] == 10 else 0.0)
      own.append({k: v for k, v in r.items() if k != "teacher_auroc"} |
                 {"finetune": "self_distill", "auroc": base + gain, "auroc_lo": base + gain - 0.02,
                  "auroc_hi": base + gain + 0.02})
  text = R.answer_questions(R.summarise(rows + own))["prognostic"]
  small = text.split("Did distillation help?")[1].split("At n = all")[0]
  assert "Against self-distillation" in small and expected in small
  # self_distill is a fine-tuning control, never a pre-training comparison's best cell.
  assert "+ self_distill fine-tuning" not in text.split("Did distillation help?")[0]
