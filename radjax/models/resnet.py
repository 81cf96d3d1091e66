"""ResNet-18/34/50/101 (torchvision v1.5 layout) image encoder.

Normalisation is GroupNorm(32) by default, BatchNorm on request (``norm="batch"``).
Why GroupNorm by default: it is stateless, so losses stay pure functions of the
parameters (the method contract), every example is normalised independently (BatchNorm
leaks batch statistics into contrastive losses -- the reason MoCo needed "shuffle BN"),
and results do not depend on the per-device batch, the mesh or gradient accumulation.
With ``norm="batch"`` statistics are computed over the global (sharded) batch inside
jit; ``model.train()`` / ``model.eval()`` switch ``use_running_average``, and the
training step must carry the ``nnx.BatchStat`` state it updates.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
from flax import nnx

from radjax.models.layers import Conv, as_dtype, ones, partitioned, zeros
from radjax.parallel.rules import constrain_batch

# variant -> (block type, blocks per stage)
RESNET_VARIANTS = {
    "18": ("basic", (2, 2, 2, 2)),
    "34": ("basic", (3, 4, 6, 3)),
    "50": ("bottleneck", (3, 4, 6, 3)),
    "101": ("bottleneck", (3, 4, 23, 3)),
}


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  variant: str = "50"
  image_size: int = 224
  channels: int = 3
  norm: str = "group"        # "group" (GroupNorm, 32 groups) or "batch"
  width: int = 64            # channels of the stem / first stage
  zero_init_residual: bool = True
  dtype: Any = "float32"

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any], **overrides) -> "ResNetConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in dict(cfg).items() if k in names}
    kw.update(overrides)
    return cls(**kw)


def resnet_variant(variant: str) -> tuple[str, tuple[int, ...]]:
  v = str(variant).lower().removeprefix("resnet").removeprefix("r")
  if v not in RESNET_VARIANTS:
    raise ValueError(f"unknown ResNet variant {variant!r}; known: {sorted(RESNET_VARIANTS)}")
  return RESNET_VARIANTS[v]


def conv(cin: int, cout: int, k: int, stride: int = 1, *, rngs: nnx.Rngs, dtype=None) -> nnx.Conv:
  # Explicit k//2 padding matches torchvision (XLA "SAME" pads stride-2 convs asymmetrically).
  init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
  return Conv(cin, cout, (k, k), strides=stride, padding=[(k // 2, k // 2)] * 2,
                  use_bias=False, dtype=dtype, rngs=rngs,
                  kernel_init=partitioned(init, None, None, "conv_in", "conv_out"))


def norm_layer(kind: str, c: int, *, rngs: nnx.Rngs, dtype=None, zero: bool = False):
  scale_init = partitioned(zeros if zero else ones, "conv_out")
  bias_init = partitioned(zeros, "conv_out")
  if kind == "batch":
    return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs,
                         scale_init=scale_init, bias_init=bias_init)
  if kind == "group":
    return nnx.GroupNorm(c, num_groups=min(32, c), epsilon=1e-5, dtype=dtype, rngs=rngs,
                         scale_init=scale_init, bias_init=bias_init)
  raise ValueError(f"ResNet norm must be 'group' or 'batch', got {kind!r}")


class ResidualBlock(nnx.Module):
  """Basic (3x3, 3x3) or bottleneck (1x1, 3x3 strided, 1x1 x4) residual block."""

  def __init__(self, kind: str, cin: int, width: int, stride: int, *, norm: str, zero_init: bool,
               rngs: nnx.Rngs, dtype=None):
    expansion = 4 if kind == "bottleneck" else 1
    cout = width * expansion
    if kind == "bottleneck":
      specs = [(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)]
    else:
      specs = [(cin, width, 3, stride), (width, cout, 3, 1)]
    self.convs = nnx.List([conv(i, o, k, s, rngs=rngs, dtype=dtype) for i, o, k, s in specs])
    self.norms = nnx.List([
        norm_layer(norm, o, rngs=rngs, dtype=dtype, zero=zero_init and j == len(specs) - 1)
        for j, (_, o, _, _) in enumerate(specs)])
    if stride != 1 or cin != cout:
      self.proj = conv(cin, cout, 1, stride, rngs=rngs, dtype=dtype)
      self.proj_norm = norm_layer(norm, cout, rngs=rngs, dtype=dtype)
    else:
      self.proj = self.proj_norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    # Every conv output is pinned to the batch axes on a mesh: with FSDP-sharded kernels XLA
    # otherwise computes small-spatial convs channel-split on an all-gathered batch.
    y = x
    for j, (c, n) in enumerate(zip(self.convs, self.norms)):
      y = n(constrain_batch(c(y)))
      if j < len(self.convs) - 1:
        y = jax.nn.relu(y)
    shortcut = x if self.proj is None else self.proj_norm(constrain_batch(self.proj(x)))
    return jax.nn.relu(y + shortcut)


def stage_specs(config: ResNetConfig) -> list[tuple[str, int, int, int]]:
  """[(kind, cin, width, stride)] for every residual block (shared with the FLOP counter)."""
  kind, counts = resnet_variant(config.variant)
  expansion = 4 if kind == "bottleneck" else 1
  specs, cin = [], config.width
  for i, n in enumerate(counts):
    width = config.width * 2 ** i
    for j in range(n):
      specs.append((kind, cin, width, 2 if (i > 0 and j == 0) else 1))
      cin = width * expansion
  return specs


class ResNet(nnx.Module):
  """ResNet image encoder.

  ``__call__(images [B, H, W, C])`` -> {"tokens": [B, h*w, C_out], "pooled": [B, C_out]}: the
  flattened final feature map (h = ceil(H/32)) and its global average. C_out = 512 (18/34) or
  2048 (50/101). ``keep_ids`` is not supported (patch dropping is a ViT feature).
  """

  def __init__(self, config: ResNetConfig | Mapping[str, Any], *, rngs: nnx.Rngs):
    if not isinstance(config, ResNetConfig):
      config = ResNetConfig.from_mapping(config)
    c = config
    dtype = as_dtype(c.dtype)
    self.config = c
    specs = stage_specs(c)
    self.stem = conv(c.channels, c.width, 7, 2, rngs=rngs, dtype=dtype)
    self.stem_norm = norm_layer(c.norm, c.width, rngs=rngs, dtype=dtype)
    self.blocks = nnx.List([
        ResidualBlock(kind, cin, width, stride, norm=c.norm, zero_init=c.zero_init_residual,
                      rngs=rngs, dtype=dtype) for kind, cin, width, stride in specs])
    kind, _ = resnet_variant(c.variant)
    self.embed_dim = specs[-1][2] * (4 if kind == "bottleneck" else 1)
    self.patch_size = 32  # total stride: one token per 32x32 pixels
    self.grid_size = -(-c.image_size // 32)
    self.num_patches = self.grid_size ** 2
    self.num_prefix_tokens = 0

  def __call__(self, images: jax.Array, keep_ids: jax.Array | None = None) -> dict[str, jax.Array]:
    if keep_ids is not None:
      raise ValueError("ResNet does not support keep_ids (patch dropping needs a ViT)")
    x = jax.nn.relu(self.stem_norm(constrain_batch(self.stem(images))))
    x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(constrain_batch(x))
    b, h, w, ch = x.shape
    tokens = x.reshape(b, h * w, ch)
    return {"tokens": tokens, "pooled": tokens.mean(axis=1)}
