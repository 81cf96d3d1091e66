"""``radjax bench step``: throughput, FLOPs, MFU and memory of one method's jitted train step.

The step is the training loop's own (``radjax.train.loop.make_train_step`` over the state of
``radjax.train.state.setup``, donated, on the mesh of ``config.mesh``); only the data is
synthetic: two batches of random images [B, H, W, C] and random token ids [B, L] that end in an
EOT token (the largest id, so open_clip-style argmax pooling finds it), placed on the devices
once and alternated.
"""

from __future__ import annotations

import itertools
import math
import re
import resource
import statistics
import time
from typing import Any

import numpy as np

from radjax.hostcpu import format_cpu, host_cpu, host_cpus

_COLLECTIVE_RE = re.compile(
    r"\b(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)(?:-start)?\(")


def prepare_config(config: Any, *, batch: int | None = None, dtype: str | None = None,
                   method: str | None = None) -> Any:
  """A copy of ``config`` with the benchmark's command-line choices applied (locked again)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if batch is not None:
      config.train.batch_size = int(batch)
    if dtype is not None:
      config.model.dtype = dtype
    if method is not None:
      config.method.name = method
  config.lock()
  return config


def _num_labels(config: Any) -> int:
  try:
    from radjax.methods import base  # pylint: disable=import-outside-toplevel
    return base.num_labels(config)
  except Exception:  # pylint: disable=broad-except
    return 14  # CheXpert's label count; only label-using methods read it


def random_batch(config: Any, batch_size: int, rng: np.random.Generator,
                 vocab_size: int) -> dict[str, np.ndarray]:
  """One host batch of the batch contract (radjax/contracts): random values, right shapes/dtypes.

  text_ids: [BOS=vocab-2, tokens in [1, vocab-3], EOT=vocab-1, 0 padding], lengths uniform in
  [min(5, L), L], so argmax(ids) is the EOT position and text_mask marks the real tokens.
  """
  d = config.data
  h = w = int(d.image_size)
  c = int(d.channels)
  length = int(d.max_text_len)
  k = _num_labels(config)
  image = rng.standard_normal((batch_size, h, w, c), dtype=np.float32)
  lengths = rng.integers(min(5, length), length + 1, size=batch_size)
  pos = np.arange(length)[None, :]
  mask = (pos < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, max(vocab_size - 2, 2), size=(batch_size, length), dtype=np.int32)
  ids[:, 0] = max(vocab_size - 2, 1)
  ids[np.arange(batch_size), lengths - 1] = vocab_size - 1
  ids = ids * mask
  labels = (rng.random((batch_size, k)) < 0.3).astype(np.float32)
  return {"image": image, "text_ids": ids, "text_mask": mask, "labels": labels,
          "label_mask": np.ones((batch_size, k), np.float32),
          "index": np.arange(batch_size, dtype=np.int32)}


def encoder_flops(config: Any, method: Any, vocab_size: int) -> dict[str, int]:
  """Analytic forward FLOPs per example (radjax.models.flops): image and text encoders plus the
  CLIP projection heads; the text side only for methods that use text."""
  from radjax.models import flops as F  # pylint: disable=import-outside-toplevel
  from radjax.models import image_encoder_config, text_encoder_config  # pylint: disable=import-outside-toplevel
  from radjax.models.resnet import resnet_variant  # pylint: disable=import-outside-toplevel
  from radjax.models.vit import ViTConfig  # pylint: disable=import-outside-toplevel

  d, m = config.data, config.model
  out = F.model_flops(m, image_size=int(d.image_size), channels=int(d.channels),
                      text_len=int(d.max_text_len), vocab_size=vocab_size, pooled_only=method.pooled_only)
  if not getattr(method, "uses_text", True):
    out["text"] = 0
  embed = int(m.get("embed_dim", 0) or 0)
  proj = 0
  if embed and method.dual_encoder:
    img = image_encoder_config(m, image_size=int(d.image_size), channels=int(d.channels))
    if isinstance(img, ViTConfig):
      img_dim = img.resolved().width
    else:  # ResNet: last stage width x 8, x 4 more for bottleneck blocks
      img_dim = img.width * 8 * (4 if resnet_variant(img.variant)[0] == "bottleneck" else 1)
    txt = text_encoder_config(m, vocab_size=vocab_size, max_len=int(d.max_text_len))
    txt_dim = getattr(txt, "width", None) or getattr(txt, "hidden_size")
    proj = 2 * embed * (img_dim + txt_dim)
  out["projection"] = proj
  return out


def _bytes_per_device(abstract: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying NamedShardings."""
  import jax  # pylint: disable=import-outside-toplevel
  total = 0
  for x in jax.tree.leaves(abstract):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return int(total)


