"""Device mesh and batch placement.

The mesh has three named axes, always in this order:
  * ``data``   - pure data parallelism (params replicated along it),
  * ``fsdp``   - data parallelism with params/optimizer state sharded along it,
  * ``tensor`` - model (tensor) parallelism inside a layer.
A batch is split over ("data", "fsdp") and replicated over "tensor".
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from radjax.config import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: Mapping[str, Any], num_devices: int) -> tuple[int, int, int]:
  """Resolves the ``-1`` entries of ``mesh_cfg`` (keys data/fsdp/tensor) for ``num_devices``.

  At most one axis may be -1; it takes whatever the others leave. Raises ValueError
  naming the sizes when they cannot tile the devices exactly.
  """
  sizes = []
  for axis in AXES:
    size = int(mesh_cfg.get(axis, 1) if hasattr(mesh_cfg, "get") else getattr(mesh_cfg, axis))
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}={size}: a mesh axis size must be a positive int or -1 (inferred)")
    sizes.append(size)
  unknown = [a for a, s in zip(AXES, sizes) if s == -1]
  if len(unknown) > 1:
    raise ConfigError(f"mesh: only one axis may be -1 (inferred), got {unknown} as -1")
  fixed = math.prod(s for s in sizes if s != -1)
  desc = ", ".join(f"{a}={s}" for a, s in zip(AXES, sizes))
  if unknown:
    if num_devices % fixed:
      raise ConfigError(
          f"mesh ({desc}): the fixed axis sizes multiply to {fixed}, which does not divide the "
          f"{num_devices} available devices")
    sizes[AXES.index(unknown[0])] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f"mesh ({desc}): axis sizes multiply to {fixed} but there are {num_devices} devices; "
        "set one axis to -1 to infer it")
  return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ("data", "fsdp", "tensor") mesh over ``devices`` (default: all global devices).

  Uses ``jax.make_mesh`` so accelerators get a topology-aware device order; axes are
  ``Auto`` so ``jax.jit`` in/out shardings drive the partitioning.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  try:
    return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
  except Exception:  # pylint: disable=broad-except
    # Some device kinds/topologies are not handled by the topology-aware path; a plain
    # reshape (devices sorted by process, then id) is always valid.
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES, axis_types=auto)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over data x fsdp, everything else replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_split(mesh: Mesh) -> int:
  """How many ways a global batch is split (data x fsdp)."""
  return int(mesh.shape["data"] * mesh.shape["fsdp"])


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a host-local batch (dict of numpy arrays, leading dim = per-process batch) on ``mesh``.

  Each process passes its own slice; the global batch is their concatenation in process
  order. Only numeric/bool arrays are accepted: report text must never reach the device
  (a string/object field raises ValueError naming the key, never its content).
  """
  sharding = batch_sharding(mesh)
  out = {}
  for key, value in batch.items():
    arr = np.asarray(value) if not isinstance(value, jax.Array) else value
    if arr.dtype.kind not in "biuf":
      raise ValueError(f"batch[{key!r}] has dtype {arr.dtype}; only numeric arrays may reach the train step")
    if arr.ndim == 0:
      raise ValueError(f"batch[{key!r}] is a scalar; every batch field needs a leading batch dim")
    out[key] = jax.make_array_from_process_local_data(sharding, arr)
  return out
