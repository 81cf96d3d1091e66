"""``radjax bench compare``: radjax's train step against a PyTorch peer on the same workload.

Each repeat runs radjax (``radjax bench step --json``) and the peer
(``python -m radjax.bench.peer_open_clip --json``) in separate subprocesses, alternating which
goes first (ABBA), so neither shares a process or a thread pool with the other and slow drifts
of the machine's load hit both alike. Both use every CPU this process may use (XLA's thread pool
/ ``torch.set_num_threads``). Reported: per-run examples/s, medians over repeats, the ratio
radjax / peer of the medians, and the paired ratios (radjax / peer within each repeat, the two
runs back to back), whose median and spread hold better when the machine's speed drifts.

open_clip is optional: it runs under this Python when importable here, else under
``$RADJAX_BENCH_PEER_PYTHON`` (e.g. a separate venv), else the command explains how to install it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from typing import Any

from radjax.config import ConfigError

INSTALL_HINT = (
    "open_clip_torch is not installed, so `radjax bench compare --peer open_clip` cannot run.\n"
    "It is an optional benchmark peer, never a radjax dependency. Install it with:\n"
    "    pip install 'radjax[bench]'        # = pip install open_clip_torch (pulls torch)\n"
    "or point RADJAX_BENCH_PEER_PYTHON at a Python that has it, e.g.\n"
    "    python3 -m venv /work/venv_bench && /work/venv_bench/bin/pip install torch torchvision "
    "open_clip_torch\n"
    "    RADJAX_BENCH_PEER_PYTHON=/work/venv_bench/bin/python radjax bench compare ...")

PEERS = ("open_clip",)


def peer_python() -> str | None:
  """A Python executable that can import open_clip, or None."""
  if importlib.util.find_spec("open_clip") is not None:
    return sys.executable
  other = os.environ.get("RADJAX_BENCH_PEER_PYTHON", "")
  if other:
    probe = subprocess.run([other, "-c", "import open_clip"], capture_output=True, text=True)
    if probe.returncode == 0:
      return other
  return None


def open_clip_model_name(config: Any) -> str:
  """open_clip's name for the architecture of ``config.model`` (ValueError if it has none)."""
  img = config.model.image
  if img.get("name", "vit") == "vit":
    variant = str(img.get("variant", "b")).upper()
    patch = int(img.get("patch_size", 16))
    if variant in ("B", "L", "H") and patch in (14, 16, 32):
      return f"ViT-{variant}-{patch}"
  elif img.get("name") == "resnet":
    variant = str(img.get("variant", "50"))
    if variant in ("50", "101"):
      return f"RN{variant}"
  raise ConfigError(f"bench compare: no open_clip model matches model.image={dict(img)}; use "
                    "configs/bench/clip_vitb16.py or configs/bench/clip_rn50.py")


def _run_json(cmd: list[str], env: dict[str, str], what: str) -> dict[str, Any]:
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode != 0:
    raise RuntimeError(f"bench compare: the {what} run failed (exit {proc.returncode}):\n"
                       f"{' '.join(cmd)}\n{proc.stderr[-3000:]}")
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if not lines:
    raise RuntimeError(f"bench compare: the {what} run printed no JSON:\n{proc.stdout[-2000:]}")
  return json.loads(lines[-1])


def ratios(radjax_eps: list[float], peer_eps: list[float]) -> dict[str, Any]:
  """examples/s per repeat of each side (repeat order, same length) -> the ratio of the medians
  and the paired ratios radjax / peer of each repeat with their median."""
  if len(radjax_eps) != len(peer_eps) or not radjax_eps:
    raise ValueError(f"need one run of each side per repeat, got {len(radjax_eps)} and {len(peer_eps)}")
  ours, theirs = statistics.median(radjax_eps), statistics.median(peer_eps)
  paired = [a / b for a, b in zip(radjax_eps, peer_eps)]
  return {"radjax_median": ours, "peer_median": theirs, "ratio": ours / theirs,
          "paired_ratios": paired, "paired_ratio_median": statistics.median(paired)}