def collective_counts(hlo_text: str) -> dict[str, int]:
  """How many of each collective op the (compiled, optimised) HLO text contains."""
  counts: dict[str, int] = {}
  for m in _COLLECTIVE_RE.finditer(hlo_text):
    counts[m.group(1)] = counts.get(m.group(1), 0) + 1
  return counts


_SHAPE_RE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")
_COLLECTIVE_LINE_RE = re.compile(
    r"=\s*(\(.*?\)|\S+)\s+(all-gather|reduce-scatter|all-reduce|all-to-all|collective-permute)"
    r"(?:-start)?\(")


def collective_shapes(hlo_text: str) -> list[tuple[str, list[tuple[int, ...]]]]:
  """[(op, [result array shapes])] for every collective of the HLO text (tuple results give
  several shapes: XLA combines small collectives into one)."""
  out = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE_LINE_RE.search(line)
    if not m:
      continue
    shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in _SHAPE_RE.findall(m.group(1))]
    out.append((m.group(2), shapes))
  return out


def _cost_flops(compiled: Any) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def _device_peak_bytes() -> int | None:
  import jax  # pylint: disable=import-outside-toplevel
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  value = stats.get("peak_bytes_in_use")
  return int(value) if value is not None else None


def _host_peak_rss() -> int:
  # Linux reports ru_maxrss in KiB (macOS in bytes).
  import sys  # pylint: disable=import-outside-toplevel
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == "darwin" else rss * 1024)


