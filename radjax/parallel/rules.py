"""Logical-axis -> mesh-axis rules for radjax parameters, and sharded initialisation.

Every radjax parameter is annotated with logical axis names (see radjax/models/layers.py).
Placement on the ("data", "fsdp", "tensor") mesh is decided here in two steps:

1. Tensor parallelism by rule: ``DEFAULT_RULES`` maps logical names to mesh axes
   (attention heads, MLP hidden and vocabulary go to "tensor"; everything else stays put).
   Names that no rule mentions are replicated.
2. FSDP by size: every parameter with at least ``min_size`` elements and >= 2 dims gets its
   largest dimension divisible by the "fsdp" axis sharded over "fsdp" (ZeRO-3 style; XLA
   all-gathers it where used). Biases, norms and other small parameters stay replicated.

A dimension whose size does not divide the mesh axes is left replicated rather than padded.

Activations are placed by :func:`constrain_batch`: the transformer blocks (inputs, q/k/v,
attention output, MLP hidden) and the ResNet (block inputs, conv outputs) call it so the
partitioner keeps activations split over the batch axes; left alone under FSDP, XLA splits them
like the sharded kernels instead and all-gathers the batch. It is a no-op without a mesh.
Embedding tables are gathered over "fsdp" before their lookup by :func:`gather_fsdp` (a lookup
from an fsdp-sharded table is otherwise partitioned like the table, gathering the batch).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", None),
    ("kv", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("patch", None),
    ("pos", None),
    ("conv_in", None),
    ("conv_out", None),
    ("classes", None),
)
FSDP_AXIS = "fsdp"
MIN_SHARD_SIZE = 2 ** 14  # elements (64 KiB in float32); smaller params are replicated
# Set False to compare: constrain_batch() and gather_fsdp() become no-ops
# (tests/test_activation_sharding.py then fails: the FSDP train step all-gathers batch activations).
ACTIVATION_CONSTRAINTS = True


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _spec_entry(axes: Sequence[str]) -> MeshAxes:
  """A PartitionSpec entry from a tuple of mesh axes: None, one axis name, or the tuple."""
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def logical_to_mesh(spec: Sequence[str | None] | None, mesh: Mesh | jax.sharding.AbstractMesh,
                    rules: Rules = DEFAULT_RULES, *, shape: Sequence[int] | None = None,
                    fsdp_axis: str | None = FSDP_AXIS, min_size: int = MIN_SHARD_SIZE) -> P:
  """Logical names (one per dim) -> PartitionSpec on ``mesh``.

  Unknown names and mesh axes of size 1 / absent from the mesh are dropped (replicated); a mesh
  axis is used at most once. With ``shape`` given, dims that the mesh axes do not divide are
  replicated, tensors smaller than ``min_size`` or with < 2 dims are replicated entirely, and
  the largest remaining dim divisible by the ``fsdp_axis`` size is sharded over it.
  """
  if shape is not None and (len(shape) < 2 or math.prod(shape) < min_size):
    return P()
  ndim = len(shape) if shape is not None else len(spec or ())
  spec = tuple(spec or ()) + (None,) * (ndim - len(spec or ()))
  table = dict(rules)
  sizes = dict(mesh.shape)  # works for Mesh and AbstractMesh
  used: set[str] = set()
  out: list[tuple[str, ...]] = []
  for i, name in enumerate(spec):
    axes = []
    for a in _as_tuple(table.get(name)) if name is not None else ():
      if sizes.get(a, 1) > 1 and a not in used:
        axes.append(a)
    if shape is not None and shape[i] % math.prod(sizes[a] for a in axes):
      axes = []
    used.update(axes)
    out.append(tuple(axes))
  if shape is not None and fsdp_axis and sizes.get(fsdp_axis, 1) > 1 and fsdp_axis not in used:
    n = sizes[fsdp_axis]
    # Prefer a dim not already split (tensor-parallel); then any dim that still divides.
    order = sorted(range(ndim), key=lambda i: (bool(out[i]), -shape[i]))
    for i in order:
      if shape[i] % (math.prod(sizes[a] for a in out[i]) * n) == 0:
        out[i] = out[i] + (fsdp_axis,)
        break
  return P(*[_spec_entry(a) for a in out])


def _logical_names(var: nnx.Variable) -> tuple[str | None, ...] | None:
  names = var.get_metadata().get("out_sharding")
  return tuple(names) if names else None


def param_shardings(model_state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES,
                    **kwargs) -> Any:
  """NamedSharding for every Variable of ``model_state`` (an nnx.State, abstract or concrete, or a
  module), same tree structure, usable as jit ``out_shardings`` / ``device_put`` target.
  Variables without logical names (RNG keys, counters, ...) are replicated."""
  if isinstance(model_state, nnx.Module):
    model_state = nnx.state(model_state)

  def one(x):
    if isinstance(x, nnx.Variable):
      value = x.get_value()
      shape = getattr(value, "shape", ())
      spec = logical_to_mesh(_logical_names(x), mesh, rules, shape=shape, **kwargs)
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, model_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def sharded_init(build_fn: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = DEFAULT_RULES,
                 **kwargs) -> nnx.Module:
  """Builds ``build_fn()`` with every Variable created directly in its sharding.

  The module is first traced abstractly (nnx.eval_shape) to read shapes and logical names; then
  one jit with ``out_shardings`` runs the initialisers, so each device computes only its own
  shards (threefry is partitionable) and nothing is materialised whole on one device.
  ``build_fn`` must create its own ``nnx.Rngs`` (a jitted function may not mutate outside state),
  e.g. ``lambda: ViT(cfg, rngs=nnx.Rngs(seed))``. ``kwargs`` go to :func:`logical_to_mesh`.
  """
  abstract = nnx.eval_shape(build_fn)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = param_shardings(abstract_state, mesh, rules, **kwargs)

  def init():
    return nnx.split(build_fn())[1]

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def _active_mesh(x: jax.Array) -> jax.sharding.AbstractMesh | None:
  """The mesh ``x`` is being computed on, or None (single device / no mesh).

  The context mesh (``jax.set_mesh`` / ``jax.sharding.use_abstract_mesh``) comes first. The
  training loop sets none: it jits with ``NamedSharding`` in_shardings, and under jax 0.10 every
  traced value derived from such inputs carries their (abstract) mesh in its aval, Auto axes
  included, so the mesh is read from there. (Uncommitted inputs, e.g. numpy arrays passed to a
  jit with in_shardings, carry none: trace under ``jax.set_mesh(mesh)`` then.)
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  if mesh is None or mesh.empty:
    return None
  return mesh


