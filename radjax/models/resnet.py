"""ResNet-18/34/50/101 image encoder: torchvision's v1.5 layout, or CLIP's ModifiedResNet.

``style="clip"`` is open_clip's / OpenAI CLIP's ModifiedResNet (open_clip ``RN50`` etc.): a
3-convolution stem ending in a 2x2 average pool, anti-aliased downsampling (a 2x2 average pool
before the stride-1 1x1 convolution, in the residual and the shortcut branch), and attention
pooling (the mean token attends over itself and the final feature map, with a learned position
embedding). Its "pooled" output is the attention output before open_clip's ``c_proj``: that output
projection is the linear head that follows (CLIP's image projection, a classifier), as a second
linear map after it would add nothing.

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
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from radjax.models.layers import (BatchNorm, Conv, add_relu, as_dtype, linear, normal, ones, param,
                                  partitioned, variance_scaling, zeros)
from radjax.models.transformer import dot_product_attention
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
  blocks: tuple[int, ...] = ()  # blocks per stage, if not the variant's (open_clip RN50x4: 4,6,10,6)
  zero_init_residual: bool = True
  style: str = "torchvision"  # or "clip" (ModifiedResNet: see the module docstring)
  attn_heads: int = 0        # style "clip": attention-pool heads (0: feature width / 64, as CLIP)
  dtype: Any = "float32"

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any], **overrides) -> "ResNetConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in dict(cfg).items() if k in names}
    kw.update(overrides)
    if not kw.get("width", 64):  # the shared image config's 0: not set, as for the ViT's sizes
      del kw["width"]
    return cls(**kw)


STYLES = ("torchvision", "clip")


def resnet_variant(variant: str) -> tuple[str, tuple[int, ...]]:
  v = str(variant).lower().removeprefix("resnet").removeprefix("r")
  if v not in RESNET_VARIANTS:
    raise ValueError(f"unknown ResNet variant {variant!r}; known: {sorted(RESNET_VARIANTS)}")
  return RESNET_VARIANTS[v]


def conv(cin: int, cout: int, k: int, stride: int = 1, *, rngs: nnx.Rngs, dtype=None) -> Conv:
  # Explicit k//2 padding matches torchvision (XLA "SAME" pads stride-2 convs asymmetrically).
  init = variance_scaling(2.0, "fan_out", "normal")
  return Conv(cin, cout, (k, k), strides=stride, padding=[(k // 2, k // 2)] * 2,
              use_bias=False, dtype=dtype, rngs=rngs,
              kernel_init=partitioned(init, None, None, "conv_in", "conv_out"))


def norm_layer(kind: str, c: int, *, rngs: nnx.Rngs, dtype=None, zero: bool = False):
  scale_init = partitioned(zeros if zero else ones, "conv_out")
  bias_init = partitioned(zeros, "conv_out")
  if kind == "batch":
    return BatchNorm(c, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs,
                     scale_init=scale_init, bias_init=bias_init)
  if kind == "group":
    return nnx.GroupNorm(c, num_groups=min(32, c), epsilon=1e-5, dtype=dtype, rngs=rngs,
                         scale_init=scale_init, bias_init=bias_init)
  raise ValueError(f"ResNet norm must be 'group' or 'batch', got {kind!r}")


def normalise(norm: nnx.Module, x: jax.Array, residual: jax.Array | None = None,
              relu: bool = True) -> jax.Array:
  """norm(x) (+ residual), then ReLU if ``relu``: BatchNorm takes both into its own call (one
  native pass on CPU with MKL's handler library)."""
  if isinstance(norm, BatchNorm):
    return norm(x, residual=residual, relu=relu)
  return add_relu(norm(x), residual, relu)


def avg_pool(x: jax.Array, k: int) -> jax.Array:
  """[B, H, W, C] -> [B, H//k, W//k, C]: k x k average pooling with stride k (torch's
  AvgPool2d(k), which drops a remainder)."""
  b, h, w, c = x.shape
  return _window_mean(x[:, :h // k * k, :w // k * k], k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _window_mean(x: jax.Array, k: int) -> jax.Array:
  """x [B, H, W, C], H and W multiples of k -> the mean of each k x k window, summed in float32
  over k * k strided slices: one element-wise pass (XLA:CPU reduced the reshaped windows 10x
  slower: 15 ms against 1.6 for RN50's [16, 56, 56, 256] in bf16). Its backward spreads each
  cotangent over its window by a broadcast, where autodiff's would pad and add k * k slices."""
  total = sum(x[:, i::k, j::k].astype(jnp.float32) for i in range(k) for j in range(k))
  return (total / (k * k)).astype(x.dtype)


def _window_mean_fwd(x, k):
  return _window_mean(x, k), None


def _window_mean_bwd(k, _, g):
  b, h, w, c = g.shape
  g = (g.astype(jnp.float32) / (k * k)).astype(g.dtype)
  return (jnp.broadcast_to(g[:, :, None, :, None], (b, h, k, w, k, c)).reshape(b, h * k, w * k, c),)


_window_mean.defvjp(_window_mean_fwd, _window_mean_bwd)


class ResidualBlock(nnx.Module):
  """Basic (3x3, 3x3) or bottleneck (1x1, 3x3 strided, 1x1 x4) residual block. With
  ``antialias`` (CLIP's ModifiedResNet, bottleneck only) every convolution has stride 1 and a
  ``stride`` x ``stride`` average pool downsamples: after the 3x3 convolution, and before the
  shortcut's 1x1 convolution."""

  def __init__(self, kind: str, cin: int, width: int, stride: int, *, norm: str, zero_init: bool,
               rngs: nnx.Rngs, dtype=None, antialias: bool = False):
    expansion = 4 if kind == "bottleneck" else 1
    cout = width * expansion
    if antialias and kind != "bottleneck":
      raise ValueError("anti-aliased downsampling (style 'clip') needs bottleneck blocks (ResNet-50/101)")
    self.pool = stride if antialias else 1
    conv_stride = 1 if antialias else stride
    if kind == "bottleneck":
      specs = [(cin, width, 1, 1), (width, width, 3, conv_stride), (width, cout, 1, 1)]
    else:
      specs = [(cin, width, 3, stride), (width, cout, 3, 1)]
    self.convs = nnx.List([conv(i, o, k, s, rngs=rngs, dtype=dtype) for i, o, k, s in specs])
    self.norms = nnx.List([
        norm_layer(norm, o, rngs=rngs, dtype=dtype, zero=zero_init and j == len(specs) - 1)
        for j, (_, o, _, _) in enumerate(specs)])
    if stride != 1 or cin != cout:
      self.proj = conv(cin, cout, 1, conv_stride, rngs=rngs, dtype=dtype)
      self.proj_norm = norm_layer(norm, cout, rngs=rngs, dtype=dtype)
    else:
      self.proj = self.proj_norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    # Every conv output is pinned to the batch axes on a mesh: with FSDP-sharded kernels XLA
    # otherwise computes small-spatial convs channel-split on an all-gathered batch.
    shortcut = x
    if self.proj is not None:
      shortcut = avg_pool(x, self.pool) if self.pool > 1 else x
      shortcut = normalise(self.proj_norm, constrain_batch(self.proj(shortcut)), relu=False)
    y = x
    last = len(self.convs) - 1
    for j, (c, n) in enumerate(zip(self.convs, self.norms)):
      if j == last and self.pool > 1:
        y = avg_pool(y, self.pool)
      y = normalise(n, constrain_batch(c(y)), residual=shortcut if j == last else None)
    return y


class AttentionPool(nnx.Module):
  """CLIP's attention pooling: [B, h, w, D] -> [B, D], the output of multi-head attention whose
  one query is the mean feature, over the mean and every position, with a learned position
  embedding [1 + h*w, D]. No output projection (see the module docstring)."""

  def __init__(self, grid: int, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=None):
    if dim % num_heads:
      raise ValueError(f"attention-pool width {dim} is not divisible by attn_heads {num_heads}")
    self.num_heads = num_heads
    self.pos_embed = param(rngs, normal(dim ** -0.5), (grid * grid + 1, dim),
                           ("pos", "embed"))
    init = normal(dim ** -0.5)
    self.query, self.key, self.value = (
        linear(dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype, kernel_init=init)
        for _ in range(3))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    x = jnp.concatenate([x.mean(1, keepdims=True, dtype=jnp.float32).astype(x.dtype), x], axis=1)
    # Pinned: the sum would otherwise take the FSDP-sharded position embedding's layout.
    x = constrain_batch(x + self.pos_embed[...].astype(x.dtype))
    names = (None, "heads", None)

    def heads(t):  # [B, T, D] -> [B, T, N, D/N], pinned like the transformer's q/k/v
      return constrain_batch(t.reshape(t.shape[:2] + (self.num_heads, d // self.num_heads)), names)

    # Only the mean token's output is kept, so only its query is computed.
    q = heads(self.query(constrain_batch(x[:, :1])))
    out = dot_product_attention(q, heads(self.key(x)), heads(self.value(x)))
    return constrain_batch(out, names).reshape(b, d)


def stage_specs(config: ResNetConfig) -> list[tuple[str, int, int, int]]:
  """[(kind, cin, width, stride)] for every residual block (shared with the FLOP counter)."""
  kind, counts = resnet_variant(config.variant)
  counts = tuple(config.blocks) or counts
  expansion = 4 if kind == "bottleneck" else 1
  specs, cin = [], config.width
  for i, n in enumerate(counts):
    width = config.width * 2 ** i
    for j in range(n):
      specs.append((kind, cin, width, 2 if (i > 0 and j == 0) else 1))
      cin = width * expansion
  return specs


def clip_grid(image_size: int) -> int:
  """Side of the final feature map of style "clip": the stride-2 stem conv rounds up, the
  average pools (stem and three stages) round down."""
  return -(-image_size // 2) // 16


class ResNet(nnx.Module):
  """ResNet image encoder.

  ``__call__(images [B, H, W, C])`` -> {"tokens": [B, h*w, C_out], "pooled": [B, C_out]}: the
  flattened final feature map (h = ceil(H/32); style "clip": :func:`clip_grid`) and its global
  average (style "clip": its attention pool). C_out = 512 (18/34) or 2048 (50/101). ``keep_ids``
  is not supported (patch dropping is a ViT feature). ``pooled_only=True`` -> {"pooled"} alone
  (the same computation: the attention pool already has one query).
  """

  def __init__(self, config: ResNetConfig | Mapping[str, Any], *, rngs: nnx.Rngs):
    if not isinstance(config, ResNetConfig):
      config = ResNetConfig.from_mapping(config)
    c = config
    if c.style not in STYLES:
      raise ValueError(f"ResNet style must be one of {STYLES}, got {c.style!r}")
    dtype = as_dtype(c.dtype)
    self.config = c
    specs = stage_specs(c)
    clip = c.style == "clip"
    if clip:  # 3x3 s2 C -> w/2, 3x3 w/2 -> w/2, 3x3 w/2 -> w, then a 2x2 average pool
      stem = [(c.channels, c.width // 2, 2), (c.width // 2, c.width // 2, 1), (c.width // 2, c.width, 1)]
      self.stem = nnx.List([conv(i, o, 3, s, rngs=rngs, dtype=dtype) for i, o, s in stem])
      self.stem_norm = nnx.List([norm_layer(c.norm, o, rngs=rngs, dtype=dtype) for _, o, _ in stem])
    else:  # 7x7 s2 C -> w, then a 3x3 s2 max pool (single modules: the parameter paths of before)
      self.stem = conv(c.channels, c.width, 7, 2, rngs=rngs, dtype=dtype)
      self.stem_norm = norm_layer(c.norm, c.width, rngs=rngs, dtype=dtype)
    self.blocks = nnx.List([
        ResidualBlock(kind, cin, width, stride, norm=c.norm, zero_init=c.zero_init_residual,
                      rngs=rngs, dtype=dtype, antialias=clip)
        for kind, cin, width, stride in specs])
    kind, _ = resnet_variant(c.variant)
    self.embed_dim = specs[-1][2] * (4 if kind == "bottleneck" else 1)
    self.patch_size = 32  # total stride: one token per 32x32 pixels
    self.grid_size = clip_grid(c.image_size) if clip else -(-c.image_size // 32)
    self.num_patches = self.grid_size ** 2
    self.num_prefix_tokens = 0
    self.attn_pool = nnx.data(AttentionPool(
        self.grid_size, self.embed_dim, c.attn_heads or self.embed_dim // 64, rngs=rngs,
        dtype=dtype) if clip else None)

  def __call__(self, images: jax.Array, keep_ids: jax.Array | None = None, *,
               pooled_only: bool = False) -> dict[str, jax.Array]:
    if keep_ids is not None:
      raise ValueError("ResNet does not support keep_ids (patch dropping needs a ViT)")
    x = images
    if self.config.style == "clip":
      for c, n in zip(self.stem, self.stem_norm):
        x = normalise(n, constrain_batch(c(x)))
      x = avg_pool(x, 2)
    else:
      x = normalise(self.stem_norm, constrain_batch(self.stem(x)))
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(constrain_batch(x))
    b, h, w, ch = x.shape
    tokens = x.reshape(b, h * w, ch)
    pooled = tokens.mean(axis=1) if self.attn_pool is None else self.attn_pool(x)
    return {"pooled": pooled} if pooled_only else {"tokens": tokens, "pooled": pooled}
