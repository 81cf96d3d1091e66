"""Checkpoints: Orbax CheckpointManager (async, multi-host) over the train state.

Layout: ``workdir/checkpoints/<step>/`` with one Orbax item per part, so a caller that
only wants weights (fine-tuning, :func:`load_pretrained`) restores just ``params``:
  * ``params``, ``model_state`` (non-Param nnx state: BatchNorm stats, RNG counters),
    ``opt_state``, ``ema`` (if kept): array pytrees, restored onto the *current* mesh's
    shardings, so a checkpoint written on 8 devices restores on 1 (and vice versa);
  * ``train``: ``step`` and the base ``rng`` (key data);
  * ``meta`` (JSON): step, process count and every process's data-iterator state;
  * ``config`` (JSON): the experiment config. Configs hold paths and knobs only; nothing
    derived from report text is ever written here.
``workdir/best/`` keeps the single best checkpoint by ``config.train.best_metric``.

Every process calls save/restore (Orbax coordinates the hosts); JSON items are written by
process 0, so per-process iterator states are all-gathered into ``meta`` first.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from radjax import paths
from radjax.config import ConfigError

log = logging.getLogger(__name__)


class _DropReadOnlyNotices(logging.Filter):
  """Orbax logs two warnings each time a read-only CheckpointManager opens (every
  ``load_pretrained``: a study prints them for every cell); they say nothing the caller lacks."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(("Given directory is read only",
                                           "CheckpointManagerOptions.read_only=True"))


logging.getLogger("absl").addFilter(_DropReadOnlyNotices())

ARRAY_ITEMS = ("params", "model_state", "opt_state", "ema", "train")

# Config keys that may change between a run and its resumption without changing the
# math (where/how it runs, logging). Everything else must match unless
# config.train.allow_config_change is set. Prefix match on dotted keys.
OPERATIONAL_KEYS = (
    "mesh.", "distributed.", "train.progress", "train.log_every", "train.eval_every",
    "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
    "train.allow_config_change", "train.async_checkpoint", "train.best_metric",
    "train.best_mode", "data.num_workers")


class ConfigMismatchError(ValueError):
  """The workdir holds a run with a different config; the message lists the keys."""


# ----------------------------------------------------------------------------- config <-> JSON


def config_to_dict(config: Any) -> dict:
  """JSON-ready nested dict of a ConfigDict (tuples -> lists, unknown objects -> str)."""
  raw = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  return json.loads(json.dumps(raw, default=str))


def dict_to_config(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(d))


def with_schema_defaults(config: Mapping[str, Any]) -> dict:
  """``config`` with every knob (or section) of the schema (``radjax.defaults``) it lacks filled in
  at its default; its own values and keys outside the schema are kept.

  A run saved before a later radjax added a knob was made with what is now its default, so it
  loads under today's code (``load_pretrained``), and resumes unless the knob has been changed
  (``config_diff``).
  """
  from radjax import defaults  # pylint: disable=import-outside-toplevel

  def fill(have: Mapping[str, Any], schema: Mapping[str, Any]) -> dict:
    out = dict(have)
    for k, v in schema.items():
      if k not in out:
        out[k] = copy.deepcopy(v)
      elif isinstance(v, Mapping) and isinstance(out[k], Mapping):
        out[k] = fill(out[k], v)
    return out

  return fill(config, defaults.pretrain_config().to_dict())


def flatten_dict(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten_dict(v, key + "."))
    else:
      out[key] = v
  return out


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any],
                ignore: tuple[str, ...] = OPERATIONAL_KEYS) -> list[str]:
  """Dotted keys whose values differ (or exist on one side only), minus ``ignore`` prefixes.

  Both sides are compared with the schema's defaults filled in (:func:`with_schema_defaults`): a
  knob the saved config lacks is no difference while its current value is the default.
  """
  a, b = flatten_dict(with_schema_defaults(saved)), flatten_dict(with_schema_defaults(current))
  return [k for k in sorted(set(a) | set(b))
          if not any(k == p or k.startswith(p) for p in ignore)
          and a.get(k, "<missing>") != b.get(k, "<missing>")]


