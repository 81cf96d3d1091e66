"""The study runner end to end on a tiny SynthCXR grid, and its resume after SIGKILL."""

import csv
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--config.study.pretrain=('none','clip')", "--config.study.n_train=(20,-1)",
    "--config.study.seeds=(0,)", "--config.study.pretrain_seeds=(0,1)", "--config.study.n_boot=20",
    "--config.study.head_steps=30",
    "--config.study.teacher_folds=2", "--config.train.steps=4", "--config.train.batch_size=16",
    "--config.train.checkpoint_every=2", "--config.train.progress=False",
    "--config.data.synth.n_pretrain=64", "--config.data.synth.n_train=120",
    "--config.data.synth.n_test=80", "--config.data.synth.image_size=32", "--config.data.image_size=32",
    "--config.data.max_text_len=48", "--config.data.vocab_size=400",
    "--config.model.image.width=32", "--config.model.image.depth=1", "--config.model.image.num_heads=2",
    "--config.model.image.mlp_dim=64", "--config.model.text.hidden_size=32",
    "--config.model.text.num_layers=1", "--config.model.text.num_heads=2",
    "--config.model.text.intermediate_size=64", "--config.model.embed_dim=32",
]
COLUMNS = ["dataset", "task", "task_kind", "pretrain", "finetune", "n_train", "seed", "auroc", "pretrain_seed"]


def _command(workdir):
  return [sys.executable, "-m", "radjax.cli", "study", "--config", "configs/study_synthetic.py:quick",
          "--workdir", str(workdir), *TINY]


