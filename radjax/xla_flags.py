"""XLA flags that radjax sets for its own processes on CPU: every ``radjax`` command (train,
study, bench, ...) and scripts/learning_checks.py, so a benchmark measures what training runs.

They are appended to ``$XLA_FLAGS`` unless that already names the flag, and only before jax
creates its CPU client. ``RADJAX_XLA_DEFAULTS=0`` disables them. Tests (pytest) do not set them.

Measured on jaxlib 0.10.2, 2-core AMD Zen 5 (AVX512-BF16), ViT-B/16 CLIP train step at batch 16
(`radjax bench step`; BUILD_NOTES.md, "CPU step performance"):
  --xla_cpu_enable_concurrency_optimized_scheduler=false                    kept: float32 +8 %,
      bfloat16 +6.5 %. XLA's default schedule runs independent ops side by side on the thread
      pool; on two cores two concurrent matmuls each get one core and both run slower.
The CPU library flags do not beat the default (YNNPACK dot fusions):
  --xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true   no change
  --xla_cpu_experimental_onednn_fusion_type=dot                             no change
  --xla_cpu_experimental_xnn_fusion_type=dot --xla_cpu_experimental_ynn_fusion_type=
                                                                            ~2x slower dots
  --xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce                 slower 2-D dots
"""

from __future__ import annotations

import os
import sys

# flag (without --) -> value.
CPU_DEFAULTS: dict[str, str] = {"xla_cpu_enable_concurrency_optimized_scheduler": "false"}


def apply_default_xla_flags(defaults: dict[str, str] | None = None) -> list[str]:
  """Appends ``defaults`` (default :data:`CPU_DEFAULTS`) to ``$XLA_FLAGS``; returns what it added."""
  defaults = CPU_DEFAULTS if defaults is None else defaults
  if not defaults or os.environ.get("RADJAX_XLA_DEFAULTS", "1") == "0":
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
  added = [f"--{k}={v}" for k, v in defaults.items() if f"--{k}" not in current]
  if added:
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added