def run(config: Any, *, steps: int = 10, warmup: int = 2, repeats: int = 3,
        measure_peak: bool = True, keep_hlo: bool = False,
        profile_dir: str | None = None) -> dict[str, Any]:
  """Builds the method's state and jitted step on ``config.mesh`` and times it.

  Returns a JSON-serialisable dict (see ``format_result`` for what each figure means).
  ``keep_hlo`` adds the compiled step's optimised HLO text under "hlo" (tests).
  ``profile_dir``: a jax.profiler trace of the timed steps goes there, and the result gains
  "ops", the op table of :mod:`radjax.bench.profile`.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from radjax import methods  # pylint: disable=import-outside-toplevel
  from radjax.methods import base  # pylint: disable=import-outside-toplevel
  from radjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from radjax.train import loop, optim  # pylint: disable=import-outside-toplevel
  from radjax.train import state as state_lib  # pylint: disable=import-outside-toplevel
  from radjax.bench import peak as peak_lib  # pylint: disable=import-outside-toplevel
  from radjax.bench import profile as profile_lib  # pylint: disable=import-outside-toplevel
  from radjax import mkl_gemm  # pylint: disable=import-outside-toplevel
  from radjax.models import layers  # pylint: disable=import-outside-toplevel

  if steps < 1 or repeats < 1 or warmup < 0:
    raise ValueError(f"bench step: need steps >= 1, repeats >= 1, warmup >= 0; got steps={steps}, "
                     f"repeats={repeats}, warmup={warmup}")
  t_start = time.perf_counter()
  mesh = mesh_lib.make_mesh(config.mesh)
  global_batch = int(config.train.batch_size)
  n_proc = jax.process_count()
  split = mesh_lib.batch_split(mesh)
  if global_batch % (n_proc * split):
    raise ValueError(f"--batch {global_batch} must be divisible by the process count ({n_proc}) x "
                     f"mesh data x fsdp ({split})")
  local_batch = global_batch // n_proc
  method = methods.get_method(config.method.name)
  vocab = base.text_vocab_size(config) if method.uses_text else int(
      config.model.text.get("vocab_size", 0) or 2)
  accum = max(int(config.optim.get("grad_accum_steps", 1)), 1)
  ema_decay = float(config.optim.get("ema_decay", 0.0))

  tx, schedule = optim.make_optimizer(config.optim, max(int(config.train.steps), warmup + steps * repeats))
  graphdef, abstract_state, shardings, sharded_init = state_lib.setup(
      method, config, mesh, tx, ema=ema_decay > 0)
  state = sharded_init()
  jax.block_until_ready(state)
  t_init = time.perf_counter()

  rep = mesh_lib.replicated(mesh)
  step_fn = jax.jit(
      loop.make_train_step(method, graphdef, tx, schedule, mesh, accum_steps=accum,
                           ema_decay=ema_decay),
      in_shardings=(shardings, mesh_lib.batch_sharding(mesh)), out_shardings=(shardings, rep),
      donate_argnums=(0,))
  rng = np.random.default_rng(int(config.get("seed", 0)) + jax.process_index())

  # Two device-resident batches, alternated: the timed loop measures the step, not NumPy's
  # random generator (a 256 x 224 x 224 x 3 batch takes longer to draw than a GPU step);
  # `radjax bench data` measures the real loader.
  pool = [mesh_lib.shard_batch(random_batch(config, local_batch, rng, vocab), mesh)
          for _ in range(2)]
  batches = itertools.cycle(pool)

  def next_batch():
    return next(batches)

  batch = next_batch()
  compiled = step_fn.lower(state, batch).compile()
  t_compile = time.perf_counter()
  hlo = compiled.as_text() or ""
  xla_flops = _cost_flops(compiled)
  if xla_flops:  # XLA counts none for the custom calls
    xla_flops += mkl_gemm.hlo_flops(hlo)

  for _ in range(warmup):
    state, metrics = compiled(state, batch)
    batch = next_batch()
  jax.block_until_ready(state)
  t_warm = time.perf_counter()

  per_repeat = []
  if profile_dir:
    profile_lib.start(profile_dir)
  usage0 = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(repeats):
    data_s = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
      td = time.perf_counter()
      batch = next_batch()
      data_s += time.perf_counter() - td
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    wall = time.perf_counter() - t0
    per_repeat.append({"wall_s": wall, "data_s": data_s,
                       "examples_per_s": global_batch * steps / wall})
  usage = resource.getrusage(resource.RUSAGE_SELF)
  # Minor page faults in the timed steps: a step that keeps faulting in fresh pages spends its
  # time in the kernel (radjax/host_malloc.py).
  faults_per_step = (usage.ru_minflt - usage0.ru_minflt) / (repeats * steps)
  # Host cores the process kept busy: on CPU, fewer than it may use means ops waited on each
  # other (or the machine took the cores away); on GPU, the host's share of a step.
  cpu_s = (usage.ru_utime - usage0.ru_utime) + (usage.ru_stime - usage0.ru_stime)
  cores_busy = cpu_s / sum(r["wall_s"] for r in per_repeat)
  if profile_dir:
    profile_lib.stop()
  loss = float(jax.device_get(metrics["loss"]))
  if not math.isfinite(loss):
    raise FloatingPointError(f"bench step: non-finite loss {loss} (config.optim.lr too high?)")

  eps = [r["examples_per_s"] for r in per_repeat]
  med = statistics.median(eps)
  mid = sorted(per_repeat, key=lambda r: r["examples_per_s"])[len(per_repeat) // 2]
  step_s = mid["wall_s"] / steps
  data_wait = mid["data_s"] / steps
  dtype = str(config.model.dtype)
  fwd = encoder_flops(config, method, vocab)
  fwd_total = sum(fwd.values())
  train_flops = 3 * fwd_total
  achieved = train_flops * med
  peak = peak_lib.device_peak("bfloat16" if dtype == "bfloat16" else "float32",
                              measure=measure_peak)
  n_dev = jax.device_count()
  peak_total = peak["peak_flops_per_s"] * n_dev
  opt_abs = {k: v for k, v in abstract_state.items() if k != "params"}
  result: dict[str, Any] = {
      "method": method.name,
      "dtype": dtype,
      "batch": global_batch,
      "steps": steps, "warmup": warmup, "repeats": repeats,
      "platform": jax.devices()[0].platform,
      "device_kind": jax.devices()[0].device_kind,
      "num_devices": n_dev,
      "num_processes": n_proc,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "examples_per_s": med,
      "examples_per_s_all": eps,
      "step_time_s": step_s,
      "data_wait_s": data_wait,
      "compute_s": max(step_s - data_wait, 0.0),
      "flops_per_example_forward": fwd,
      "flops_per_example": train_flops,
      "xla_flops_per_example": (xla_flops * n_dev / global_batch) if xla_flops else None,
      "achieved_flops_per_s": achieved,
      "peak_flops_per_s": peak_total,
      "peak_flops_per_s_per_device": peak["peak_flops_per_s"],
      "peak_source": peak["peak_source"],
      "measured_matmul_flops_per_s": peak["measured_flops_per_s"],
      "datasheet_flops_per_s": peak["datasheet_flops_per_s"],
      "mfu": achieved / peak_total,
      "mfu_vs_measured_matmul": (achieved / (peak["measured_flops_per_s"] * n_dev)
                                 if peak["measured_flops_per_s"] else None),
      "num_params": state_lib.count_params(abstract_state["params"]),
      "param_bytes_per_device": _bytes_per_device(abstract_state["params"]),
      "state_bytes_per_device": _bytes_per_device(abstract_state),
      "opt_bytes_per_device": _bytes_per_device(opt_abs),
      "host_peak_rss_bytes": _host_peak_rss(),
      "host_minor_faults_per_step": faults_per_step,
      "host_cores_busy": cores_busy,
      "host_cores": host_cpus(),
      "host_cpu": host_cpu(),
      "cpu_matmuls": layers.cpu_matmul_path() if jax.devices()[0].platform == "cpu" else None,
      "device_peak_bytes": _device_peak_bytes(),
      "collectives": collective_counts(hlo),
      "init_s": t_init - t_start,
      "compile_s": t_compile - t_init,
      # Where compiled programs are kept: with one, "compile" may be a load of an earlier run's.
      "compilation_cache": jax.config.jax_compilation_cache_dir,
      "warmup_s": t_warm - t_compile,
      "final_loss": loss,
  }
  if profile_dir:
    result["profile_dir"] = profile_dir
    result["ops"] = profile_lib.op_table(profile_lib.load_events(profile_dir), hlo, steps * repeats)
  if keep_hlo:
    result["hlo"] = hlo
    result["param_shapes"] = sorted({tuple(x.shape) for x in jax.tree.leaves(abstract_state["params"])})
  return result


def _si(x: float | None, unit: str = "") -> str:
  if x is None:
    return "n/a"
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.2f} {prefix}{unit}"
  return f"{x:.2f} {unit}"


def _gib(x: int | None) -> str:
  return "n/a" if x is None else f"{x / 2 ** 30:.2f} GiB"


def format_result(r: dict[str, Any]) -> str:
  fwd = r["flops_per_example_forward"]
  parts = " + ".join(f"{k} {_si(v, 'FLOP')}" for k, v in fwd.items() if v)
  xla = (f"; XLA cost analysis of the whole step: {_si(r['xla_flops_per_example'], 'FLOP')}/example"
         + (" (MKL's GEMMs counted from their shapes)" if r.get("cpu_matmuls") == "MKL" else "")
         if r.get("xla_flops_per_example") else "")
  eps = ", ".join(f"{e:.2f}" for e in r["examples_per_s_all"])
  lines = [
      f"radjax bench step: method={r['method']} dtype={r['dtype']} batch={r['batch']} on "
      f"{r['num_devices']} {r['platform']} device(s) ({r['device_kind']}), mesh {r['mesh']}",
      f"  examples/s      {r['examples_per_s']:.2f}   (median of {r['repeats']} repeats x "
      f"{r['steps']} steps after {r['warmup']} warm-up: {eps})",
      f"  step time       {1e3 * r['step_time_s']:.1f} ms = data wait {1e3 * r['data_wait_s']:.1f} ms"
      f" + compute {1e3 * r['compute_s']:.1f} ms",
      f"  model FLOPs     {_si(r['flops_per_example'], 'FLOP')}/example (train = 3 x forward: {parts}){xla}",
      f"  achieved        {_si(r['achieved_flops_per_s'], 'FLOP/s')}",
      f"  MFU             {100 * r['mfu']:.1f}% of {_si(r['peak_flops_per_s'], 'FLOP/s')} "
      f"({r['peak_source']})",
  ]
  if r.get("datasheet_flops_per_s") and r.get("mfu_vs_measured_matmul"):
    lines.append(f"                  {100 * r['mfu_vs_measured_matmul']:.1f}% of the measured matmul "
                 f"peak {_si(r['measured_matmul_flops_per_s'], 'FLOP/s')}")
  lines += [
      f"  memory          host peak RSS {_gib(r['host_peak_rss_bytes'])}; device peak "
      f"{_gib(r['device_peak_bytes'])}; host minor page faults {r['host_minor_faults_per_step']:,.0f}/step"
      + ("; freed blocks of 64 MiB or more kept for reuse (radjax/native/big_blocks.c)"
         if r.get("big_blocks_kept") else ""),
      f"  host CPU        {format_cpu(r['host_cpu'])}: {r['host_cores_busy']:.2f} of "
      f"{r['host_cores']} cores busy in the timed steps"
      + (f"; matmuls {r['cpu_matmuls']}" if r.get("cpu_matmuls") else ""),
      f"  state           {r['num_params'] / 1e6:.2f} M params; per device: params "
      f"{_gib(r['param_bytes_per_device'])}, optimizer+rest {_gib(r['opt_bytes_per_device'])}",
      f"  time            init {r['init_s']:.1f} s, compile {r['compile_s']:.1f} s, "
      f"warm-up {r['warmup_s']:.1f} s ("
      + (f"compiled programs kept in {r['compilation_cache']}: one an earlier run compiled loads instead"
         if r.get("compilation_cache") else "no compilation cache") + ")",
  ]
  if r.get("collectives"):
    lines.append("  collectives     " + ", ".join(f"{k} x{v}" for k, v in sorted(r["collectives"].items())))
  if r.get("ops"):
    from radjax.bench import profile as profile_lib  # pylint: disable=import-outside-toplevel
    lines.append(profile_lib.format_op_table(r["ops"]))
    lines.append(f"  trace           {r['profile_dir']} (Perfetto / TensorBoard / xprof)")
  return "\n".join(lines)
