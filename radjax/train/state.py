"""Train state: a plain dict pytree, created already sharded on the mesh.

  state = {
    "step":        int32 []            optimizer updates applied so far,
    "rng":         uint32 [2]          key data of the run's base key (step keys = fold_in(base, step)),
    "params":      pure dict of arrays (nnx.Param leaves of the method's model),
    "model_state": pure dict of arrays (every other nnx variable: BatchNorm stats, RNG counters),
    "opt_state":   optax state (its param-shaped parts sharded like params),
    "ema":         pure dict like params (only when optim.ema_decay > 0),
  }
The model's structure (``nnx.GraphDef``) lives outside the state; ``nnx.merge(graphdef,
params, model_state)`` rebuilds the module inside the jitted step.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

# Decorrelates the step keys from nnx.Rngs(seed) used to initialise the model.
_STEP_KEY_SALT = 0x7261646A  # "radj"


def base_key(seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(int(seed)), _STEP_KEY_SALT)


def build_model(method: Any, config: Any) -> nnx.Module:
  """``method.build`` with annotations kept as metadata only.

  flax >= 0.12 would otherwise shard annotated variables eagerly at creation and need
  a mesh context; here shardings are applied by ``jax.jit(out_shardings=...)`` instead.
  """
  with nnx.use_eager_sharding(False):
    return method.build(config, nnx.Rngs(int(config.get("seed", 0))))


def abstract_model(method: Any, config: Any) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, abstract params, abstract other state) without allocating anything."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: build_model(method, config))
  return nnx.split(model, nnx.Param, ...)


# ----------------------------------------------------------------------------- shardings


def _fallback_spec(spec: Any, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Keeps annotation entries that are mesh axes and divide the dim; replicates the rest."""
  if spec is None:
    return P()
  entries = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))):
    names = entry if isinstance(entry, tuple) else (entry,)
    names = tuple(n for n in names if n is not None and n in mesh.shape)
    size = 1
    for n in names:
      size *= mesh.shape[n]
    if not names or dim % size:
      entries.append(None)
    else:
      entries.append(names if len(names) > 1 else names[0])
  return P(*entries)


def _fallback_shardings(abstract: nnx.State, mesh: Mesh) -> Any:
  specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
  shapes = nnx.to_pure_dict(abstract)
  return jax.tree.map(
      lambda s, x: NamedSharding(mesh, _fallback_spec(s, x.shape, mesh)), specs, shapes,
      is_leaf=lambda s: isinstance(s, P) or s is None)


def _rules_module():
  try:
    return importlib.import_module("radjax.parallel.rules")
  except ImportError:
    return None


def variable_shardings(abstract: nnx.State, mesh: Mesh) -> Any:
  """NamedSharding per leaf of ``abstract`` (an nnx.State), as a pure dict.

  Uses ``radjax.parallel.rules.param_shardings`` (logical axis names -> mesh axes) when
  that module exists; otherwise annotations that already name mesh axes are honoured
  and everything else is replicated.
  """
  if not jax.tree.leaves(abstract):
    return {}
  rules = _rules_module()
  if rules is not None and hasattr(rules, "param_shardings"):
    out = rules.param_shardings(abstract, mesh)
    return nnx.to_pure_dict(out) if isinstance(out, nnx.State) else out
  return _fallback_shardings(abstract, mesh)


# ----------------------------------------------------------------------------- state


def _is_sharding(x: Any) -> bool:
  return isinstance(x, jax.sharding.Sharding)


def state_shardings(abstract_state: dict, param_sh: Any, rest_sh: Any, tx: optax.GradientTransformation,
                    mesh: Mesh) -> dict:
  """Sharding tree matching ``abstract_state`` (opt_state follows params, scalars replicate)."""
  rep = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, abstract_state["opt_state"], param_sh,
      transform_non_params=lambda _: rep, is_leaf=_is_sharding)
  out = {"step": rep, "rng": rep, "params": param_sh, "model_state": rest_sh, "opt_state": opt_sh}
  if "ema" in abstract_state:
    out["ema"] = param_sh
  return out


def make_init_fn(method: Any, config: Any, tx: optax.GradientTransformation, ema: bool) -> Callable[[], dict]:
  def init() -> dict:
    model = build_model(method, config)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(base_key(config.get("seed", 0))),
        "params": params,
        "model_state": rest,
        "opt_state": tx.init(params),
    }
    if ema:
      state["ema"] = jax.tree.map(jnp.copy, params)
    return state
  return init


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target sharding (Orbax restore / AOT targets)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def setup(method: Any, config: Any, mesh: Mesh, tx: optax.GradientTransformation,
          ema: bool) -> tuple[nnx.GraphDef, dict, dict, Callable[[], dict]]:
  """-> (graphdef, abstract state with shardings, sharding tree, sharded init fn)."""
  graphdef, abs_params, abs_rest = abstract_model(method, config)
  param_sh = variable_shardings(abs_params, mesh)
  rest_sh = variable_shardings(abs_rest, mesh)
  init = make_init_fn(method, config, tx, ema)
  abstract = jax.eval_shape(init)
  shardings = state_shardings(abstract, param_sh, rest_sh, tx, mesh)
  jitted_init = jax.jit(init, out_shardings=shardings)

  def sharded_init() -> dict:
    if jax.default_backend() != "gpu":
      return jitted_init()
    # XLA inlines a copy of threefry for every parameter initialiser: the ViT-B/16 CLIP init
    # took minutes to compile on an H200 (jax 0.11.2). JAX's CUDA kernel computes the same bits.
    # Set for this compilation only: the flag is process-wide and the caller's to choose.
    before = jax.config.jax_threefry_gpu_kernel_lowering
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)
    try:
      return jitted_init()
    finally:
      jax.config.update("jax_threefry_gpu_kernel_lowering", before)

  return graphdef, with_shardings(abstract, shardings), shardings, sharded_init


def count_params(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