def _run(workdir):
  result = subprocess.run(_command(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("study")
  return workdir, _run(workdir)


def test_study_writes_results_summary_report_and_plots(finished):
  workdir, result = finished
  with open(workdir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0])[:9] == COLUMNS
  # 2 tasks x 2 pre-trainings x 2 pre-training seeds x 3 fine-tunings x 2 sizes x 1 seed
  assert len(rows) == 48
  assert {r["pretrain_seed"] for r in rows} == {"0", "1"}
  # Each pre-training seed is its own run (for "none", its own random encoder), so the cells differ.
  assert (workdir / "pretrain" / "p1" / "clip").exists()
  for method in ("none", "clip"):
    by_seed = {}
    for r in rows:
      if r["pretrain"] == method:
        by_seed.setdefault(r["pretrain_seed"], []).append(float(r["auroc"]))
    assert by_seed["0"] != by_seed["1"], method
  with open(workdir / "summary.csv") as f:
    summary = list(csv.DictReader(f))
  assert len(summary) == 24
  assert all(r["ci_source"] == "pretrain_seeds" and r["n_pretrain_seeds"] == "2" for r in summary)
  assert {r["task_kind"] for r in rows} == {"diagnostic", "prognostic"}
  assert {r["finetune"] for r in rows} == {"linear", "self_distill", "distill"}
  # The self-distillation control has a teacher (its penalty is recorded) that never sees a report,
  # so it reports no report-teacher AUROC, and its students are not the linear heads.
  own = {(r["task"], r["pretrain"], r["n_train"]): r for r in rows if r["finetune"] == "self_distill"}
  assert all(r["teacher_l2"] and not r["teacher_auroc"] for r in own.values())
  linear = {(r["task"], r["pretrain"], r["n_train"]): r for r in rows if r["finetune"] == "linear"}
  assert any(own[k]["auroc"] != linear[k]["auroc"] for k in own)
  for r in rows:
    assert 0.0 <= float(r["auroc"]) <= 1.0
  assert all(r["teacher_auroc"] for r in rows if r["finetune"] == "distill")
  # The teacher's penalty is cross-validated over study.teacher_l2, not the heads' C = 1.
  from radjax.config import load_config
  grid = load_config(f"{ROOT}/configs/study_synthetic.py:quick", []).study.teacher_l2
  assert all(float(r["teacher_l2"]) in grid for r in rows if "distill" in r["finetune"])
  assert all(r["zero_shot_auroc"] for r in rows if r["pretrain"] == "clip")
  report = (workdir / "report.md").read_text()
  assert "(2×1)" in report
  assert "Did distillation help" in report and "Against self-distillation" in report
  assert len(list((workdir / "plots").glob("*.png"))) == 2
  assert "Did reports help" in result.stdout


def test_full_distillation_trains_on_the_teacher_and_is_full_at_lambda_0(finished, monkeypatch):
  """full_distill = full fine-tuning whose batches carry the teacher's logits of their examples:
  with distill_lambda 0 its test logits equal plain full fine-tuning's, with 1 they do not."""
  import numpy as np
  from radjax.config import load_config
  from radjax.eval import study
  workdir, _ = finished
  monkeypatch.chdir(ROOT)
  idx = np.arange(0, 40, 2)
  teacher = np.random.default_rng(0).standard_normal((len(idx), 1)).astype(np.float32) * 4

  def logits(lam, teacher_logits):
    config = load_config("configs/study_synthetic.py:quick",
                         TINY + ["--config.study.full_steps=3", f"--config.study.distill_lambda={lam}"])
    labels = ("mortality_12m",)
    cell = study.Cell("clip", "full_distill", "mortality_12m", len(idx), 0)
    return study.full_finetune_logits(config, str(workdir), cell, idx, labels, teacher_logits=teacher_logits)

  plain = logits(0.5, None)
  # Equal up to float rounding: the two steps are separate programs (one takes the teacher's
  # logits), which XLA may fuse differently (seen: 1 ulp on 20 of 80 logits).
  np.testing.assert_allclose(logits(0.0, teacher), plain, rtol=1e-6, atol=1e-7)
  assert np.abs(logits(1.0, teacher) - plain).max() > 1e-4


def test_with_teacher_logits_looks_up_each_example_by_its_split_index():
  import numpy as np
  from radjax.eval import study

  class Loader:
    def __init__(self):
      self.batches, self.state = iter([{"index": np.array([4, 0]), "labels": np.zeros((2, 1))}]), 7

    def __next__(self):
      return next(self.batches)

    def get_state(self):
      return self.state

    def set_state(self, state):
      self.state = state

  table = np.arange(10, dtype=np.float32).reshape(5, 2)
  wrapped = study._WithTeacherLogits(Loader(), table)
  batch = next(wrapped)
  np.testing.assert_array_equal(batch["teacher_logits"], [[8, 9], [0, 1]])
  wrapped.set_state(3)
  assert wrapped.get_state() == 3


def test_no_report_text_in_outputs(finished):
  workdir, _ = finished
  from radjax import defaults
  from radjax.data.synth_cxr import SynthCXR
  synth = defaults.synth_cxr_config()
  synth.n_train, synth.n_test, synth.image_size = 120, 80, 32
  sentences = {s.strip() for i in range(20) for s in SynthCXR(synth).report("test", i).split(".")
               if len(s.strip()) > 25}
  for path in workdir.rglob("*"):
    if path.is_file() and path.suffix in (".csv", ".md", ".json", ".jsonl"):
      text = path.read_text(errors="ignore")
      leaked = [s for s in sentences if s in text]
      assert not leaked, f"{path} contains report text"


def test_rerun_is_a_no_op_and_killed_study_resumes_to_same_results(finished, tmp_path):
  workdir, _ = finished
  expected = (workdir / "results.csv").read_text()
  # A rerun of a finished study skips every cell and rewrites the same results.
  _run(workdir)
  assert (workdir / "results.csv").read_text() == expected

  # Killed while fitting cells, from the finished study's pre-training and features (a killed
  # pre-training run resumes as tests/test_train_resume.py checks).
  killed = tmp_path / "killed"
  for cache in ("pretrain", "features"):
    shutil.copytree(workdir / cache, killed / cache)
  proc = subprocess.Popen(_command(killed), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 500
  while time.time() < deadline and proc.poll() is None:
    if len(list((killed / "cells").glob("*.json"))) >= 3 if (killed / "cells").exists() else False:
      break
    time.sleep(0.2)
  assert proc.poll() is None, "the study finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (killed / "results.csv").exists()
  _run(killed)
  assert (killed / "results.csv").read_text() == expected


def test_unknown_method_fails_before_work(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "radjax.cli", "study", "--config", "configs/study_synthetic.py:quick",
       "--workdir", str(tmp_path / "w"), "--config.study.pretrain=('none','clipp')"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "clipp" in result.stderr and "clip" in result.stderr
  assert not (tmp_path / "w").exists()


def test_full_fine_tuning_cell_starts_from_the_pretraining(finished, monkeypatch):
  from radjax.config import load_config
  from radjax.eval import study
  workdir, _ = finished
  monkeypatch.chdir(ROOT)
  config = load_config("configs/study_synthetic.py:quick", TINY + ["--config.study.full_steps=3"])
  cell = study.Cell("clip", "full", "diagnostic", 20, 0, pretrain_seed=1)
  cfg = study.full_finetune_config(config, str(workdir), cell, study.task_labels(config, "diagnostic")[0])
  assert cfg.method.name == "supervised" and cfg.train.train_split == "train"
  assert cfg.method.init_from == os.path.join(str(workdir), "pretrain", "p1", "clip")
  assert study.pretrain_config(config, "clip", 1).seed == config.seed + 1
  row = study.run_cell(cell, config.to_json(), str(workdir))
  assert row["finetune"] == "full" and row["n_train_actual"] == 20
  assert 0.0 <= row["auroc"] <= 1.0
  assert not (workdir / "cells" / (cell.key + ".run")).exists()  # the run is deleted once scored
  assert (workdir / "cells" / (cell.key + ".json")).exists()
