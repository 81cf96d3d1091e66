"""The study runner: ``pretrain x pretrain_seed x finetune x task x n_train x seed`` (the main job).

Layout of a study workdir::

  config.json                  the study config, as run
  pretrain/p<k>/<method>/      one training run per pre-training method and seed (resumable)
  features/p<k>/<method>.npz   its frozen image features of the train / test splits, with labels
  features/report_tfidf.npz    the teacher's report features
  cells/<cell>.json            one finished cell each; a rerun skips them
  results.csv summary.csv report.md plots/*.png

Pre-training seed k trains with ``config.seed + k``; fine-tuning seeds (``study.seeds``) draw the
labelled subset and fit the heads. With several pre-training seeds the summary's intervals are taken
over the pre-training runs, since the runs that share one are not independent.

A cell is cheap (a head on cached features), so an interrupted study continues
where it stopped and ``--workers N`` spreads cells over processes. Report text is
held in memory only, to build the teacher's report features.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
from typing import Any

import ml_collections
import numpy as np

from radjax import defaults, paths
from radjax.config import ConfigError
from radjax.eval import metrics as metrics_lib
from radjax.eval import report as report_lib

log = logging.getLogger(__name__)

# What a study cell can run: every fine-tuning the report knows except zero-shot, which is a column
# of the text-aligned pre-trainings' linear cells, not a cell of its own.
FINETUNES = tuple(f for f in report_lib.FINETUNE_ORDER if f != "zero_shot")
TEXT_ALIGNED = ("clip", "siglip", "clip_ssl", "unicl")
FEATURE_SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Cell:
  pretrain: str
  finetune: str
  task: str
  n_train: int | str
  seed: int
  pretrain_seed: int = 0

  @property
  def key(self) -> str:
    return f"{self.task}__{self.pretrain}__p{self.pretrain_seed}__{self.finetune}__n{self.n_train}__s{self.seed}"


def pretrain_dir(workdir: str, method: str, pretrain_seed: int) -> str:
  return os.path.join(workdir, "pretrain", f"p{pretrain_seed}", method)


def features_path(workdir: str, method: str, pretrain_seed: int) -> str:
  return os.path.join(workdir, "features", f"p{pretrain_seed}", f"{method}.npz")


# ----------------------------------------------------------------------------- config


def pretrain_config(config: ml_collections.ConfigDict, method: str, pretrain_seed: int = 0) -> ml_collections.ConfigDict:
  """The training config of one pre-training run: the study config without ``study``, seeded
  ``config.seed + pretrain_seed``."""
  cfg = defaults.pretrain_config()
  for key in cfg.keys():
    cfg[key] = config[key]
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.method.name = method
  cfg.seed = int(config.seed) + int(pretrain_seed)
  cfg.train.progress = config.train.progress
  return cfg


def task_labels(config, task: str) -> tuple[tuple[str, ...], str]:
  """A task is a label group ("diagnostic", "prognostic") or one label name -> (labels, kind)."""
  from radjax.data.sources import dataset_label_names
  groups = {kind: dataset_label_names(config.data, kind) for kind in ("diagnostic", "prognostic")}
  if task in groups:
    return tuple(groups[task]), task
  for kind, names in groups.items():
    if task in names:
      return (task,), kind
  known = sorted(set(groups) | {n for names in groups.values() for n in names})
  raise ConfigError(f"study.tasks: unknown task {task!r} for dataset {config.data.dataset!r}; "
                    f"known: {', '.join(known)}")


def cells(config) -> list[Cell]:
  s = config.study
  for f in s.finetune:
    if f not in FINETUNES:
      raise ConfigError(f"study.finetune: unknown fine-tuning {f!r}; known: {', '.join(FINETUNES)}")
  from radjax.methods import method_names
  for m in s.pretrain:
    if m not in method_names():
      raise ConfigError(f"study.pretrain: unknown method {m!r}; known: {', '.join(method_names())}")
  if not s.pretrain_seeds or len(set(s.pretrain_seeds)) != len(s.pretrain_seeds):
    raise ConfigError(f"study.pretrain_seeds: need distinct seeds, got {tuple(s.pretrain_seeds)}")
  sizes = ["all" if n <= 0 else int(n) for n in s.n_train]
  return [Cell(p, f, t, n, seed, int(ps)) for t in s.tasks for p in s.pretrain for ps in s.pretrain_seeds
          for f in s.finetune for n in sizes for seed in s.seeds]


# ----------------------------------------------------------------------------- stages


def _all_labels_data_config(config) -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict(config.data.to_dict())
  labels = []
  for task in config.study.tasks:
    labels += [n for n in task_labels(config, task)[0] if n not in labels]
  data.labels = ",".join(labels)
  data.augment = False
  return data


def pretrain(config, workdir: str, method: str, pretrain_seed: int = 0) -> str:
  """Trains ``method`` at ``pretrain_seed`` into ``workdir/pretrain/p<seed>/<method>`` (a no-op
  when already done)."""
  out = pretrain_dir(workdir, method, pretrain_seed)
  if method == "none":
    return out
  from radjax.train import loop
  log.info("pre-training %s (pre-training seed %d)", method, pretrain_seed)
  result = loop.train(pretrain_config(config, method, pretrain_seed), out)
  if result.get("preempted"):
    raise SystemExit(f"pre-training {method} was preempted; rerun the study to continue")
  return out


def _encoder(config, workdir: str, method: str, pretrain_seed: int):
  from flax import nnx
  from radjax import methods
  if method == "none":  # a random encoder: its initialisation is its pre-training seed
    cfg = pretrain_config(config, method, pretrain_seed)
    return methods.get_method("none").build(cfg, nnx.Rngs(int(cfg.seed))).image_encoder, None
  from radjax.train.checkpoint import load_pretrained
  model, _ = load_pretrained(pretrain_dir(workdir, method, pretrain_seed))
  return model.image_encoder, model


def extract_features(config, workdir: str, method: str, pretrain_seed: int = 0) -> str:
  """Caches the frozen image features of ``method`` on the train and test splits."""
  path = features_path(workdir, method, pretrain_seed)
  if os.path.exists(path):
    return path
  from radjax.data.pipeline import make_loader
  from radjax.data.tokenizer import get_tokenizer
  from radjax.eval.features import encode_images
  encoder, model = _encoder(config, workdir, method, pretrain_seed)
  data = _all_labels_data_config(config)
  tok = get_tokenizer(config.data)
  arrays = {"label_names": np.asarray(data.labels.split(","))}
  for split in FEATURE_SPLITS:
    loader = make_loader(data, split, batch_size=config.study.feature_batch_size, seed=0, train=False,
                         tokenizer=tok, num_epochs=1)
    for k, v in encode_images(encoder, loader).items():
      arrays[f"{split}/{k}"] = v
  if model is not None and method in TEXT_ALIGNED:
    arrays.update(zero_shot_scores(model, data, tok, arrays["test/feats"], config))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path + ".tmp.npz", **arrays)
  os.replace(path + ".tmp.npz", path)
  return path


def _on_test_split(fn, data, tok, config) -> np.ndarray:
  """``fn(images [B, H, W, C]) -> [B, ...]`` over the test split (``data`` without augmentation),
  concatenated in example-index order, the order of the cached features and labels."""
  import jax.numpy as jnp
  from radjax.data.pipeline import make_loader
  loader = make_loader(data, "test", batch_size=config.study.feature_batch_size, seed=0, train=False,
                       tokenizer=tok, num_epochs=1)
  outputs, index = [], []
  for batch in loader:
    outputs.append(np.asarray(fn(jnp.asarray(batch["image"]))))
    index.append(np.asarray(batch["index"]))
  return np.concatenate(outputs)[np.argsort(np.concatenate(index), kind="stable")]


def zero_shot_scores(model, data, tok, test_feats, config) -> dict[str, np.ndarray]:
  """Per label: cos(image, "findings consistent with X.") - cos(image, "no X."), on the test split."""
  import jax.numpy as jnp
  from radjax.losses import l2_normalize
  names = data.labels.split(",")
  pos = [f"findings consistent with {n.replace('_', ' ')}." for n in names]
  neg = [f"no {n.replace('_', ' ')}." for n in names]
  ids, mask = tok.encode_batch(pos + neg, data.max_text_len)
  txt = np.asarray(l2_normalize(model.embed_texts(jnp.asarray(ids), jnp.asarray(mask))))
  img = _on_test_split(lambda images: l2_normalize(model.embed_images(images)), data, tok, config)
  sims = img @ txt.T
  return {"test/zero_shot": sims[:, :len(names)] - sims[:, len(names):]}


def report_feature_cache(config, workdir: str) -> str:
  """TF-IDF features of the reports of the train and test splits (numbers only, no vocabulary)."""
  path = os.path.join(workdir, "features", "report_tfidf.npz")
  if os.path.exists(path):
    return path
  from radjax.data.sources import get_source
  from radjax.eval.features import report_features, split_reports
  reports = {split: split_reports(get_source(config.data, split)) for split in FEATURE_SPLITS}
  train, others = report_features(reports["train"], {"test": reports["test"]})
  del reports
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path + ".tmp.npz", train=train, test=others["test"])
  os.replace(path + ".tmp.npz", path)
  return path


# ----------------------------------------------------------------------------- cells


def _task_columns(label_names: np.ndarray, labels: tuple[str, ...]) -> np.ndarray:
  names = list(label_names)
  return np.asarray([names.index(n) for n in labels])


def _score(scores, labels, mask, n_boot: int, seed: int) -> dict[str, float]:
  if labels.shape[1] == 1:
    point, lo, hi = metrics_lib.bootstrap_ci(metrics_lib.auroc, scores[:, 0], labels[:, 0], mask[:, 0],
                                             n_boot=n_boot, seed=seed)
    auprc = metrics_lib.auprc(scores[:, 0], labels[:, 0], mask[:, 0])
  else:
    point, lo, hi = metrics_lib.bootstrap_ci(metrics_lib.multilabel_macro_auroc, scores, labels, mask,
                                             n_boot=n_boot, seed=seed)
    auprc = float(np.nanmean([metrics_lib.auprc(scores[:, k], labels[:, k], mask[:, k])
                              for k in range(labels.shape[1])]))
  return {"auroc": point, "auroc_lo": lo, "auroc_hi": hi, "auprc": auprc}


def _macro(scores, labels, mask) -> float:
  if labels.shape[1] == 1:
    return metrics_lib.auroc(scores[:, 0], labels[:, 0], mask[:, 0])
  return metrics_lib.multilabel_macro_auroc(scores, labels, mask)


def run_cell(cell: Cell, config_json: str, workdir: str) -> dict[str, Any]:
  """Fits and evaluates one cell; writes and returns its result row."""
  from radjax.data.sampling import label_fraction_indices
  from radjax.methods.distill import (HeadConfig, crossfit_teacher_logits, fit_head, fit_teacher,
                                      teacher_logits)
  config = ml_collections.ConfigDict(json.loads(config_json))
  s = config.study
  labels_of_task, kind = task_labels(config, cell.task)
  feats = np.load(features_path(workdir, cell.pretrain, cell.pretrain_seed))
  cols = _task_columns(feats["label_names"], labels_of_task)
  x_tr, y_tr, m_tr = feats["train/feats"], feats["train/labels"][:, cols], feats["train/label_mask"][:, cols]
  x_te, y_te, m_te = feats["test/feats"], feats["test/labels"][:, cols], feats["test/label_mask"][:, cols]
  idx = label_fraction_indices(np.where(m_tr > 0, y_tr, np.nan),
                               None if cell.n_train == "all" else int(cell.n_train), cell.seed)
  head_cfg = HeadConfig(l2=tuple(s.head_l2), cv_folds=s.head_cv_folds, steps=s.head_steps, seed=cell.seed)
  row: dict[str, Any] = dict(dataset=config.data.dataset, task=cell.task, task_kind=kind,
                             pretrain=cell.pretrain, finetune=cell.finetune, n_train=cell.n_train,
                             seed=cell.seed, pretrain_seed=cell.pretrain_seed, n_train_actual=len(idx))
  soft = None
  if cell.finetune in report_lib.DISTILL_FINETUNES + (report_lib.SELF_DISTILL,):
    if cell.finetune == report_lib.SELF_DISTILL:  # the teacher sees the image features only
      t_tr, t_te = np.zeros((len(x_tr), 0), np.float32), np.zeros((len(x_te), 0), np.float32)
    else:
      text = np.load(os.path.join(workdir, "features", "report_tfidf.npz"))
      t_tr, t_te = text["train"], text["test"]
    teacher_cfg = dataclasses.replace(head_cfg, l2=tuple(s.teacher_l2))
    teacher = fit_teacher(x_tr[idx], t_tr[idx], y_tr[idx], m_tr[idx], config=teacher_cfg)
    soft = crossfit_teacher_logits(x_tr[idx], t_tr[idx], y_tr[idx], m_tr[idx],
                                   folds=s.teacher_folds, l2=teacher.l2, config=teacher_cfg)
    row["teacher_l2"] = teacher.l2
    if cell.finetune != report_lib.SELF_DISTILL:
      row["teacher_auroc"] = _macro(teacher_logits(teacher, x_te, t_te), y_te, m_te)
  if cell.finetune in report_lib.FULL_FINETUNES:
    test_logits = full_finetune_logits(config, workdir, cell, idx, labels_of_task,
                                       teacher_logits=soft)
  else:
    head = linear = fit_head(x_tr[idx], y_tr[idx], m_tr[idx], config=head_cfg)
    row["head_l2"] = linear.l2
    if soft is not None:
      # The student keeps its linear twin's penalty, so lam = 0 reproduces the linear cell exactly.
      head = fit_head(x_tr[idx], y_tr[idx], m_tr[idx], teacher_logits=soft, lam=s.distill_lambda,
                      temperature=s.distill_temperature, l2=linear.l2, config=head_cfg)
    test_logits = head.logits(x_te)
  row.update(_score(test_logits, y_te, m_te, s.n_boot, cell.seed))
  if "test/zero_shot" in feats.files:
    row["zero_shot_auroc"] = _macro(feats["test/zero_shot"][:, cols], y_te, m_te)
  path = os.path.join(workdir, "cells", cell.key + ".json")
  with open(path + ".tmp", "w") as f:
    json.dump(row, f, sort_keys=True)
  os.replace(path + ".tmp", path)
  return row


def full_finetune_config(config, workdir: str, cell: Cell, labels: tuple[str, ...]) -> ml_collections.ConfigDict:
  """``supervised`` on the train split's task labels, the encoder initialised from the cell's
  pre-training (with the study's distillation weight and temperature for ``full_distill``)."""
  s = config.study
  cfg = pretrain_config(config, "supervised")
  cfg.method.distill_lambda = float(s.distill_lambda)
  cfg.method.distill_temperature = float(s.distill_temperature)
  cfg.seed = int(cell.seed)
  cfg.data.labels = ",".join(labels)
  cfg.method.init_from = (None if cell.pretrain == "none"
                          else pretrain_dir(workdir, cell.pretrain, cell.pretrain_seed))
  cfg.optim.lr = float(s.full_lr)
  cfg.optim.warmup_steps = min(int(cfg.optim.warmup_steps), int(s.full_steps) // 10)
  cfg.train.update(steps=int(s.full_steps), train_split="train", eval_every=0, checkpoint_every=int(s.full_steps),
                   keep_checkpoints=1, progress=False)
  return cfg


class _WithTeacherLogits:
  """A training loader whose batches also carry the teacher's logits of their examples
  (``table[batch["index"]]``); checkpointing goes to the wrapped loader."""

  def __init__(self, loader, table: np.ndarray):
    self._loader, self._table = loader, table

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    batch = next(self._loader)
    return {**batch, "teacher_logits": self._table[np.asarray(batch["index"])]}

  def get_state(self):
    return self._loader.get_state()

  def set_state(self, state) -> None:
    self._loader.set_state(state)


def full_finetune_logits(config, workdir: str, cell: Cell, idx: np.ndarray, labels: tuple[str, ...],
                         teacher_logits: np.ndarray | None = None) -> np.ndarray:
  """``full``: fine-tunes the whole image encoder and a linear head on the cell's labelled training
  examples ``idx`` (indices into the train split), then scores the test split -> logits [N_test, K]
  in index order. ``full_distill``: the same with ``teacher_logits`` [len(idx), K], the teacher's
  (cross-fitted) logits of those examples, as the distillation targets. The run lives in
  ``cells/<cell>.run/`` (resumable) and is deleted once scored."""
  import shutil
  import jax
  from flax import nnx
  from radjax.data.pipeline import make_loader
  from radjax.data.tokenizer import get_tokenizer
  from radjax.train import loop
  from radjax.train.checkpoint import load_pretrained
  cfg = full_finetune_config(config, workdir, cell, labels)
  run_dir = os.path.join(workdir, "cells", cell.key + ".run")
  tok = get_tokenizer(cfg.data)
  table = None
  if teacher_logits is not None:
    table = np.zeros((int(idx.max()) + 1, teacher_logits.shape[1]), np.float32)
    table[idx] = teacher_logits

  def loader(data, split, **kw):
    it = make_loader(data, split, **{**kw, "tokenizer": tok, "indices": idx if split == "train" else None})
    return _WithTeacherLogits(it, table) if table is not None and split == "train" else it

  loop.train(cfg, run_dir, make_loader=loader)
  model, _ = load_pretrained(run_dir)
  graphdef, state = nnx.split(model)
  predict = jax.jit(lambda st, images: nnx.merge(graphdef, st)(images))
  data = ml_collections.ConfigDict(cfg.data.to_dict())
  data.augment = False
  logits = _on_test_split(lambda images: predict(state, images), data, tok, config)
  shutil.rmtree(run_dir, ignore_errors=True)
  return logits


# ----------------------------------------------------------------------------- driver


def _check_workdir_config(config, workdir: str) -> None:
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    from radjax.train.checkpoint import config_diff
    diff = config_diff(saved, current)
    if diff:
      raise ConfigError(f"{workdir} holds a study with a different config (keys: {', '.join(diff)}); "
                        "use a new --workdir")
  with open(path, "w") as f:
    json.dump(current, f, indent=2, sort_keys=True)


def sweep_settings(config) -> list[tuple[str, dict[str, float]]]:
  """``study.sweep`` ("knob=v1,v2;knob2=w1,w2" over data.synth knobs) -> [(name, {knob: value})]."""
  spec = str(config.study.get("sweep", "") or "").strip()
  if not spec:
    return []
  axes = []
  for part in spec.split(";"):
    knob, _, values = part.partition("=")
    knob = knob.strip()
    if knob not in config.data.synth:
      raise ConfigError(f"study.sweep: {knob!r} is not a data.synth knob")
    axes.append([(knob, float(v)) for v in values.split(",")])
  settings = [[]]
  for axis in axes:
    settings = [s + [kv] for s in settings for kv in axis]
  return [("__".join(f"{k}={v:g}" for k, v in s), dict(s)) for s in settings]


def run_study(config, workdir: str, workers: int = 1) -> list[dict[str, Any]]:
  """Runs (or continues) the study; writes results.csv, summary.csv, report.md and plots.

  With ``study.sweep`` set, runs the whole study once per SynthCXR setting in
  ``workdir/<setting>/`` and adds the setting as columns of a combined results.csv.
  """
  workdir = paths.local_dir(workdir)
  sweep = sweep_settings(config)
  if sweep:
    rows = []
    for name, knobs in sweep:
      sub = ml_collections.ConfigDict(config.to_dict())
      sub.study.sweep = ""
      sub.data.synth.update(knobs)
      print(f"\n# sweep setting {name}")
      for row in run_study(sub, os.path.join(workdir, name), workers=workers):
        rows.append({**row, "task": f"{row['task']} [{name}]", **knobs})
    os.makedirs(workdir, exist_ok=True)
    write_outputs(rows, workdir, config)
    return rows
  grid = cells(config)  # validates names before any work
  for task in config.study.tasks:
    task_labels(config, task)
  os.makedirs(os.path.join(workdir, "cells"), exist_ok=True)
  _check_workdir_config(config, workdir)
  for pretrain_seed in config.study.pretrain_seeds:
    for method in config.study.pretrain:
      pretrain(config, workdir, method, pretrain_seed)
      extract_features(config, workdir, method, pretrain_seed)
  if set(config.study.finetune) & set(report_lib.DISTILL_FINETUNES):
    report_feature_cache(config, workdir)

  done = {}
  for cell in grid:
    path = os.path.join(workdir, "cells", cell.key + ".json")
    if os.path.exists(path):
      with open(path) as f:
        done[cell.key] = json.load(f)
  todo = [c for c in grid if c.key not in done]
  log.info("study: %d cells, %d done, %d to run", len(grid), len(done), len(todo))
  config_json = config.to_json()
  from tqdm.auto import tqdm
  if workers > 1 and todo:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
      futures = {pool.submit(run_cell, c, config_json, workdir): c for c in todo}
      for fut in tqdm(concurrent.futures.as_completed(futures), total=len(todo), desc="cells"):
        done[futures[fut].key] = fut.result()
  else:
    for cell in tqdm(todo, desc="cells"):
      done[cell.key] = run_cell(cell, config_json, workdir)
  rows = [done[c.key] for c in grid]
  write_outputs(rows, workdir, config)
  return rows


def write_outputs(rows, workdir: str, config) -> None:
  report_lib.write_results_csv(rows, os.path.join(workdir, "results.csv"))
  summary = report_lib.summarise(rows)
  report_lib.write_summary_csv(summary, os.path.join(workdir, "summary.csv"))
  plots = report_lib.plot_auroc_vs_n(summary, os.path.join(workdir, "plots"))
  report_lib.write_report_md(rows, summary, plots, os.path.join(workdir, "report.md"),
                             config_text=config.to_json(indent=2))
  answers = report_lib.answer_questions(summary)
  print(f"\nstudy written to {workdir}/report.md")
  for task, text in answers.items():
    print(f"\n## {task}\n{text}")
