"""The radjax training loop: one jitted step over a ("data", "fsdp", "tensor") mesh.

    metrics = train(config, workdir)                       # real method + data pipeline
    metrics = train(config, workdir, method=m, make_loader=f)   # injected (tests)

Guarantees:
  * exact resume: the step key is fold_in(base_key, step); params, optimizer state, EMA,
    non-Param model state, the base key and every process's data-iterator state are
    checkpointed, so a run killed at any point and restarted with the same command
    reaches the same params bitwise as an uninterrupted run (same device count);
  * preemption: SIGTERM -> checkpoint at the next step boundary, return normally
    (``result["preempted"] = True``; the CLI exits 0);
  * non-finite guard: a NaN/Inf loss or gradient norm raises :class:`NonFiniteError`
    naming the step and metric; nothing after the last good checkpoint is saved;
  * a workdir holding another config refuses to resume (:class:`ConfigMismatchError`,
    listing the keys) unless ``config.train.allow_config_change``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from radjax import paths
from radjax.config import ConfigError
from radjax.parallel import distributed
from radjax.parallel import mesh as mesh_lib
from radjax.train import checkpoint as ckpt_lib
from radjax.train import metrics as metrics_lib
from radjax.train import optim
from radjax.train import state as state_lib

log = logging.getLogger(__name__)

ConfigMismatchError = ckpt_lib.ConfigMismatchError

# Metrics whose non-finiteness stops training, in the order they are reported. Other
# method metrics may legitimately be NaN on a degenerate batch and are only logged.
_GUARDED = ("loss", "grad_norm", "param_norm")


class NonFiniteError(FloatingPointError):
  """Loss or gradient norm became NaN/Inf; the message names the step and metric."""


def _get(cfg: Any, name: str, default: Any) -> Any:
  try:
    value = cfg[name]
  except (KeyError, AttributeError, TypeError):
    return default
  return default if value is None else value


# ----------------------------------------------------------------------------- factories


def _default_method(config: Any) -> Any:
  from radjax import methods  # pylint: disable=import-outside-toplevel
  return methods.get_method(config.method.name)


def _default_loader_factory(config: Any) -> Callable[..., Any]:
  from radjax.data import pipeline, tokenizer  # pylint: disable=import-outside-toplevel
  # A bad data.* knob fails here, before the tokenizer, the model and the checkpoint are built.
  pipeline.Preprocess(config.data, None, train=True, names=pipeline.label_names(config.data))
  tok = tokenizer.get_tokenizer(config.data)
  return functools.partial(pipeline.make_loader, tokenizer=tok)


def _as_iterator(loader: Any) -> Iterator[dict]:
  return loader if hasattr(loader, "__next__") else iter(loader)


# ----------------------------------------------------------------------------- steps


def make_train_step(method: Any, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, mesh: Any, *, accum_steps: int, ema_decay: float):
  """(state, batch) -> (state, metrics). Batch: dict of global arrays, leading dim = global batch.

  With ``accum_steps`` > 1 the batch is split into that many microbatches that are
  scanned over (grads averaged), so one call is still one optimizer update.
  """
  micro_sharding = NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES))

  def loss_fn(params, model_state, batch, key):
    model = nnx.merge(graphdef, params, model_state)
    loss, metrics = method.loss(model, batch, key, True)
    _, _, new_model_state = nnx.split(model, nnx.Param, ...)
    return loss, (metrics, nnx.to_pure_dict(new_model_state))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step_fn(state, batch):
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    params = state["params"]
    if accum_steps == 1:
      (loss, (metrics, model_state)), grads = grad_fn(params, state["model_state"], batch, key)
    else:
      def split(x):
        # Microbatch i takes rows i, i+A, i+2A, ...: every device keeps an equal share of
        # every microbatch, so no data moves between devices.
        x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, micro_sharding)
      micro = jax.tree.map(split, batch)

      def body(carry, xs):
        grads_acc, model_state, loss_acc, metrics_acc = carry
        mb, i = xs
        (loss, (metrics, model_state)), grads = grad_fn(params, model_state, mb, jax.random.fold_in(key, i))
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        metrics_acc = jax.tree.map(lambda a, m: a + jnp.asarray(m, jnp.float32), metrics_acc, metrics)
        return (grads_acc, model_state, loss_acc + loss, metrics_acc), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      mb0 = jax.tree.map(lambda x: x[0], micro)
      metric_shapes = jax.eval_shape(lambda: grad_fn(params, state["model_state"], mb0, key)[0][1][0])
      metrics0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes)
      carry = (zeros, state["model_state"], jnp.zeros((), jnp.float32), metrics0)
      (grads, model_state, loss, metrics), _ = jax.lax.scan(
          body, carry, (micro, jnp.arange(accum_steps)))
      inv = 1.0 / accum_steps
      grads = jax.tree.map(lambda g: g * inv, grads)
      loss = loss * inv
      metrics = jax.tree.map(lambda m: m * inv, metrics)

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    new_state = dict(state, step=step + 1, params=params, model_state=model_state, opt_state=opt_state)
    if "ema" in state:
      new_state["ema"] = optim.ema_update(state["ema"], params, ema_decay)
    out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    out.update(loss=jnp.asarray(loss, jnp.float32), grad_norm=grad_norm,
               param_norm=optax.tree.norm(params), lr=jnp.asarray(schedule(step), jnp.float32))
    return new_state, out

  return step_fn


def make_eval_step(method: Any, graphdef: nnx.GraphDef):
  """(params, model_state, batch, rng, index) -> metrics of the model in inference mode: BatchNorm
  on its running averages, as evaluate and predict deploy it, so a validation figure (and the
  ``best`` checkpoint it picks) does not depend on which films share an eval batch."""
  def eval_fn(params, model_state, batch, rng, index):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), 0x7FFFFFFF), index)
    model = nnx.merge(graphdef, params, model_state)
    model.eval()
    loss, metrics = method.loss(model, batch, key, False)
    out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    out["loss"] = jnp.asarray(loss, jnp.float32)
    return out
  return eval_fn


# ----------------------------------------------------------------------------- helpers


class _Preemption:
  """SIGTERM -> flag checked at step boundaries (single process); jax's preemption sync
  point (multi-process: every host agrees on the same step)."""

  def __init__(self):
    self.requested = False
    self._previous = None
    self._installed = False
    self._multi = jax.process_count() > 1

  def install(self) -> "_Preemption":
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.getsignal(signal.SIGTERM)
      signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # preemption service disabled
        return False
    return self.requested

  def uninstall(self) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False


def _check_finite(step: int, metrics: dict[str, float], last_good: int | None, ckpt_dir: str) -> None:
  bad = [k for k in _GUARDED if k in metrics and not math.isfinite(float(metrics[k]))]
  if not bad:
    return
  values = ", ".join(f"{k}={float(metrics[k])}" for k in bad)
  where = (f"the last good checkpoint is step {last_good} in {ckpt_dir}" if last_good is not None
           else "no checkpoint was written")
  raise NonFiniteError(
      f"non-finite {bad[0]} at step {step} ({values}); stopped without saving this state; {where}. "
      "Lower optim.lr, check the data, or enable/adjust optim.clip_norm.")


def _mean(records: list[dict[str, float]]) -> dict[str, float]:
  keys = records[0].keys()
  return {k: float(np.mean([r[k] for r in records])) for k in keys}


def _device_summary(mesh: Any) -> str:
  return (f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"mesh {dict(mesh.shape)}")


# ----------------------------------------------------------------------------- train


def train(config: Any, workdir: str, *, method: Any = None,
          make_loader: Callable[..., Any] | None = None) -> dict:
  """Trains ``config.method`` on ``config.data`` in ``workdir``; resumes if it holds checkpoints.

  ``workdir``: a local or mounted folder (``~`` expanded); a URL raises
  :class:`radjax.paths.RemotePathError` before any work.

  ``method``: a radjax Method (default ``radjax.methods.get_method(config.method.name)``).
  ``make_loader``: ``(data_cfg, split, *, batch_size, seed, train, tokenizer, shard_index,
  shard_count, num_epochs=None) -> iterator with get_state/set_state`` (default
  ``radjax.data.pipeline.make_loader`` with ``radjax.data.tokenizer.get_tokenizer``).
  Returns the final metrics: step, last train window means (``train/...``), last eval
  (``eval/...``), ``preempted`` and ``resumed_from``.
  """
  workdir = paths.local_dir(workdir)
  distributed.initialize(_get(config, "distributed", None))
  # Catch SIGTERM from here on (compilation and restore included); it is acted on at the
  # first step boundary.
  preemption = _Preemption().install()
  try:
    return _train(config, workdir, method, make_loader, preemption)
  finally:
    preemption.uninstall()


def _train(config: Any, workdir: str, method: Any, make_loader: Callable[..., Any] | None,
           preemption: _Preemption) -> dict:
  is_main = jax.process_index() == 0
  tcfg = config.train
  total_steps = int(tcfg.steps)
  log_every = max(int(_get(tcfg, "log_every", 10)), 1)
  eval_every = int(_get(tcfg, "eval_every", 0))
  ckpt_every = int(_get(tcfg, "checkpoint_every", 0))
  accum = max(int(_get(config.optim, "grad_accum_steps", 1)), 1)
  ema_decay = float(_get(config.optim, "ema_decay", 0.0))

  mesh = mesh_lib.make_mesh(config.mesh)
  rep = mesh_lib.replicated(mesh)
  global_batch = int(tcfg.batch_size)
  n_proc = jax.process_count()
  split_ways = mesh_lib.batch_split(mesh)
  if global_batch % n_proc or global_batch % (accum * split_ways):
    raise ConfigError(
        f"train.batch_size={global_batch} must be divisible by the process count ({n_proc}) and by "
        f"optim.grad_accum_steps x (mesh data x fsdp) = {accum} x {split_ways}")
  local_batch = global_batch // n_proc

  method = method if method is not None else _default_method(config)
  loader_fn = make_loader if make_loader is not None else _default_loader_factory(config)
  # The real factory has its tokenizer bound; injected ones get tokenizer=None.
  tok_kw = {"tokenizer": None} if make_loader is not None else {}

  tx, schedule = optim.make_optimizer(config.optim, total_steps)
  graphdef, abstract_state, shardings, sharded_init = state_lib.setup(
      method, config, mesh, tx, ema=ema_decay > 0)

  if is_main:
    os.makedirs(workdir, exist_ok=True)
  ckpt = ckpt_lib.Checkpointer(
      workdir, keep=int(_get(tcfg, "keep_checkpoints", 2)),
      async_save=bool(_get(tcfg, "async_checkpoint", True)),
      best_metric=str(_get(tcfg, "best_metric", "")), best_mode=str(_get(tcfg, "best_mode", "auto")))
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  config_dict = ckpt_lib.config_to_dict(config)

  def check_config(step: int, saved: dict) -> None:
    diff = ckpt_lib.config_diff(saved, config_dict)
    if diff and not bool(_get(tcfg, "allow_config_change", False)):
      ckpt.close()
      writer.close()
      flat_saved, flat_now = ckpt_lib.flatten_dict(saved), ckpt_lib.flatten_dict(config_dict)
      details = "; ".join(f"{k}: saved={flat_saved.get(k, '<missing>')!r} now={flat_now.get(k, '<missing>')!r}"
                          for k in diff[:20])
      raise ConfigMismatchError(
          f"{workdir} holds a run (checkpoint step {step}) with a different config; differing keys: "
          f"{', '.join(diff)} ({details}). Use a new workdir, or set "
          "--config.train.allow_config_change=True to resume with the new config.")
    if diff:
      log.warning("resuming %s with changed config keys: %s", workdir, ", ".join(diff))

  latest = ckpt.latest_step()
  data_state = None
  if latest is not None:
    latest, state, meta = ckpt.restore_newest_readable(abstract_state, key_sharding=rep,
                                                       check_config=check_config)
    data_state = ckpt_lib.local_data_state(meta)
    writer.truncate_after(latest)
    log.info("resumed from %s at step %d", ckpt.directory, latest)
  else:
    state = sharded_init()
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_dict, f, indent=2, sort_keys=True)
  start = int(jax.device_get(state["step"]))

  result: dict[str, Any] = {"step": start, "preempted": False, "resumed_from": latest}
  if start >= total_steps:
    ckpt.close()
    writer.close()
    return result

  loader = loader_fn(
      config.data, str(_get(tcfg, "train_split", "pretrain")), batch_size=local_batch,
      seed=int(_get(config, "seed", 0)), train=True, shard_index=jax.process_index(),
      shard_count=n_proc, **tok_kw)
  train_iter = _as_iterator(loader)
  if data_state is not None:
    train_iter.set_state(data_state)

  batch_sh = mesh_lib.batch_sharding(mesh)
  train_step = jax.jit(
      make_train_step(method, graphdef, tx, schedule, mesh, accum_steps=accum, ema_decay=ema_decay),
      in_shardings=(shardings, batch_sh), out_shardings=(shardings, rep), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(method, graphdef), out_shardings=rep)

  def run_eval(state) -> dict[str, float]:
    eval_loader = _as_iterator(loader_fn(
        config.data, str(_get(tcfg, "eval_split", "validation")), batch_size=local_batch,
        seed=int(_get(config, "seed", 0)), train=False, shard_index=jax.process_index(),
        shard_count=n_proc, num_epochs=1,
        **tok_kw))
    outs = []
    for i in range(int(_get(tcfg, "eval_batches", 4))):
      try:
        batch = next(eval_loader)
      except StopIteration:
        break
      outs.append(eval_step(state["params"], state["model_state"], mesh_lib.shard_batch(batch, mesh),
                            state["rng"], jnp.int32(i)))
    if not outs:
      return {}
    host = jax.device_get(outs)
    return {f"eval/{k}": v for k, v in _mean([{k: float(v) for k, v in o.items()} for o in host]).items()}

  if is_main:
    log.info("training %s for %d steps from step %d on %s; %d params", method.__class__.__name__,
             total_steps, start, _device_summary(mesh), state_lib.count_params(abstract_state["params"]))

  progress = None
  if is_main and bool(_get(tcfg, "progress", True)):
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    progress = tqdm(total=total_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

  pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet checked/logged
  last_good_ckpt = latest
  window = {"t0": time.perf_counter(), "data": 0.0, "steps": 0}
  last_train: dict[str, float] = {}
  last_eval: dict[str, float] = {}

  def flush(extra: dict[str, float] | None = None) -> None:
    """Fetches pending metrics, checks them, logs the window mean (+ ``extra``)."""
    nonlocal last_train
    if not pending:
      return
    host = jax.device_get([m for _, m in pending])
    records = []
    for (step, _), m in zip(pending, host):
      m = {k: float(v) for k, v in m.items()}
      _check_finite(step, m, last_good_ckpt, ckpt.directory)
      records.append(m)
    step = pending[-1][0]
    pending.clear()
    wall = time.perf_counter() - window["t0"]
    n = max(window["steps"], 1)
    row = {f"train/{k}": v for k, v in _mean(records).items()}
    row.update({
        "time/step_s": wall / n, "time/data_wait_s": window["data"] / n,
        "time/compute_s": max(wall - window["data"], 0.0) / n,
        "examples_per_s": global_batch * n / max(wall, 1e-9)})
    row.update(extra or {})
    last_train = row
    writer.write(step, row)
    if progress is not None:
      progress.set_postfix(loss=f"{row['train/loss']:.4f}", ex_s=f"{row['examples_per_s']:.0f}",
                           data=f"{100 * window['data'] / max(wall, 1e-9):.0f}%")
    window.update(t0=time.perf_counter(), data=0.0, steps=0)

  def save(step: int) -> None:
    nonlocal last_good_ckpt
    flush()  # never save a state whose metrics have not passed the finiteness check
    ckpt.save(step, state, config=config, data_state=train_iter.get_state())
    last_good_ckpt = step

  step = start
  try:
    while step < total_steps:
      t0 = time.perf_counter()
      batch = next(train_iter)
      batch = mesh_lib.shard_batch(batch, mesh)
      window["data"] += time.perf_counter() - t0
      state, metrics = train_step(state, batch)
      step += 1
      window["steps"] += 1
      pending.append((step, metrics))
      if step == start + 1:
        # Keep compilation out of the throughput numbers.
        jax.block_until_ready(metrics)
        flush({"time/first_step_s": time.perf_counter() - window["t0"]})
      if progress is not None:
        progress.update(1)
      if step % log_every == 0 or step == total_steps:
        flush()
      if eval_every > 0 and (step % eval_every == 0 or step == total_steps):
        flush()
        last_eval = run_eval(state)
        if last_eval:
          writer.write(step, last_eval)
          ckpt.save_best(step, state, config=config, metrics=last_eval)
      if (ckpt_every > 0 and step % ckpt_every == 0) or step == total_steps:
        save(step)
      if preemption.reached(step):
        if last_good_ckpt != step:
          save(step)
        result["preempted"] = True
        log.warning("preemption requested: checkpoint saved at step %d, stopping", step)
        break
    flush()
  except BaseException:
    # Whatever went wrong, let an in-flight (good) save finish so the workdir keeps it.
    try:
      ckpt.wait()
      ckpt.close()
    except Exception:  # pylint: disable=broad-except
      log.exception("waiting for the in-flight checkpoint failed")
    raise
  finally:
    if progress is not None:
      progress.close()
    writer.flush()
    writer.close()
  ckpt.wait()
  ckpt.close()
  result.update(step=step, **last_train, **last_eval)
  return result
