"""A picture of a dataset: a grid of films with their IMPRESSION and labels.

This is the one place where report text is deliberately shown (a user asked to see
what the data looks like); nothing else in radjax prints or logs reports.
"""

from __future__ import annotations

import math
import re
import textwrap
from typing import Any

import numpy as np


def impression(report: str) -> str:
  """The IMPRESSION section of a report (else its last 200 characters)."""
  m = re.search(r"IMPRESSION:\s*(.*?)(?:\n[A-Z ]+:|\Z)", report, flags=re.S)
  return (m.group(1) if m else report[-200:]).strip()


def show(data_cfg: Any, out_path: str, n: int = 16, split: str = "train", seed: int = 0) -> str:
  """Renders ``n`` random examples of ``split`` (chosen with ``seed``) to a PNG at ``out_path``."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from radjax.data import sources  # pylint: disable=import-outside-toplevel

  src = sources.get_source(data_cfg, split)
  if len(src) == 0:
    raise ValueError(f"split {split!r} is empty")
  n = min(int(n), len(src))
  idx = np.sort(np.random.default_rng(seed).choice(len(src), size=n, replace=False))
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.75 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for ax, i in zip(axes.ravel(), idx):
    ex = src[int(i)]
    ax.imshow(np.asarray(ex["image"]).squeeze(), cmap="gray", vmin=0, vmax=255)
    pos = [k for k, v in ex["labels"].items() if v == 1]
    unc = [k for k, v in ex["labels"].items() if v == -1]
    title = ", ".join(pos) if pos else "no positive label"
    if unc:
      title += " | uncertain: " + ", ".join(unc)
    ax.set_title("\n".join(textwrap.wrap(f"[{ex['id']}] {title}", 44)), fontsize=6.5)
    text = "\n".join(textwrap.wrap("IMPRESSION: " + impression(ex["report"]), 52)[:5])
    ax.text(0.0, -0.02, text, transform=ax.transAxes, va="top", ha="left", fontsize=6, family="monospace")
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  return out_path
