"""XLA flags that ``radjax bench`` sets for its own process (CPU only; never for training).

They are appended to ``$XLA_FLAGS`` unless that already names the flag, and only before jax
creates its CPU client. ``RADJAX_BENCH_XLA_DEFAULTS=0`` disables them.

Measured on jaxlib 0.10.2, 2-core AMD Zen 5 (AVX512-BF16), bf16 matmuls [3152 x 768 x {768,3072}]
and the ViT-B/16 CLIP step: none of the CPU library flags beats the default (YNNPACK dot
fusions), so the set is empty and the speed comes from the model code instead (float32
accumulation of bf16 matmuls, materialised transposes for weight gradients, CPU attention; see
radjax/models/layers.py and transformer.py):
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
CPU_DEFAULTS: dict[str, str] = {}


def apply_default_xla_flags(defaults: dict[str, str] | None = None) -> list[str]:
  """Appends ``defaults`` (default :data:`CPU_DEFAULTS`) to ``$XLA_FLAGS``; returns what it added."""
  defaults = CPU_DEFAULTS if defaults is None else defaults
  if not defaults or os.environ.get("RADJAX_BENCH_XLA_DEFAULTS", "1") == "0":
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
