"""open_clip / OpenAI CLIP ``ModifiedResNet`` weights -> radjax ``ResNet(style="clip")``.

``weights`` maps open_clip's state-dict names (``conv1.weight``, ``layer1.0.bn2.running_var``,
``attnpool.q_proj.bias``, ...; with ``prefix="visual."`` those of a whole CLIP model) to NumPy
arrays: from ``{k: v.numpy() for k, v in model.state_dict().items()}``, a ``.npz`` or a
safetensors file. Nothing here imports torch.

The attention pool's output projection ``attnpool.c_proj`` is not part of the radjax encoder (its
"pooled" output is the attention output before it, see radjax/models/resnet.py); it is returned
as (kernel [D, E], bias [E]) for the head that takes its place.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from flax import nnx

from radjax.models.resnet import ResNet, stage_specs


def load_open_clip_resnet(net: ResNet, weights: Mapping[str, np.ndarray], *,
                          prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
  """Copies open_clip ModifiedResNet ``weights`` into ``net`` (in place); -> (c_proj kernel
  [D, E], c_proj bias [E]). ``net`` must be ``style="clip"`` with ``norm="batch"``; a missing,
  unused or differently shaped weight raises an error naming it."""
  if net.config.style != "clip" or net.config.norm != "batch":
    raise ValueError("open_clip ModifiedResNet weights need ResNet(style='clip', norm='batch')")
  used = set()

  def get(name: str) -> np.ndarray:
    key = prefix + name
    if key not in weights:
      raise KeyError(f"open_clip weights: {key!r} is missing")
    used.add(key)
    return np.asarray(weights[key], np.float32)

  def put(var: nnx.Variable, value: np.ndarray, name: str) -> None:
    if tuple(var.shape) != value.shape:
      raise ValueError(f"open_clip weights: {prefix + name} has shape {value.shape}, the radjax "
                       f"model expects {tuple(var.shape)}")
    var[...] = value

  def conv(module: nnx.Conv, name: str) -> None:
    # torch [O, I, kh, kw] -> flax [kh, kw, I, O]
    put(module.kernel, np.transpose(get(name + ".weight"), (2, 3, 1, 0)), name + ".weight")

  def norm(module: nnx.BatchNorm, name: str) -> None:
    for var, theirs in ((module.scale, "weight"), (module.bias, "bias"),
                        (module.mean, "running_mean"), (module.var, "running_var")):
      put(var, get(f"{name}.{theirs}"), f"{name}.{theirs}")

  def linear(module: nnx.Linear, name: str) -> None:
    put(module.kernel, get(name + ".weight").T, name + ".weight")
    put(module.bias, get(name + ".bias"), name + ".bias")

  for i, (c, n) in enumerate(zip(net.stem, net.stem_norm), start=1):
    conv(c, f"conv{i}")
    norm(n, f"bn{i}")
  index_in_stage: dict[int, int] = {}
  for block, (_, _, width, _) in zip(net.blocks, stage_specs(net.config)):
    stage = (width // net.config.width).bit_length()  # widths w, 2w, 4w, 8w -> layer1..4
    j = index_in_stage[stage] = index_in_stage.get(stage, -1) + 1
    name = f"layer{stage}.{j}"
    for k, (c, n) in enumerate(zip(block.convs, block.norms), start=1):
      conv(c, f"{name}.conv{k}")
      norm(n, f"{name}.bn{k}")
    if block.proj is not None:
      conv(block.proj, f"{name}.downsample.0")
      norm(block.proj_norm, f"{name}.downsample.1")
  pool = net.attn_pool
  put(pool.pos_embed, get("attnpool.positional_embedding"), "attnpool.positional_embedding")
  for ours, theirs in ((pool.query, "q_proj"), (pool.key, "k_proj"), (pool.value, "v_proj")):
    linear(ours, f"attnpool.{theirs}")
  c_proj = get("attnpool.c_proj.weight").T, get("attnpool.c_proj.bias")
  unused = sorted(k for k in weights if k.startswith(prefix) and k not in used
                  and not k.endswith("num_batches_tracked"))
  if unused:
    raise ValueError(f"open_clip weights not used (does the architecture match?): {unused[:5]}")
  return c_proj
