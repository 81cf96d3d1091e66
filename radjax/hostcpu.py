"""This machine's CPU: how many cores this process may use, which matmul instructions it has,
and whether bfloat16 dot products among them.

Standard library only: ``radjax bench`` reports it, and radjax's CPU matmuls choose their
operand dtype by it (:func:`radjax.models.layers.cpu_dot_dtype`).
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

def host_cpus() -> int:
  """The CPUs this process may run on (its affinity mask where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


# /proc/cpuinfo flags that decide which matmul kernels XLA and oneDNN can use: x86's vector and
# bf16 / AMX extensions, and aarch64's ("bf16", "i8mm", "sve").
MATMUL_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                    "avx_vnni", "amx_tile", "amx_bf16", "asimd", "sve", "i8mm", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def describe_cpu(cpuinfo: str) -> dict[str, Any]:
  """The first processor listed in ``cpuinfo`` (the text of Linux's /proc/cpuinfo): its model
  name, x86 family / model numbers (None elsewhere), which of :data:`MATMUL_ISA_FLAGS` it has, and
  whether it has bfloat16 dot-product instructions (without them bf16 matmuls are emulated)."""
  fields: dict[str, str] = {}
  for line in cpuinfo.splitlines():
    if not line.strip():
      if fields:
        break  # the end of the first processor's block
      continue
    key, _, value = line.partition(":")
    fields.setdefault(key.strip().lower(), value.strip())
  flags = set((fields.get("flags") or fields.get("features") or "").split())
  number = lambda key: int(fields[key]) if fields.get(key, "").isdigit() else None
  return {
      "model": fields.get("model name") or fields.get("cpu model") or platform.processor() or None,
      "family": number("cpu family"),
      "model_number": number("model"),
      "matmul_isa": [f for f in MATMUL_ISA_FLAGS if f in flags],
      "native_bf16": any(f in flags for f in NATIVE_BF16_FLAGS),
  }


@functools.cache
def host_cpu() -> dict[str, Any]:
  """:func:`describe_cpu` of this machine (from /proc/cpuinfo; model only where there is none)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      return describe_cpu(f.read())
  except OSError:
    return describe_cpu("")


def format_cpu(cpu: dict[str, Any]) -> str:
  """One line for a :func:`describe_cpu` dict, e.g. "AMD EPYC (family 25 model 1; avx2 fma; no
  bf16 instructions)"."""
  parts = []
  if cpu.get("family") is not None:
    parts.append(f"family {cpu['family']} model {cpu['model_number']}")
  parts.append(" ".join(cpu.get("matmul_isa") or []) or "no listed matmul extensions")
  parts.append("bf16 instructions" if cpu.get("native_bf16") else "no bf16 instructions")
  return f"{cpu.get('model') or 'unknown CPU'} ({'; '.join(parts)})"


def native_bf16() -> bool:
  """Whether this machine's CPU has bfloat16 dot-product instructions (:data:`NATIVE_BF16_FLAGS`)."""
  return bool(host_cpu()["native_bf16"])
