"""open_clip-style text transformer: causal, pre-LN, pooled at the EOT (argmax id) token."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from radjax.models.layers import as_dtype, embed, normal, param
from radjax.models.transformer import Transformer, take_rows


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Defaults: the open_clip ViT-B text tower (width 512, 8 heads, 12 layers, context 77)."""
  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  num_heads: int = 8
  num_layers: int = 12
  mlp_dim: int | None = None       # None -> 4 * width
  proj_dim: int | None = 512       # text_projection output; None -> no projection
  pool: str = "argmax"             # "argmax" (EOT has the largest id, open_clip) or "last" (mask)
  act: str = "gelu"
  dtype: Any = "float32"

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any], **overrides) -> "CLIPTextConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in dict(cfg).items() if k in names}
    kw.update(overrides)
    return cls(**kw)


class CLIPTextEncoder(nnx.Module):
  """``__call__(ids [B, L], mask [B, L] | None, *, input_bias=None, pooled_only=False)`` ->
  {"tokens": [B, L, W], "pooled": [B, P]} with P = proj_dim (or W without projection).
  L <= context_length.
  ``input_bias`` [B, 1 or L, W] is added to the input embeddings (MRM's image conditioning).
  ``pooled_only=True`` -> {"pooled"} alone, the last block computing the EOT row only."""

  def __init__(self, config: CLIPTextConfig | Mapping[str, Any], *, rngs: nnx.Rngs):
    if not isinstance(config, CLIPTextConfig):
      config = CLIPTextConfig.from_mapping(config)
    c = config
    if c.pool not in ("argmax", "last"):
      raise ValueError(f"clip_text pool must be 'argmax' or 'last', got {c.pool!r}")
    dtype = as_dtype(c.dtype)
    self.config = c
    self.vocab_size = c.vocab_size
    self.token_embedding = embed(c.vocab_size, c.width, rngs=rngs, dtype=dtype)
    self.positional_embedding = param(rngs, normal(0.01),
                                      (c.context_length, c.width), ("pos", "embed"))
    self.transformer = Transformer(c.num_layers, c.width, c.num_heads, c.mlp_dim or 4 * c.width,
                                   pre_ln=True, final_ln=True, eps=1e-5, act=c.act, rngs=rngs,
                                   dtype=dtype)
    if c.proj_dim:
      self.text_projection = param(rngs, normal(c.width ** -0.5),
                                   (c.width, c.proj_dim), ("embed", "mlp"))
      self.embed_dim = c.proj_dim
    else:
      self.text_projection = None
      self.embed_dim = c.width

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None, *,
               input_bias: jax.Array | None = None, pooled_only: bool = False
               ) -> dict[str, jax.Array]:
    _, l = ids.shape
    if l > self.config.context_length:
      raise ValueError(f"text length {l} exceeds clip_text context_length "
                       f"{self.config.context_length}")
    x = self.token_embedding(ids)
    x = x + self.positional_embedding[:l].astype(x.dtype)
    if input_bias is not None:
      x = x + input_bias.astype(x.dtype)
    if self.config.pool == "last" and mask is not None:
      idx = jnp.maximum(mask.astype(jnp.int32).sum(1) - 1, 0)
    else:
      idx = jnp.argmax(ids, axis=1)
    # Causal attention only, as open_clip: padding sits after EOT so it cannot leak backwards.
    if pooled_only:
      pooled = self.transformer(x, is_causal=True, rows=idx[:, None])[:, 0]
    else:
      x = self.transformer(x, is_causal=True)
      pooled = take_rows(x, idx[:, None])[:, 0]
    if self.text_projection is not None:
      pooled = pooled @ self.text_projection[...].astype(pooled.dtype)
    return {"pooled": pooled} if pooled_only else {"tokens": x, "pooled": pooled}
