"""Peak FLOP/s of the device a benchmark runs on: a datasheet table and a measured matmul.

MFU is reported against the datasheet dense bf16 peak on GPU/TPU and against a matmul measured
in the same process on CPU (CPUs have no meaningful datasheet number: it depends on the ISA
extensions the compiler uses, the core count the process may use and the clock).
"""

from __future__ import annotations

import time
from typing import Any

# Dense (no sparsity) bf16 tensor-core / MXU peak per device, FLOP/s. Matched against
# jax.Device.device_kind (lower-cased), most specific first.
DATASHEET_BF16_PEAK: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),     # SXM
    ("h200", 989e12),
    ("gh200", 989e12),
    ("a100", 312e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
)


def datasheet_peak(device_kind: str) -> float | None:
  """bf16 dense peak FLOP/s of one device of this kind, or None when not in the table."""
  kind = device_kind.lower()
  for key, peak in DATASHEET_BF16_PEAK:
    if key in kind:
      return peak
  return None


def measure_matmul_peak(dtype: str, *, n: int | None = None, repeats: int = 5,
                        device: Any = None) -> dict[str, Any]:
  """FLOP/s of an n x n x n matmul on one device (best of ``repeats``, after a warm-up call).

  ``dtype`` "bfloat16": bf16 x bf16 with float32 accumulation (preferred_element_type), the
  product a bf16 training step runs; "float32": f32 x f32. n defaults to 2048 on CPU and 8192 on
  accelerators (large enough to be compute-bound there).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from radjax import mkl_gemm  # pylint: disable=import-outside-toplevel
  from radjax.models import layers  # pylint: disable=import-outside-toplevel

  device = device if device is not None else jax.local_devices()[0]
  if n is None:
    n = 2048 if device.platform == "cpu" else 8192
  dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  # Random operands: constant ones let the hardware skip work (GPUs run a constant or zero
  # product measurably faster than real data).
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(ka, (n, n), dt), device)
  b = jax.device_put(jax.random.normal(kb, (n, n), dt), device)
  # On CPU, the operand dtype radjax's own matmuls use (bf16 upcast where the CPU's bf16 dots
  # are no faster than float32's), and the faster of XLA's and MKL's kernels where radjax uses
  # MKL (radjax.mkl_gemm): the peak of what this machine offers, not of one library.
  on_cpu = device.platform == "cpu"
  operand = layers.cpu_dot_dtype(dt) if on_cpu else dt
  kernels = {"XLA": jax.jit(lambda x, y: jnp.dot(x.astype(operand), y.astype(operand),
                                                 preferred_element_type=jnp.float32))}
  if on_cpu and layers.cpu_matmul_path() == "MKL":
    kernels["MKL"] = jax.jit(lambda x, y: mkl_gemm.gemm(x.astype(operand), y.astype(operand)))
  times = {}
  for name, f in kernels.items():
    f(a, b).block_until_ready()
    times[name] = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      f(a, b).block_until_ready()
      times[name] = min(times[name], time.perf_counter() - t0)
  fastest = min(times, key=times.get)
  return {"flops_per_s": 2.0 * n ** 3 / times[fastest], "n": n, "dtype": dtype,
          "what": f"{dtype} x {dtype} -> float32 matmul {n}^3, best of {repeats}"
                  + (f" ({fastest}'s, the faster of {' and '.join(times)})" if len(times) > 1 else "")
                  + ("" if operand == dt else " (operands upcast: no fast bf16 dots)")}


def device_peak(dtype: str, *, measure: bool = True) -> dict[str, Any]:
  """{"peak_flops_per_s", "peak_source", "measured_flops_per_s", "datasheet_flops_per_s"}.

  The MFU denominator is the datasheet peak where the device is in the table (GPU/TPU), else the
  measured matmul peak (CPU, unknown accelerators).
  """
  import jax  # pylint: disable=import-outside-toplevel

  dev = jax.local_devices()[0]
  sheet = datasheet_peak(dev.device_kind) if dev.platform != "cpu" else None
  measured = measure_matmul_peak(dtype, device=dev) if measure or sheet is None else None
  out: dict[str, Any] = {
      "device_kind": dev.device_kind, "platform": dev.platform,
      "datasheet_flops_per_s": sheet,
      "measured_flops_per_s": measured["flops_per_s"] if measured else None,
      "measured_what": measured["what"] if measured else None,
  }
  if sheet is not None:
    out.update(peak_flops_per_s=sheet, peak_source=f"datasheet dense bf16 peak of {dev.device_kind}")
  else:
    out.update(peak_flops_per_s=measured["flops_per_s"],
               peak_source=f"measured in this run: {measured['what']}")
  return out
