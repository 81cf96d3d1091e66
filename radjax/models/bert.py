"""BERT text encoder, layer for layer the same computation as Hugging Face ``BertModel``.

Embeddings (word + absolute position + token type, LayerNorm), post-LN transformer layers with
erf GELU, optional pooler (dense + tanh on the first token). Weights port from HF with
:func:`radjax.models.hf.load_hf_bert`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from radjax.models.layers import as_dtype, embed, layer_norm, linear
from radjax.models.transformer import Transformer

POOLS = ("cls", "pooler", "mean")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  dropout: float = 0.0        # hidden dropout (attention-probability dropout is not implemented)
  pooler: bool = True         # whether the pooler dense layer exists
  pool: str = "cls"           # "cls" token, "pooler" (tanh dense on cls), "mean" (masked mean)
  pad_token_id: int = 0
  dtype: Any = "float32"

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any], **overrides) -> "BertConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in dict(cfg).items() if k in names}
    kw.update(overrides)
    return cls(**kw)


def bert_config_from_hf(hf: Mapping[str, Any], **overrides) -> BertConfig:
  """A HF ``config.json`` dict (BertConfig fields) -> :class:`BertConfig`; ``overrides`` win."""
  required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size")
  missing = [k for k in required if k not in hf]
  if missing:
    raise ValueError(f"HF BERT config is missing {missing} (has {sorted(hf)[:20]}...)")
  pet = hf.get("position_embedding_type", "absolute")
  if pet != "absolute":
    raise ValueError(f"HF BERT config position_embedding_type={pet!r}: only 'absolute' is "
                     "supported")
  kw = dict(
      vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
      num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
      intermediate_size=int(hf["intermediate_size"]),
      max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
      type_vocab_size=int(hf.get("type_vocab_size", 2)),
      layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
      hidden_act=str(hf.get("hidden_act", "gelu")),
      dropout=float(hf.get("hidden_dropout_prob", 0.0) or 0.0),
      pad_token_id=int(hf.get("pad_token_id") or 0))
  kw.update(overrides)
  return BertConfig(**kw)


class BertEmbeddings(nnx.Module):
  def __init__(self, c: BertConfig, *, rngs: nnx.Rngs, dtype=None):
    self.word = embed(c.vocab_size, c.hidden_size, rngs=rngs, dtype=dtype)
    self.position = embed(c.max_position_embeddings, c.hidden_size, rngs=rngs, dtype=dtype,
                          names=("pos", "embed"))
    self.token_type = embed(c.type_vocab_size, c.hidden_size, rngs=rngs, dtype=dtype,
                            names=(None, "embed"))
    self.norm = layer_norm(c.hidden_size, rngs=rngs, dtype=dtype, eps=c.layer_norm_eps)
    self.dropout = nnx.Dropout(c.dropout, rngs=rngs) if c.dropout > 0 else None

  def __call__(self, ids: jax.Array, token_type_ids: jax.Array | None = None) -> jax.Array:
    l = ids.shape[1]
    if l > self.position.num_embeddings:
      raise ValueError(f"text length {l} exceeds max_position_embeddings "
                       f"{self.position.num_embeddings}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(ids)
    x = self.word(ids) + self.position(jnp.arange(l)[None]) + self.token_type(token_type_ids)
    x = self.norm(x)
    return x if self.dropout is None else self.dropout(x)


class BertEncoder(nnx.Module):
  """``__call__(ids [B, L], mask [B, L], token_type_ids=None, *, input_bias=None,
  pooled_only=False)`` ->
  {"tokens": [B, L, D] last hidden states, "pooled": [B, D]} (see ``BertConfig.pool``).
  ``input_bias`` [B, 1 or L, D] is added to the embeddings (MRM's image conditioning).
  ``pooled_only=True`` -> {"pooled"} alone; with pool "cls" / "pooler" the last layer then
  computes the first token's row only."""

  def __init__(self, config: BertConfig | Mapping[str, Any], *, rngs: nnx.Rngs):
    if not isinstance(config, BertConfig):
      config = BertConfig.from_mapping(config)
    c = config
    if c.pool not in POOLS:
      raise ValueError(f"BERT pool must be one of {POOLS}, got {c.pool!r}")
    if c.pool == "pooler" and not c.pooler:
      raise ValueError("BERT pool='pooler' needs pooler=True")
    dtype = as_dtype(c.dtype)
    self.config = c
    self.embed_dim = c.hidden_size
    self.vocab_size = c.vocab_size
    self.embeddings = BertEmbeddings(c, rngs=rngs, dtype=dtype)
    self.encoder = Transformer(c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size,
                               pre_ln=False, final_ln=False, eps=c.layer_norm_eps,
                               dropout=c.dropout, act=c.hidden_act, rngs=rngs, dtype=dtype)
    self.pooler = (linear(c.hidden_size, c.hidden_size, ("embed", "mlp"), rngs=rngs, dtype=dtype)
                   if c.pooler else None)

  def word_embeddings(self) -> jax.Array:
    """[V, D] table (for a tied MLM head)."""
    return self.embeddings.word.embedding[...]

  def __call__(self, ids: jax.Array, mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, *,
               input_bias: jax.Array | None = None, pooled_only: bool = False
               ) -> dict[str, jax.Array]:
    if mask is None:
      mask = jnp.ones_like(ids)
    x = self.embeddings(ids, token_type_ids)
    if input_bias is not None:
      x = x + input_bias.astype(x.dtype)
    first_only = pooled_only and self.config.pool != "mean"
    x = self.encoder(x, mask, rows=jnp.zeros((x.shape[0], 1), jnp.int32) if first_only else None)
    if self.config.pool == "mean":
      m = mask.astype(x.dtype)[..., None]
      pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1)
    elif self.config.pool == "pooler":
      pooled = jnp.tanh(self.pooler(x[:, 0]))
    else:
      pooled = x[:, 0]
    return {"pooled": pooled} if pooled_only else {"tokens": x, "pooled": pooled}
