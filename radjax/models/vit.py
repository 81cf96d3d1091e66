"""Vision Transformer (ViT-Ti/S/B/L) image encoder with optional MAE-style patch dropping."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from radjax.models.layers import as_dtype, linear, normal, param
from radjax.models.masking import gather_tokens, patchify
from radjax.models.transformer import Transformer, sincos_2d
from radjax.parallel.rules import constrain_batch

# variant -> (width, depth, mlp_dim, num_heads), as in the ViT paper / timm / big_vision.
VIT_VARIANTS = {
    "ti": (192, 12, 768, 3),
    "s": (384, 12, 1536, 6),
    "m": (512, 12, 2048, 8),
    "b": (768, 12, 3072, 12),
    "l": (1024, 24, 4096, 16),
    "h": (1280, 32, 5120, 16),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """ViT hyper-parameters; width/depth/mlp_dim/num_heads of None (or <= 0) come from ``variant``."""
  variant: str = "b"
  patch_size: int = 16
  image_size: int = 224
  channels: int = 3
  pool: str = "cls"          # "cls" token or "gap" (mean of patch tokens, no cls token)
  posemb: str = "learned"    # "learned" or "sincos2d" (fixed)
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  dropout: float = 0.0
  dtype: Any = "float32"

  def resolved(self) -> "ViTConfig":
    v = self.variant.lower()
    if v not in VIT_VARIANTS:
      raise ValueError(f"unknown ViT variant {self.variant!r}; known: {sorted(VIT_VARIANTS)}")
    w, d, m, h = VIT_VARIANTS[v]
    pick = lambda x, default: default if x is None or x <= 0 else int(x)
    return dataclasses.replace(self, width=pick(self.width, w), depth=pick(self.depth, d),
                               mlp_dim=pick(self.mlp_dim, m), num_heads=pick(self.num_heads, h))

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any], **overrides) -> "ViTConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in dict(cfg).items() if k in names}
    kw.update(overrides)
    return cls(**kw)


class ViT(nnx.Module):
  """ViT image encoder.

  ``__call__(images [B, H, W, C], keep_ids=None)`` -> {"tokens": [B, P + N', D], "pooled": [B, D]}
  where P = ``num_prefix_tokens`` (1 with pool="cls", else 0) and N' = N, or N_keep when
  ``keep_ids`` [B, N_keep] selects the visible patches (dropped before the encoder, MAE-style).
  Tokens are after the final LayerNorm; pooled is the cls token or the mean of patch tokens.
  ``pooled_only=True`` -> {"pooled"} alone; with pool="cls" the last block then runs its
  queries and MLP on the cls token only (:class:`Transformer`'s ``rows``).
  """

  def __init__(self, config: ViTConfig | Mapping[str, Any], *, rngs: nnx.Rngs):
    if not isinstance(config, ViTConfig):
      config = ViTConfig.from_mapping(config)
    c = config.resolved()
    if c.image_size % c.patch_size:
      raise ValueError(f"ViT image size {c.image_size} is not divisible by patch size "
                       f"{c.patch_size}")
    if c.pool not in ("cls", "gap"):
      raise ValueError(f"ViT pool must be 'cls' or 'gap', got {c.pool!r}")
    if c.posemb not in ("learned", "sincos2d"):
      raise ValueError(f"ViT posemb must be 'learned' or 'sincos2d', got {c.posemb!r}")
    self.config = c
    dtype = as_dtype(c.dtype)
    self.dtype = dtype
    self.embed_dim = c.width
    self.patch_size = c.patch_size
    self.grid_size = c.image_size // c.patch_size
    self.num_patches = self.grid_size ** 2
    self.num_prefix_tokens = 1 if c.pool == "cls" else 0
    # A linear map of patchified pixels == a stride-p conv with a p x p kernel.
    self.patch_embed = linear(c.patch_size ** 2 * c.channels, c.width, ("patch", "embed"),
                              rngs=rngs, dtype=dtype)
    if c.posemb == "learned":
      self.posemb = param(rngs, normal(0.02), (1, self.num_patches, c.width),
                          (None, "pos", "embed"))
    else:
      self.posemb = None
    if c.pool == "cls":
      self.cls = param(rngs, nnx.initializers.zeros_init(), (1, 1, c.width), (None, None, "embed"))
    else:
      self.cls = None
    self.encoder = Transformer(c.depth, c.width, c.num_heads, c.mlp_dim, pre_ln=True,
                               final_ln=True, eps=1e-6, dropout=c.dropout, rngs=rngs, dtype=dtype)

  def position_embedding(self) -> jax.Array:
    """[1, N, D] float32."""
    if self.posemb is not None:
      return self.posemb[...]
    return sincos_2d(self.grid_size, self.grid_size, self.embed_dim)[None]

  def __call__(self, images: jax.Array, keep_ids: jax.Array | None = None, *,
               pooled_only: bool = False) -> dict[str, jax.Array]:
    c = self.config
    if images.shape[1:] != (c.image_size, c.image_size, c.channels):
      raise ValueError(f"ViT expects images [B, {c.image_size}, {c.image_size}, {c.channels}], "
                       f"got {images.shape}")
    # Pinned to the batch axes: with a small patch dimension XLA would otherwise gather the
    # batch of patches to match the fsdp-sharded embedding kernel.
    x = constrain_batch(self.patch_embed(patchify(images, self.patch_size)))
    x = x + self.position_embedding().astype(x.dtype)
    if keep_ids is not None:
      x = gather_tokens(x, keep_ids)
    if self.cls is not None:
      cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (x.shape[0], 1, x.shape[2]))
      x = jnp.concatenate([cls, x], axis=1)
    cls_only = pooled_only and self.cls is not None
    x = self.encoder(x, rows=jnp.zeros((x.shape[0], 1), jnp.int32) if cls_only else None)
    pooled = x[:, 0] if self.cls is not None else x.mean(axis=1)
    return {"pooled": pooled} if pooled_only else {"tokens": x, "pooled": pooled}
