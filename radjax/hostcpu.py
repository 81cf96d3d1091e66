"""This machine's CPU: how many cores this process may use, which matmul instructions it has,
whether bfloat16 dot products among them, and whether those beat float32 dots.

Standard library only: ``radjax bench`` reports it, and radjax's CPU matmuls choose their
operand dtype by it (:func:`radjax.models.layers.cpu_dot_dtype`).
"""

from __future__ import annotations

import functools
import hashlib
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


def _bf16_dots_faster_on(vendor: str, flags: set[str]) -> bool:
  """Whether XLA's bf16 x bf16 -> f32 dots outrun its float32 dots on such a CPU (measured on
  each machine in BUILD_NOTES.md; deterministic, so a resumed run takes the same path).

  With AMX: 3-5x. AVX512-BF16 on AMD (Zen 4, Zen 5): about 2x. AVX512-BF16 on an Intel Xeon
  whose AMX the VM did not expose: 0.6x, so bf16 operands are better upcast there. Arm BF16:
  assumed, not measured."""
  if "amx_bf16" in flags:
    return True
  if "avx512_bf16" in flags:
    return vendor != "GenuineIntel"
  return "bf16" in flags


def describe_cpu(cpuinfo: str) -> dict[str, Any]:
  """The first processor listed in ``cpuinfo`` (the text of Linux's /proc/cpuinfo): its vendor
  (x86's ``vendor_id``, else None), model name, x86 family / model numbers (None elsewhere), which of :data:`MATMUL_ISA_FLAGS` it has,
  whether it has bfloat16 dot-product instructions (without them bf16 matmuls are emulated), and
  whether those are faster than float32 dots (``bf16_dots_faster``, which radjax's bf16 matmuls
  follow)."""
  fields = _first_processor(cpuinfo)
  flags = set((fields.get("flags") or fields.get("features") or "").split())
  number = lambda key: int(fields[key]) if fields.get(key, "").isdigit() else None
  return {
      "vendor": fields.get("vendor_id") or None,
      "model": fields.get("model name") or fields.get("cpu model") or platform.processor() or None,
      "family": number("cpu family"),
      "model_number": number("model"),
      "matmul_isa": [f for f in MATMUL_ISA_FLAGS if f in flags],
      "native_bf16": any(f in flags for f in NATIVE_BF16_FLAGS),
      "bf16_dots_faster": _bf16_dots_faster_on(fields.get("vendor_id", ""), flags),
  }


def _first_processor(cpuinfo: str) -> dict[str, str]:
  """The fields (lower-case names) of the first processor's block of /proc/cpuinfo text."""
  fields: dict[str, str] = {}
  for line in cpuinfo.splitlines():
    if not line.strip():
      if fields:
        break
      continue
    key, _, value = line.partition(":")
    fields.setdefault(key.strip().lower(), value.strip())
  return fields


def _read_cpuinfo() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      return f.read()
  except OSError:
    return ""


@functools.cache
def host_cpu() -> dict[str, Any]:
  """:func:`describe_cpu` of this machine (from /proc/cpuinfo; model only where there is none)."""
  return describe_cpu(_read_cpuinfo())


def format_cpu(cpu: dict[str, Any]) -> str:
  """One line for a :func:`describe_cpu` dict, e.g. "AMD EPYC (family 25 model 1; avx2 fma; no
  bf16 instructions)"."""
  parts = []
  if cpu.get("family") is not None:
    parts.append(f"family {cpu['family']} model {cpu['model_number']}")
  parts.append(" ".join(cpu.get("matmul_isa") or []) or "no listed matmul extensions")
  if not cpu.get("native_bf16"):
    parts.append("no bf16 instructions")
  elif cpu.get("bf16_dots_faster"):
    parts.append("bf16 instructions")
  else:
    parts.append("bf16 instructions, slower than float32 dots")
  return f"{cpu.get('model') or 'unknown CPU'} ({'; '.join(parts)})"


def bf16_dots_faster() -> bool:
  """Whether this machine's CPU multiplies bfloat16 faster than float32 (:func:`describe_cpu`)."""
  return bool(host_cpu()["bf16_dots_faster"])


def instruction_set_key(cpuinfo: str | None = None) -> str:
  """A short name for this CPU's instruction set, e.g. "x86_64-3f9a0c1d2e4b": the architecture and
  a hash of the first processor's vendor, model name and flags (``cpuinfo``: the text of Linux's
  /proc/cpuinfo, this machine's when None). Programs XLA compiled under one key may use
  instructions a CPU of another key lacks."""
  fields = _first_processor(_read_cpuinfo() if cpuinfo is None else cpuinfo)
  identity = [platform.processor(), *(fields.get(k, "") for k in ("vendor_id", "model name", "cpu model"))]
  identity += sorted((fields.get("flags") or fields.get("features") or "").split())
  digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:12]
  return f"{platform.machine() or 'unknown'}-{digest}"
