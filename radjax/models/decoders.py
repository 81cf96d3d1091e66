"""Decoders: MAE pixel decoder (optionally text-conditioned, MRM), MLM head, report decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from radjax.models.layers import Dtype, as_dtype, embed, gelu, layer_norm, linear, normal, param, zeros
from radjax.models.masking import gather_tokens
from radjax.models.transformer import Transformer, sincos_2d


class MAEDecoder(nnx.Module):
  """Light transformer over the full patch set with mask tokens; predicts pixels per patch.

  ``__call__(tokens [B, P + N_keep, De], restore_ids [B, N], text_tokens=None, text_mask=None)``
  -> [B, N, patch_dim] in patch order (P = ``num_prefix_tokens`` of the encoder, dropped from
  the output). With ``text_dim`` set every block cross-attends to ``text_tokens`` [B, L, text_dim]
  (MRM: the report conditions image reconstruction).
  """

  def __init__(self, encoder_dim: int, patch_dim: int, grid_size: int, *, dim: int = 128,
               depth: int = 2, num_heads: int = 4, mlp_dim: int | None = None,
               num_prefix_tokens: int = 1, text_dim: int | None = None, rngs: nnx.Rngs,
               dtype: Dtype = None):
    dtype = as_dtype(dtype)
    self.grid_size = grid_size
    self.num_patches = grid_size ** 2
    self.num_prefix_tokens = num_prefix_tokens
    self.dim = dim
    self.embed = linear(encoder_dim, dim, ("kv", "embed"), rngs=rngs, dtype=dtype)
    self.mask_token = param(rngs, normal(0.02), (1, 1, dim), (None, None, "embed"))
    self.blocks = Transformer(depth, dim, num_heads, mlp_dim or 4 * dim, pre_ln=True,
                              final_ln=True, cross_dim=text_dim, rngs=rngs, dtype=dtype)
    self.pred = linear(dim, patch_dim, ("embed", "patch"), rngs=rngs, dtype=dtype)

  def __call__(self, tokens: jax.Array, restore_ids: jax.Array,
               text_tokens: jax.Array | None = None,
               text_mask: jax.Array | None = None) -> jax.Array:
    b = tokens.shape[0]
    p, n = self.num_prefix_tokens, self.num_patches
    x = self.embed(tokens)
    prefix, visible = x[:, :p], x[:, p:]
    n_masked = n - visible.shape[1]
    masked = jnp.broadcast_to(self.mask_token[...].astype(x.dtype), (b, n_masked, self.dim))
    x = gather_tokens(jnp.concatenate([visible, masked], axis=1), restore_ids)
    x = x + sincos_2d(self.grid_size, self.grid_size, self.dim)[None].astype(x.dtype)
    x = jnp.concatenate([prefix, x], axis=1)
    if text_tokens is not None:
      text_tokens = text_tokens.astype(x.dtype)
    x = self.blocks(x, context=text_tokens, context_mask=text_mask)
    return self.pred(x[:, p:])


class MLMHead(nnx.Module):
  """BERT MLM head: dense-GELU-LayerNorm transform, then a vocab projection.

  ``__call__(hidden [B, L, D], embedding=None)`` -> logits [B, L, V]. ``tied=True`` projects with
  the given word-embedding table ``embedding`` [V, D] (e.g. ``BertEncoder.word_embeddings()``)
  plus a learned bias; the table is passed at call time so no module is shared between trees.
  """

  def __init__(self, hidden: int, vocab_size: int, *, tied: bool = True, eps: float = 1e-12,
               rngs: nnx.Rngs, dtype: Dtype = None):
    dtype = as_dtype(dtype)
    self.tied = tied
    self.dense = linear(hidden, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.norm = layer_norm(hidden, rngs=rngs, dtype=dtype, eps=eps, name="mlp")
    if tied:
      self.bias = param(rngs, zeros, (vocab_size,), ("vocab",))
      self.decoder = None
    else:
      self.decoder = linear(hidden, vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dtype)

  def __call__(self, hidden: jax.Array, embedding: jax.Array | None = None) -> jax.Array:
    h = self.norm(gelu(self.dense(hidden)))
    if not self.tied:
      return self.decoder(h)
    if embedding is None:
      raise ValueError("tied MLMHead needs embedding=[V, D] (the text encoder's word embeddings)")
    return h @ embedding.astype(h.dtype).T + self.bias[...].astype(h.dtype)


class ReportDecoder(nnx.Module):
  """Causal pre-LN transformer decoder cross-attending to image tokens (RadTex captioning).

  ``__call__(ids [B, L], image_tokens [B, N, Di])`` -> logits [B, L, V] (position t predicts
  token t+1). Output projection is tied to the token embedding.
  """

  def __init__(self, vocab_size: int, max_len: int, image_dim: int, *, dim: int = 256,
               depth: int = 2, num_heads: int = 4, mlp_dim: int | None = None,
               dropout: float = 0.0, rngs: nnx.Rngs, dtype: Dtype = None):
    dtype = as_dtype(dtype)
    self.max_len = max_len
    self.vocab_size = vocab_size
    self.token_embed = embed(vocab_size, dim, rngs=rngs, dtype=dtype)
    self.posemb = param(rngs, normal(0.02), (max_len, dim), ("pos", "embed"))
    self.blocks = Transformer(depth, dim, num_heads, mlp_dim or 4 * dim, pre_ln=True,
                              final_ln=True, cross_dim=image_dim, dropout=dropout, rngs=rngs,
                              dtype=dtype)
    self.bias = param(rngs, zeros, (vocab_size,), ("vocab",))

  def __call__(self, ids: jax.Array, image_tokens: jax.Array) -> jax.Array:
    l = ids.shape[1]
    if l > self.max_len:
      raise ValueError(f"report length {l} exceeds the decoder's max_len {self.max_len}")
    x = self.token_embed(ids)
    x = x + self.posemb[:l].astype(x.dtype)
    x = self.blocks(x, is_causal=True, context=image_tokens.astype(x.dtype))
    return self.token_embed.attend(x) + self.bias[...].astype(x.dtype)

  def generate(self, image_tokens: jax.Array, max_len: int, bos_id: int, eos_id: int,
               pad_id: int | None = None) -> jax.Array:
    """Greedy decoding at a fixed length (jittable): -> int32 [B, max_len] starting with bos_id;
    after a sequence emits eos_id the rest is ``pad_id`` (default eos_id). Recomputes the prefix
    every step (no KV cache): O(max_len^2), fine for report-length outputs."""
    if max_len > self.max_len:
      raise ValueError(f"max_len {max_len} exceeds the decoder's max_len {self.max_len}")
    pad_id = eos_id if pad_id is None else pad_id
    b = image_tokens.shape[0]
    ids = jnp.full((b, max_len), pad_id, jnp.int32).at[:, 0].set(bos_id)
    done = jnp.zeros((b,), bool)

    def step(t, carry):
      ids, done = carry
      logits = self(ids, image_tokens)  # causal: positions > t do not affect position t
      nxt = jnp.argmax(logits[:, t - 1], axis=-1).astype(jnp.int32)
      nxt = jnp.where(done, pad_id, nxt)
      ids = ids.at[:, t].set(nxt)
      return ids, done | (nxt == eos_id)

    ids, _ = jax.lax.fori_loop(1, max_len, step, (ids, done))
    return ids
