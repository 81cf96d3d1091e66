"""Where a compiled step's time goes: XLA ops from a jax.profiler trace, named by the HLO.

``radjax bench step --profile DIR`` records the timed steps with :func:`start` / :func:`stop`
and prints :func:`op_table`: per kind of op (fusion kind, the JAX primitive it came from, forward
or backward pass, output shape), the time per step, how many ran, and the share of that time
another op ran beside it on another thread (XLA:CPU runs independent ops side by side; two
matmuls then split the cores).

The trace is also left in DIR for Perfetto / TensorBoard / xprof.
"""

from __future__ import annotations

import bisect
import collections
import glob
import gzip
import json
import os
import re
from typing import Any

# An HLO instruction line: "%name = shape op(...), ..., metadata={op_name="jit(f)/.../prim" ...}".
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([^\n]*)$", re.M)
_OP_NAME = re.compile(r"op_name=\"([^\"]*)\"")


def start(directory: str) -> None:
  """Starts a trace with a host event for every XLA:CPU op (host tracer level 3). The Python
  tracer stays off: its frames would fill the trace's event buffer before the ops do."""
  import jax  # pylint: disable=import-outside-toplevel
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level, options.host_tracer_level = 0, 3
  jax.profiler.start_trace(directory, create_perfetto_trace=True, profiler_options=options)


def stop() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  jax.profiler.stop_trace()


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """HLO instruction name -> (output shape, JAX primitive, "fwd" | "bwd") from compiled HLO text."""
  out = {}
  for name, shape, rest in _INSTRUCTION.findall(hlo_text):
    m = _OP_NAME.search(rest)
    if m is None:  # no JAX origin (copies XLA inserted, parameters, ...)
      out[name] = (shape, "?", "?")
      continue
    # Autodiff's transposed computation carries "transpose(jvp(...))" in its op_name.
    out[name] = (shape, m.group(1).rsplit("/", 1)[-1], "bwd" if "transpose(" in m.group(1) else "fwd")
  return out


def load_events(directory: str) -> list[dict[str, Any]]:
  """The complete ("X") events of the newest Perfetto trace under ``directory``."""
  paths = glob.glob(os.path.join(directory, "**", "*perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no Perfetto trace (*perfetto_trace.json.gz) under {directory}")
  with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  return [e for e in events if e.get("ph") == "X" and "dur" in e]


def _overlaps(ops: list[dict[str, Any]]) -> list[float]:
  """For each op, microseconds during which an op on another thread ran too."""
  by_thread: dict[Any, list[tuple[float, float]]] = collections.defaultdict(list)
  for e in ops:
    by_thread[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
  for spans in by_thread.values():
    spans.sort()
  starts = {t: [a for a, _ in spans] for t, spans in by_thread.items()}
  out = []
  for e in ops:
    a, b = e["ts"], e["ts"] + e["dur"]
    total = 0.0
    for t, spans in by_thread.items():
      if t == e["tid"]:
        continue
      # Spans on one thread do not overlap each other: walk from the last one starting before a.
      i = max(bisect.bisect_right(starts[t], a) - 1, 0)
      while i < len(spans) and spans[i][0] < b:
        total += max(0.0, min(b, spans[i][1]) - max(a, spans[i][0]))
        i += 1
    out.append(total)
  return out


def op_table(events: list[dict[str, Any]], hlo_text: str, steps: int) -> list[dict[str, Any]]:
  """Op time per step grouped by (fusion kind, primitive, pass, shape), longest first.

  ``events``: trace events (:func:`load_events`); ``steps``: how many steps the trace covers.
  Each row: kind, primitive, pass, shape, ms_per_step, count_per_step, share (of all op time)
  and overlap (the fraction of the row's time another op ran beside it).
  """
  names = hlo_ops(hlo_text)
  # Op events name their HLO instruction; the runtime's own spans (executor, dispatch) do not.
  ops = [dict(e, op=e["args"]["hlo_op"]) for e in events if (e.get("args") or {}).get("hlo_op")]
  rows: dict[tuple[str, ...], list[float]] = collections.defaultdict(lambda: [0.0, 0, 0.0])
  for e, overlap in zip(ops, _overlaps(ops)):
    shape, primitive, direction = names.get(e["op"], ("?", "?", "?"))
    kind = re.sub(r"[.\d]+$", "", e["op"])
    row = rows[(kind, primitive, direction, shape)]
    row[0] += e["dur"]
    row[1] += 1
    row[2] += overlap
  total = sum(r[0] for r in rows.values()) or 1.0
  table = [{"kind": k[0], "primitive": k[1], "pass": k[2], "shape": k[3],
            "ms_per_step": r[0] / 1e3 / steps, "count_per_step": r[1] / steps,
            "share": r[0] / total, "overlap": r[2] / r[0] if r[0] else 0.0}
           for k, r in rows.items()]
  return sorted(table, key=lambda r: -r["ms_per_step"])


def format_op_table(rows: list[dict[str, Any]], top: int = 15) -> str:
  total = sum(r["ms_per_step"] for r in rows)
  lines = [f"  ops             {total:.1f} ms of op time per step (threads summed); the longest:",
           f"  {'ms/step':>9} {'share':>6} {'overlap':>8} {'n':>5}  op"]
  for r in rows[:top]:
    lines.append(f"  {r['ms_per_step']:9.1f} {100 * r['share']:5.1f}% {100 * r['overlap']:7.0f}% "
                 f"{r['count_per_step']:5.0f}  {r['kind']} {r['primitive']} {r['pass']} {r['shape']}")
  return "\n".join(lines)