# ----------------------------------------------------------------------------- PRNG keys

# Orbax stores plain arrays; typed PRNG key arrays (nnx.Rngs state) travel as key data.


def _is_key(x: Any) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_keys_to_data(tree: Any, key_sharding: Any) -> Any:
  def f(x):
    if not _is_key(x):
      return x
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=key_sharding)
  return jax.tree.map(f, tree)


def data_to_keys(tree: Any, abstract: Any) -> Any:
  def f(x, a):
    if not _is_key(a):
      return x
    return jax.random.wrap_key_data(x, impl=a.dtype._impl)  # pylint: disable=protected-access
  return jax.tree.map(f, tree, abstract)


def _is_empty(tree: Any) -> bool:
  return tree is None or not jax.tree.leaves(tree)


# ----------------------------------------------------------------------------- data state


def _encode_data_state(state: Any) -> Any:
  if state is None:
    return None
  if isinstance(state, bytes):  # grain DataLoader iterators return JSON bytes
    return {"__bytes__": state.decode("utf-8")}
  return json.loads(json.dumps(state))


def _decode_data_state(state: Any) -> Any:
  if isinstance(state, dict) and set(state) == {"__bytes__"}:
    return state["__bytes__"].encode("utf-8")
  return state


def gather_data_states(local_state: Any) -> list[Any]:
  """All processes' iterator states, in process order (collective: every process calls it)."""
  encoded = json.dumps(_encode_data_state(local_state))
  if jax.process_count() == 1:
    return [json.loads(encoded)]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  raw = np.frombuffer(encoded.encode("utf-8"), dtype=np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:raw.size] = raw
  allp = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(allp[i, :int(lengths.reshape(-1)[i])]).decode("utf-8"))
          for i in range(allp.shape[0])]


# ----------------------------------------------------------------------------- manager


