"""``radjax bench``: train-step throughput / FLOPs / MFU / memory, loader throughput, and a
side-by-side against a PyTorch peer (open_clip).

    radjax bench step    --config configs/bench/clip_vitb16.py --batch 16 --dtype bfloat16 [--json]
                         [--profile DIR]
    radjax bench data    --image_size 224 --batch 64 --workers 0,1,2 --steps 20
    radjax bench compare --config configs/bench/clip_vitb16.py --peer open_clip --batch 16 \
        --dtype bfloat16 --repeats 5

open_clip is never a runtime dependency: ``bench compare`` runs it in a subprocess with a
Python that has it (this one, or ``$RADJAX_BENCH_PEER_PYTHON``), and says how to install it
when there is none.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any

# /proc/cpuinfo flags that decide which matmul kernels XLA and oneDNN can use: x86's vector and
# bf16 / AMX extensions, and aarch64's ("bf16", "i8mm", "sve").
MATMUL_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                    "avx_vnni", "amx_tile", "amx_bf16", "asimd", "sve", "i8mm", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def host_cpus() -> int:
  """The CPUs this process may run on (its affinity mask where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


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


def _config(args: Any, extra: list[str]):
  from radjax.config import load_config, parse_overrides  # pylint: disable=import-outside-toplevel
  return load_config(args.config, parse_overrides(extra))


def main_step(args: Any, extra: list[str]) -> int:
  from radjax.bench import step  # pylint: disable=import-outside-toplevel
  config = step.prepare_config(_config(args, extra), batch=args.batch, dtype=args.dtype,
                               method=args.method)
  result = step.run(config, steps=args.steps, warmup=args.warmup, repeats=args.repeats,
                    profile_dir=args.profile)
  result["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
  if args.json:
    print(json.dumps(result, sort_keys=True))
  else:
    print(step.format_result(result))
  return 0


def main_data(args: Any, extra: list[str]) -> int:
  from radjax import defaults  # pylint: disable=import-outside-toplevel
  try:
    from radjax.data.bench import bench_data  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    print(f"radjax bench data: the loader benchmark (radjax.data.bench.bench_data) is not "
          f"available in this build: {e}", file=sys.stderr)
    return 1
  if args.config:
    data_cfg = _config(args, extra).data
  else:
    if extra:
      from radjax.config import ConfigError  # pylint: disable=import-outside-toplevel
      raise ConfigError(f"overrides {extra} need --config")
    data_cfg = defaults.data_config()
  data_cfg = data_cfg.copy_and_resolve_references()
  with data_cfg.unlocked():
    data_cfg.dataset = args.dataset
    if args.data_dir:
      data_cfg.data_dir = args.data_dir
    if args.image_size:
      data_cfg.image_size = int(args.image_size)
      if "synth" in data_cfg:
        data_cfg.synth.image_size = int(args.image_size)
  try:
    workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
  except ValueError as e:
    raise ValueError(f"--workers must be a comma-separated list of ints, got {args.workers!r}") from e
  rows = bench_data(data_cfg, int(args.batch), workers, int(args.steps))
  if args.json:
    print(json.dumps({"data": rows}, sort_keys=True))
    return 0
  print(f"radjax bench data: {data_cfg.dataset} image {data_cfg.image_size} batch {args.batch}, "
        f"{args.steps} batches per worker count (full training augmentation)")
  print(f"  {'workers':>7}  {'examples/s':>10}  {'ms/batch':>9}  {'startup s':>9}")
  for r in rows:
    print(f"  {r.get('workers', '?'):>7}  {r.get('examples_per_s', float('nan')):>10.1f}  "
          f"{r.get('batch_ms', float('nan')):>9.1f}  {r.get('startup_s', float('nan')):>9.2f}")
  return 0


def main_compare(args: Any, extra: list[str]) -> int:
  from radjax.bench import compare  # pylint: disable=import-outside-toplevel
  return compare.main(args, extra)


def main(args: Any, extra: list[str]) -> int:
  """Entry point of ``radjax bench {step,data,compare}`` (args from radjax/cli.py)."""
  command = args.bench_command
  if command == "step":
    code = main_step(args, extra)
  elif command == "data":
    code = main_data(args, extra)
  elif command == "compare":
    code = main_compare(args, extra)
  else:
    raise ValueError(f"unknown bench command {command!r}; expected step, data or compare")
  if code:
    # radjax/cli.py ignores our return value; make the exit status say it.
    sys.stdout.flush()
    raise SystemExit(code)
  return code
