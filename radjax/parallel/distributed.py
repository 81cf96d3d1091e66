"""Multi-process (multi-host) initialisation with ``jax.distributed``.

How the coordinator address and process ids are found, in order:
  1. ``config.distributed.coordinator_address`` / ``num_processes`` / ``process_id``;
  2. environment ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
     (what ``launch/local.py`` sets);
  3. a cluster manager JAX detects itself: SLURM (``srun``, ``SLURM_NTASKS`` > 1), Open MPI
     (``OMPI_COMM_WORLD_SIZE`` > 1), Cloud TPU pods / GKE (``TPU_WORKER_HOSTNAMES`` with several
     hosts, or ``config.distributed.mode="detect"`` on TPU VMs, which asks the metadata server).
Otherwise the run is a single process and nothing is initialised.

Must run before anything touches a JAX backend (``jax.devices()``, any array op).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

from radjax.config import ConfigError

log = logging.getLogger(__name__)

MODES = ("auto", "detect", "off")


def _get(cfg: Any, name: str, default: Any) -> Any:
  if cfg is None:
    return default
  try:
    value = cfg[name]
  except (KeyError, AttributeError, TypeError):
    return default
  return default if value is None else value


def _env_int(name: str) -> int | None:
  raw = os.environ.get(name)
  if raw is None or raw == "":
    return None
  try:
    return int(raw)
  except ValueError:
    raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _cluster_hint() -> str | None:
  """Names a multi-process cluster environment that jax can auto-detect, if present."""
  slurm_tasks = _env_int("SLURM_NTASKS") if "SLURM_JOB_ID" in os.environ else None
  if slurm_tasks is not None and slurm_tasks > 1 and "SLURM_STEP_NODELIST" in os.environ:
    return "slurm"
  ompi = _env_int("OMPI_COMM_WORLD_SIZE")
  if ompi is not None and ompi > 1:
    return "ompi"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    return "tpu"
  return None


def is_initialized() -> bool:
  return bool(jax.distributed.is_initialized())


def initialize(dist_cfg: Any = None) -> bool:
  """Initialises ``jax.distributed`` when this run spans several processes.

  ``dist_cfg`` is ``config.distributed`` (fields coordinator_address, num_processes,
  process_id, mode). Returns True when jax.distributed is (now) initialised, False for a
  single-process run. Idempotent.
  """
  if is_initialized():
    return True
  mode = str(_get(dist_cfg, "mode", "auto"))
  if mode not in MODES:
    raise ConfigError(f"distributed.mode={mode!r}; expected one of {MODES}")
  if mode == "off":
    return False

  address = _get(dist_cfg, "coordinator_address", None) or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num_processes = _get(dist_cfg, "num_processes", -1)
  process_id = _get(dist_cfg, "process_id", -1)
  if num_processes is None or int(num_processes) < 0:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None or int(process_id) < 0:
    process_id = _env_int("JAX_PROCESS_ID")

  # CPU collectives across processes need gloo (MPI is the other option); it is the
  # default in recent jax, but set it so an older default cannot hang a CPU run.
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception:  # pylint: disable=broad-except
    log.warning("could not set jax_cpu_collectives_implementation=gloo")

  if address:
    if num_processes is None or process_id is None:
      hint = _cluster_hint()
      if hint is None:
        raise ConfigError(
            f"distributed: coordinator_address={address!r} given but num_processes/process_id are "
            "not (set config.distributed.num_processes/process_id or JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
    if num_processes is not None and int(num_processes) == 1:
      return False
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=None if num_processes is None else int(num_processes),
        process_id=None if process_id is None else int(process_id))
  elif mode == "detect" or _cluster_hint() is not None:
    # jax finds coordinator, process count and id from SLURM / MPI / TPU metadata itself.
    jax.distributed.initialize()
  else:
    return False
  log.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
  return True


def shutdown() -> None:
  if is_initialized():
    jax.distributed.shutdown()