def main(args: Any, extra: list[str]) -> int:
  from radjax.hostcpu import format_cpu, host_cpu  # pylint: disable=import-outside-toplevel
  from radjax.config import load_config, parse_overrides  # pylint: disable=import-outside-toplevel

  if args.peer not in PEERS:
    print(f"radjax bench compare: unknown --peer {args.peer!r}; known: {', '.join(PEERS)}",
          file=sys.stderr)
    return 2
  config = load_config(args.config, parse_overrides(extra))
  if (args.method or config.method.name) != "clip":
    print("radjax bench compare: the open_clip peer runs CLIP; use --method clip", file=sys.stderr)
    return 2
  model_name = open_clip_model_name(config)
  batch = int(args.batch or config.train.batch_size)
  dtype = args.dtype or str(config.model.dtype)
  if int(config.data.image_size) != 224 or int(config.data.max_text_len) != 77:
    print("radjax bench compare: open_clip models take 224 px images and 77 tokens; the config has "
          f"data.image_size={config.data.image_size}, data.max_text_len={config.data.max_text_len}",
          file=sys.stderr)
    return 2
  cpu = host_cpu()
  if dtype == "bfloat16" and not cpu["native_bf16"]:
    print(f"radjax bench compare: warning: {format_cpu(cpu)}. Without bf16 instructions torch "
          "multiplies bfloat16 at 0.2-20 GFLOP/s (AVX2 EPYCs), so an open_clip autocast step can "
          "take many minutes; radjax upcasts its bf16 matmul operands to float32 here, and "
          "--dtype float32 is the comparison that measures the two stacks.",
          file=sys.stderr, flush=True)
  python = peer_python()
  if python is None:
    print(INSTALL_HINT, file=sys.stderr)
    return 1

  env = dict(os.environ)
  # Compile once, then reuse across the alternating radjax processes.
  env.setdefault("JAX_COMPILATION_CACHE_DIR",
                 os.path.join(os.path.expanduser("~"), ".cache", "radjax", "jax_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  common = ["--batch", str(batch), "--dtype", dtype, "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--repeats", "1", "--json"]
  radjax_cmd = [sys.executable, "-m", "radjax.cli", "bench", "step", "--config", args.config,
                "--method", "clip", *common, *extra]
  peer_cmd = [python, "-m", "radjax.bench.peer_open_clip", "--model", model_name, *common]
  # The peer imports radjax.bench.peer_open_clip from this checkout even in another venv.
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  peer_env = dict(env, PYTHONPATH=os.pathsep.join([repo, env.get("PYTHONPATH", "")]))

  runs: list[dict[str, Any]] = []
  for r in range(int(args.repeats)):
    order = ("radjax", "peer") if r % 2 == 0 else ("peer", "radjax")
    for who in order:
      if who == "radjax":
        res = _run_json(radjax_cmd, env, "radjax")
      else:
        res = _run_json(peer_cmd, peer_env, args.peer)
      runs.append({"who": who, "repeat": r, "examples_per_s": res["examples_per_s"], "result": res})
      if not args.json:
        print(f"  repeat {r}: {who if who == 'radjax' else args.peer:9s} "
              f"{res['examples_per_s']:8.3f} examples/s", flush=True)

  ours = [x["examples_per_s"] for x in runs if x["who"] == "radjax"]
  theirs = [x["examples_per_s"] for x in runs if x["who"] == "peer"]
  last_ours = [x["result"] for x in runs if x["who"] == "radjax"][-1]
  last_theirs = [x["result"] for x in runs if x["who"] == "peer"][-1]
  summary = {
      "peer": args.peer, "peer_model": model_name, "config": args.config, "batch": batch,
      "dtype": dtype, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
      "radjax_examples_per_s": ours, "peer_examples_per_s": theirs, **ratios(ours, theirs),
      "radjax_flops_per_example": last_ours.get("flops_per_example"),
      "peer_flops_per_example": last_theirs.get("flops_per_example"),
      "radjax_params": last_ours.get("num_params"), "peer_params": last_theirs.get("num_params"),
      "radjax_host_peak_rss_bytes": last_ours.get("host_peak_rss_bytes"),
      "peer_host_peak_rss_bytes": last_theirs.get("host_peak_rss_bytes"),
      "threads": last_theirs.get("threads"), "peer_versions": {
          "open_clip": last_theirs.get("open_clip_version"), "torch": last_theirs.get("torch_version")},
      "xla_flags": last_ours.get("xla_flags", ""),
      "host_cpu": last_ours.get("host_cpu"),
      "radjax_cpu_matmuls": last_ours.get("cpu_matmuls"),
      # Both sides inherit this process's environment, so the same malloc settings.
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "ld_preload": os.environ.get("LD_PRELOAD", ""),
  }
  if args.json:
    print(json.dumps(summary, sort_keys=True))
    return 0
  gf = lambda x: f"{x / 1e9:.1f}" if x else "n/a"
  print(f"radjax bench compare: CLIP {model_name}, batch {batch}, {dtype}, {summary['threads']} CPU "
        f"threads each, {args.repeats} alternating repeats x {args.steps} steps (+{args.warmup} warm-up)")
  print(f"  radjax    median {summary['radjax_median']:8.3f} examples/s   "
        f"{gf(summary['radjax_flops_per_example'])} GFLOP/example (analytic), "
        f"{(summary['radjax_params'] or 0) / 1e6:.2f} M params")
  print(f"  {args.peer:9s} median {summary['peer_median']:8.3f} examples/s   "
        f"{gf(summary['peer_flops_per_example'])} GFLOP/example (torch FlopCounterMode), "
        f"{(summary['peer_params'] or 0) / 1e6:.2f} M params "
        f"(open_clip {summary['peer_versions']['open_clip']}, torch {summary['peer_versions']['torch']})")
  paired = summary["paired_ratios"]
  print(f"  ratio radjax / {args.peer} = {summary['ratio']:.2f}x (of medians); paired within each "
        f"repeat: median {summary['paired_ratio_median']:.2f}x, {min(paired):.2f}-{max(paired):.2f}x")
  if summary["host_cpu"]:
    print(f"  host CPU {format_cpu(summary['host_cpu'])}")
  if summary["radjax_cpu_matmuls"]:
    print(f"  radjax's matmuls: {summary['radjax_cpu_matmuls']}")
  print(f"  both ran with GLIBC_TUNABLES={summary['glibc_tunables'] or '(unset)'} and "
        f"LD_PRELOAD={summary['ld_preload'] or '(unset)'}")
  return 0