def constrain_batch(x: jax.Array, names: Sequence[str | None] | None = None,
                    rules: Rules = DEFAULT_RULES) -> jax.Array:
  """Pins activation ``x`` [B, ...] to the batch axes: B over the rule of logical "batch"
  (("data", "fsdp"), as ``mesh.batch_sharding``), other dims by ``names`` (logical names of
  dims 1.., resolved by ``rules``; default: unsharded, i.e. replicated over "tensor").

  Returns ``x`` unchanged when no mesh is active (single device, unit tests, eval outside a
  mesh), when the batch axes have size 1, are not Auto (inside shard_map they are Manual and
  ``x`` is already local; Explicit axes carry the sharding in the type), or do not divide B.
  """
  if not ACTIVATION_CONSTRAINTS or x.ndim == 0:
    return x
  mesh = _active_mesh(x)
  if mesh is None:
    return x
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  auto = [a for a in mesh.axis_names if types[a] == jax.sharding.AxisType.Auto]
  if not auto:
    return x
  names = tuple(names or ()) + (None,) * (x.ndim - 1 - len(names or ()))
  spec = logical_to_mesh(("batch",) + names[:x.ndim - 1], mesh, rules)
  parts = []
  sizes = dict(mesh.shape)
  for dim, axes in zip(x.shape, spec):
    axes = tuple(a for a in _as_tuple(axes) if a in auto)
    if dim % math.prod(sizes[a] for a in axes):
      axes = ()
    parts.append(_spec_entry(axes))
  if parts[0] is None:
    return x  # the batch is not split here: nothing to pin
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*parts)))


def gather_fsdp(x: jax.Array, names: Sequence[str | None] | None,
                rules: Rules = DEFAULT_RULES) -> jax.Array:
  """Pins parameter value ``x`` (logical ``names``, as annotated) to its placement without the
  "fsdp" axis: all-gathered over fsdp, a "tensor" split by ``rules`` kept.

  For embedding tables before ``jnp.take``: XLA partitions a lookup from an fsdp-sharded table
  like the table (each device looks up its slice of every id), so it gathers the batch of ids,
  and the batch of output gradients in the backward scatter-add; with the table gathered first,
  as FSDP does for matmul kernels, the lookup stays split over the batch. Returns ``x``
  unchanged without a mesh, where "fsdp" has size 1 or is not Auto.
  """
  if not ACTIVATION_CONSTRAINTS:
    return x
  mesh = _active_mesh(x)
  if mesh is None or dict(mesh.shape).get(FSDP_AXIS, 1) == 1:
    return x
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  if types[FSDP_AXIS] != jax.sharding.AxisType.Auto:
    return x
  keep = {a for a, t in types.items() if a != FSDP_AXIS and t == jax.sharding.AxisType.Auto}
  parts = []
  for axes in logical_to_mesh(names, mesh, rules, shape=x.shape):
    axes = tuple(a for a in _as_tuple(axes) if a in keep)
    parts.append(_spec_entry(axes))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*parts)))
