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
import sys
from typing import Any

from radjax import host_malloc


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
  result["big_blocks_kept"] = host_malloc.big_blocks_loaded()
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
