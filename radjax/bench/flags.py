"""XLA flags that ``radjax bench`` sets for its own process (CPU only; never for training).

They are appended to ``$XLA_FLAGS`` unless that already names the flag, and only when jax has
not yet created its CPU client. ``RADJAX_BENCH_XLA_DEFAULTS=0`` disables them (to measure
their effect).
"""

from __future__ import annotations

import os
import sys

# flag -> value. Measured on jaxlib 0.10.2 (see BUILD_NOTES / the bench report).
CPU_DEFAULTS: dict[str, str] = {}


def apply_default_xla_flags() -> list[str]:
  """Appends :data:`CPU_DEFAULTS` to ``$XLA_FLAGS``; returns the flags it added."""
  if os.environ.get("RADJAX_BENCH_XLA_DEFAULTS", "1") == "0":
    return []
  if "jax" in sys.modules:
    try:
      from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
      if xla_bridge.backends_are_initialized():
        return []
    except Exception:  # pylint: disable=broad-except
      return []
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "cpu" not in platforms:
    return []
  current = os.environ.get("XLA_FLAGS", "")
  added = [f"--{k}={v}" for k, v in CPU_DEFAULTS.items() if f"--{k}" not in current]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added
