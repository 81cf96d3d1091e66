"""Metric sinks: JSON lines (workdir/metrics.jsonl) and TensorBoard (workdir/tb, tensorboardX).

Only scalar metrics computed on device reach these files; batches are never logged.
Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping


class MetricWriter:

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(logdir=os.path.join(workdir, "tb"))
      except ImportError:  # TensorBoard logging is optional
        self._tb = None

  def truncate_after(self, step: int) -> None:
    """Drops records with step > ``step`` (written after the checkpoint a run resumes from)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          if int(json.loads(line).get("step", 0)) <= step:
            kept.append(line)
        except (ValueError, AttributeError):
          continue  # a line cut short by a kill
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    for k, v in metrics.items():
      v = float(v)
      record[k] = v if math.isfinite(v) else str(v)
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