class Checkpointer:
  """Orbax CheckpointManager wrapper for ``workdir/checkpoints`` (+ ``workdir/best``).

  ``state`` is the train-state dict of radjax/train/loop.py: step, rng, params,
  model_state, opt_state and optionally ema.
  """

  def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True,
               best_metric: str = "", best_mode: str = "auto"):
    self.workdir = paths.local_dir(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None, create=True,
        cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.best_metric = best_metric
    self.best = None
    if best_metric:
      mode = best_mode
      if mode == "auto":
        mode = "min" if "loss" in best_metric or "error" in best_metric else "max"
      if mode not in ("min", "max"):
        raise ConfigError(f"train.best_mode={best_mode!r}; expected 'auto', 'min' or 'max'")
      best_opts = ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True, cleanup_tmp_directories=True,
          best_fn=lambda m: float(m[best_metric]), best_mode=mode,
          keep_checkpoints_without_metrics=False, enable_async_checkpointing=async_save)
      self.best = ocp.CheckpointManager(os.path.join(self.workdir, "best"), options=best_opts)

  # -- queries
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def saved_config(self, step: int | None = None) -> dict | None:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    return dict(self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])

  # -- save
  @staticmethod
  def _array_args(state: Mapping[str, Any], items: tuple[str, ...]) -> dict:
    args = {}
    for name in items:
      if name == "train":
        tree = {"step": state["step"], "rng": state["rng"]}
      else:
        tree = state.get(name)
      if _is_empty(tree):
        continue
      args[name] = ocp.args.StandardSave(keys_to_data(tree))
    return args

  def save(self, step: int, state: Mapping[str, Any], *, config: Any, data_state: Any = None,
           force: bool = True) -> bool:
    """Saves ``state`` as step ``step`` (collective). Returns after the device->host copy;
    the write finishes in the background (see :meth:`wait`)."""
    args = self._array_args(state, ARRAY_ITEMS)
    meta = {"step": int(step), "process_count": jax.process_count(),
            "data_states": gather_data_states(data_state)}
    args["meta"] = ocp.args.JsonSave(meta)
    args["config"] = ocp.args.JsonSave(config_to_dict(config))
    return self.manager.save(int(step), args=ocp.args.Composite(**args), force=force)

  def save_best(self, step: int, state: Mapping[str, Any], *, config: Any,
                metrics: Mapping[str, float]) -> bool:
    if self.best is None or self.best_metric not in metrics:
      return False
    args = self._array_args(state, ("params", "model_state", "ema", "train"))
    args["config"] = ocp.args.JsonSave(config_to_dict(config))
    return self.best.save(int(step), args=ocp.args.Composite(**args),
                          metrics={self.best_metric: float(metrics[self.best_metric])})

  # -- restore
  def restore(self, step: int, abstract_state: Mapping[str, Any], *,
              key_sharding: Any) -> tuple[dict, dict]:
    """Restores onto the shardings carried by ``abstract_state`` (ShapeDtypeStructs).

    Returns (state, meta). Only the items present in ``abstract_state`` are read.
    """
    return restore_items(self.manager, step, abstract_state, key_sharding=key_sharding)

  def restore_newest_readable(self, abstract_state: Mapping[str, Any], *, key_sharding: Any,
                              check_config: Callable[[int, dict], None]) -> tuple[int, dict, dict]:
    """Restores the newest step that reads: (step, state, meta). ``check_config(step, saved)``
    runs on each step's saved config before its arrays are read; what it raises propagates.

    A step that fails to read (a truncated or bit-rotted file) is passed over, and once an older
    step has restored with the same ``abstract_state`` (which shows the failure was that step's
    files, not a changed model) the failed ones are moved to ``workdir/unreadable_checkpoints/``:
    kept for inspection, out of Orbax's sight, so the run can save those steps again. If no step
    restores, the newest step's error is raised and nothing is moved.
    """
    failures: list[tuple[int, Exception]] = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        saved = self.saved_config(step)
      except Exception as e:  # pylint: disable=broad-except
        failures.append((step, e))
        continue
      check_config(step, saved)
      try:
        state, meta = self.restore(step, abstract_state, key_sharding=key_sharding)
      except Exception as e:  # pylint: disable=broad-except
        failures.append((step, e))
        continue
      if failures:
        self._set_aside(failures, restored=step)
      return step, state, meta
    raise failures[0][1]

  def _set_aside(self, failures: list[tuple[int, Exception]], *, restored: int) -> None:
    aside = os.path.join(self.workdir, "unreadable_checkpoints")
    for step, error in failures:
      log.warning("checkpoint step %d in %s does not read (%s: %s); resuming from step %d, and "
                  "moving it to %s", step, self.directory, type(error).__name__, str(error)[:300],
                  restored, aside)
      if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        dest = os.path.join(aside, str(step))
        while os.path.exists(dest):  # set aside before, in an earlier run
          dest += "_"
        shutil.move(os.path.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("radjax_unreadable_checkpoints_moved")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
    if self.best is not None:
      self.best.close()


def restore_items(manager: ocp.CheckpointManager, step: int, abstract_state: Mapping[str, Any], *,
                  key_sharding: Any) -> tuple[dict, dict]:
  """See :meth:`Checkpointer.restore`; works on any manager (also read-only ones)."""
  abstract = dict(abstract_state)
  targets = {}
  for name in ARRAY_ITEMS:
    if name == "train":
      if "step" not in abstract:
        continue
      tree = {"step": abstract["step"], "rng": abstract["rng"]}
    else:
      tree = abstract.get(name)
    if _is_empty(tree):
      continue
    targets[name] = tree
  args = {n: ocp.args.StandardRestore(_abstract_keys_to_data(t, key_sharding)) for n, t in targets.items()}
  item_names = set(_item_names(manager, step))
  if "meta" in item_names:
    args["meta"] = ocp.args.JsonRestore()
  missing = [n for n in args if n not in item_names]
  if missing:
    raise ValueError(f"checkpoint {manager.directory}/{step} has no item(s) {missing}")
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  state = {}
  for name, tree in targets.items():
    value = data_to_keys(restored[name], tree)
    if name == "train":
      state["step"], state["rng"] = value["step"], value["rng"]
    else:
      state[name] = value
  for name in ARRAY_ITEMS:  # empty trees were not saved; hand back the (empty) template
    if name != "train" and name in abstract and name not in state:
      state[name] = abstract[name]
  meta = dict(restored["meta"]) if "meta" in args else {}
  return state, meta


def _item_names(manager: ocp.CheckpointManager, step: int) -> list[str]:
  path = os.path.join(manager.directory, str(step))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint for step {step} under {manager.directory}")
  return [entry.name for entry in os.scandir(path) if entry.is_dir()]


def local_data_state(meta: Mapping[str, Any]) -> Any:
  """This process's iterator state from a checkpoint's ``meta`` (None if not resumable)."""
  states = meta.get("data_states") or []
  if meta.get("process_count", 1) != jax.process_count() or len(states) != jax.process_count():
    log.warning("checkpoint was written by %s process(es), this run has %d: the data iterator "
                "restarts instead of resuming", meta.get("process_count"), jax.process_count())
    return None
  return _decode_data_state(states[jax.process_index()])


# ----------------------------------------------------------------------------- pretrained


def load_pretrained(workdir: str, *, step: int | None = None, best: bool = False,
                    use_ema: bool | None = None, method: Any = None, mesh: Any = None):
  """Rebuilds a trained model from ``workdir`` -> ``(model, config)``.

  The model is built by the method named in the saved config (``radjax.methods`` unless
  ``method`` is given) and its params (+ non-Param state) are restored from the latest
  checkpoint (``step``, or ``workdir/best`` with ``best=True``). ``use_ema`` None means
  "the EMA params when the run kept them". Arrays land replicated on ``mesh`` (default: a
  single device), whatever mesh wrote them. The model is in inference mode (``model.eval()``:
  BatchNorm on its running averages, dropout off), as every caller uses it; fine-tuning copies
  its state only.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  workdir = paths.local_dir(workdir, "the pre-trained run's workdir")
  sub = "best" if best else "checkpoints"
  manager = ocp.CheckpointManager(
      os.path.join(workdir, sub), options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {os.path.join(workdir, sub)}")
    cfg_dict = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    config = dict_to_config(with_schema_defaults(cfg_dict))
    if method is None:
      from radjax import methods as methods_lib  # pylint: disable=import-outside-toplevel
      method = methods_lib.get_method(config.method.name)
    with nnx.use_eager_sharding(False):
      abstract_model = nnx.eval_shape(lambda: method.build(config, nnx.Rngs(int(config.get("seed", 0)))))
    graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
    if mesh is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    else:
      sharding = NamedSharding(mesh, P())
    def target(tree):
      return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
    items = set(_item_names(manager, step))
    if use_ema is None:
      use_ema = "ema" in items
    elif use_ema and "ema" not in items:
      raise ValueError(f"{workdir}: use_ema=True but checkpoint {step} kept no EMA params")
    abstract = {"ema" if use_ema else "params": target(nnx.to_pure_dict(abs_params)),
                "model_state": target(nnx.to_pure_dict(abs_rest))}
    state, _ = restore_items(manager, step, abstract, key_sharding=sharding)
    params = state["ema" if use_ema else "params"]
    model = nnx.merge(graphdef, params, state["model_state"])
    model.eval()
  finally:
    manager.close()
  config.lock()
  return model, config
