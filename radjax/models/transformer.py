"""Transformer blocks shared by ViT, BERT, the CLIP text tower, the fusion teacher and the decoders.

Shapes: B batch, L query length, S key length, D width, H heads.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from radjax import mkl_gemm
from radjax.models import layers
from radjax.models.layers import Dtype, activation, layer_norm, linear, transpose_rowmajor
from radjax.parallel.rules import constrain_batch


def key_mask_to_bias_mask(mask: jax.Array | None) -> jax.Array | None:
  """[B, S] (1 = attend) -> bool [B, 1, 1, S] for jax.nn.dot_product_attention; others as is."""
  if mask is None:
    return None
  if mask.ndim == 2:
    return mask.astype(bool)[:, None, None, :]
  return mask.astype(bool)


# ----------------------------------------------------------------------------- CPU attention
# jax.nn.dot_product_attention's XLA path runs badly on XLA:CPU (jaxlib 0.10): its [B, T, N, H]
# einsums become batched dots with transposed operands (naive loops) and bf16 x bf16 -> bf16
# products upcast to f32. On CPU, radjax uses this equivalent implementation instead (same
# math, float32 logits/softmax, products accumulated in float32), with a hand-written backward
# pass whose batched dots all have canonical operand layouts: ~1.6x faster forward+backward for
# ViT-B/16 shapes in bf16 and f32. Other platforms keep jax.nn.dot_product_attention (cuDNN /
# Pallas / XLA as the platform picks). Set CPU_ATTENTION = False to compare.
CPU_ATTENTION = True
_F32 = jnp.float32


def _bmm(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  dt = layers.cpu_dot_dtype(a.dtype)
  return jnp.einsum(spec, a.astype(dt), b.astype(dt), preferred_element_type=_F32)


def _heads(x: jax.Array) -> jax.Array:
  """[B, T, N, H] -> [B, N, T, H] (B and N stay separate dims: B may be sharded).

  Materialised: a transpose left to XLA is folded into the batched dots as a non-canonical
  operand layout, and XLA:CPU then upcasts their bf16 operands to float32 (ViT-B/16 attention
  forward + backward in bf16: 89 -> 68 ms).
  """
  return transpose_rowmajor(x, (0, 2, 1, 3))


def _unheads(x: jax.Array) -> jax.Array:
  """[B, N, T, H] -> [B, T, N, H]."""
  return jnp.swapaxes(x, 1, 2)


def _transposed(x: jax.Array) -> jax.Array:
  # A materialised transpose: a batched dot contracting the major dim of both operands takes a
  # slow path on XLA:CPU; copying one operand first is several times cheaper.
  return transpose_rowmajor(x, (0, 1, 3, 2))


def _allowed(mask: jax.Array | None, is_causal: bool, t: int, s: int) -> jax.Array | None:
  """bool, broadcastable to [B, N, T, S]: the query-key pairs that may attend, or None (all)."""
  m = None
  if mask is not None:
    m = mask.astype(bool)
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)
  if is_causal:
    c = jnp.tril(jnp.ones((t, s), bool), s - t)[None, None]
    m = c if m is None else (m & c)
  return m


def _probabilities(logits, mask, is_causal, dtype):
  """Softmax over the keys of float32 logits [B, N, T, S], masked, in ``dtype``."""
  allowed = _allowed(mask, is_causal, logits.shape[2], logits.shape[3])
  if allowed is not None:
    logits = jnp.where(allowed, logits, jnp.finfo(_F32).min)
  return jax.nn.softmax(logits, axis=-1).astype(dtype)


def _scaled(x):
  """x [..., H] / sqrt(H), rounded back to x.dtype. Scaling q (not the [T, S] logits) is the same
  product on a smaller tensor."""
  return (x.astype(_F32) * x.shape[-1] ** -0.5).astype(x.dtype)


def _cpu_attention_fwd_core(q, k, v, mask, is_causal):
  qs = _heads(_scaled(q))
  kh, vh = _heads(k), _heads(v)
  p = _probabilities(_bmm("bnth,bnsh->bnts", qs, kh), mask, is_causal, q.dtype)
  o = _bmm("bnts,bnsh->bnth", p, vh).astype(q.dtype)
  return o, (qs, kh, vh, p, o)


# With MKL (radjax.mkl_gemm), attention is one fused call per direction: per (batch, head), the
# logits, softmax and products stay in the core's cache, q, k, v and their gradients are read and
# written in their [B, T, N, H] layout, and the backward recomputes the probabilities from each
# row's max and sum instead of keeping [B, N, T, S] of them. ViT-B/16: BUILD_NOTES.md, "Fused
# attention through MKL".
def _mkl_operands(q, k, v):
  dt = layers.cpu_dot_dtype(q.dtype)
  return q.astype(dt), k.astype(dt), v.astype(dt)


def _mkl_attention_fwd(q, k, v, mask, is_causal):
  qc, kc, vc = _mkl_operands(q, k, v)
  o, stats = mkl_gemm.attention(qc, kc, vc, mask, causal=is_causal, scale=q.shape[-1] ** -0.5)
  return o.astype(q.dtype), (qc, kc, vc, o, stats)


def _mkl_attention_bwd(mask, is_causal, res, do):
  qc, kc, vc, o, stats = res
  grads = mkl_gemm.attention_grad(qc, kc, vc, mask, o, stats, do.astype(qc.dtype),
                                  causal=is_causal, scale=qc.shape[-1] ** -0.5)
  return tuple(g.astype(do.dtype) for g in grads) + (None,)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                  is_causal: bool) -> jax.Array:
  """Softmax attention like ``jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=...)``.

  q [B, T, N, H], k/v [B, S, N, H], mask bool broadcastable to [B, N, T, S] (True = attend) or
  None -> [B, T, N, H] in q.dtype. Logits and softmax in float32.
  """
  return _cpu_attention_fwd(q, k, v, mask, is_causal)[0]


def _cpu_attention_fwd(q, k, v, mask, is_causal):
  if layers.use_mkl():
    o, res = _mkl_attention_fwd(q, k, v, mask, is_causal)
    return o, (res, mask)
  o, res = _cpu_attention_fwd_core(q, k, v, mask, is_causal)
  return _unheads(o), (res, mask)


def _cpu_attention_bwd(is_causal, res, do):
  res, mask = res
  if layers.use_mkl():
    return _mkl_attention_bwd(mask, is_causal, res, do)
  qs, kh, vh, p, o = res
  dt = qs.dtype
  doh = _heads(do.astype(dt))
  dp = _bmm("bnth,bnsh->bnts", doh, vh)
  delta = jnp.sum(doh.astype(_F32) * o.astype(_F32), -1, keepdims=True)  # = rowsum(dp * p)
  ds = (p.astype(_F32) * (dp - delta)).astype(dt)
  dq = _bmm("bnts,bnsh->bnth", ds, _scaled(kh)).astype(dt)
  dk = _bmm("bnst,bnth->bnsh", _transposed(ds), qs).astype(dt)
  dv = _bmm("bnst,bnth->bnsh", _transposed(p), doh).astype(dt)
  return _unheads(dq), _unheads(dk), _unheads(dv), None


cpu_attention.defvjp(_cpu_attention_fwd, _cpu_attention_bwd)


# On GPU, jax.nn.dot_product_attention(implementation=None) is XLA's unfused attention;
# "cudnn" asks for cuDNN's fused (flash) kernel, which takes bf16/fp16 operands with a head
# size that is a multiple of 8 up to 128 (other calls keep XLA's). $RADJAX_GPU_ATTENTION
# overrides the choice ("xla" or "cudnn") for benchmarks. XLA stays the default until
# tests/test_gpu.py has passed on a GPU (BUILD_NOTES, "GPU").
GPU_ATTENTION = "xla"


def gpu_attention_implementation(q: jax.Array) -> str:
  """The jax.nn.dot_product_attention implementation radjax uses for q [B, T, N, H] on GPU."""
  choice = os.environ.get("RADJAX_GPU_ATTENTION", GPU_ATTENTION)
  if choice not in ("xla", "cudnn"):
    raise ValueError(f"RADJAX_GPU_ATTENTION must be 'xla' or 'cudnn', got {choice!r}")
  head = q.shape[-1]
  if choice == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16) and head % 8 == 0 and head <= 128:
    return "cudnn"
  return "xla"


def _pad_sequence(x: jax.Array, length: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                    is_causal: bool, implementation: str = "cudnn") -> jax.Array:
  """cuDNN fused attention for q [B, T, N, H], k/v [B, S, N, H] and a key-padding mask
  [B, 1, 1, S] (or None) -> [B, T, N, H]. ``implementation="xla"`` runs the same padded call
  anywhere (tests check the padding on CPU that way).

  cuDNN (jax 0.11.2, cuDNN 9.19) trains only on even sequence lengths, and ViT-B/16's 197
  tokens and CLIP's 77 are odd: the sequences are padded by one position, which the lengths
  passed to cuDNN exclude, and the padded query rows are dropped.
  """
  b, t = q.shape[:2]
  s = k.shape[1]
  if mask is None:
    key_lengths = jnp.full((b,), s, jnp.int32)
  elif mask.shape[1:3] == (1, 1):
    # Padding sits at the end of every sequence (the batch contract): the mask is its length.
    key_lengths = jnp.sum(mask[:, 0, 0, :], axis=-1, dtype=jnp.int32)
  else:
    raise ValueError(f"cuDNN attention takes key-padding masks [B, 1, 1, S] only, got "
                     f"{mask.shape}; set RADJAX_GPU_ATTENTION=xla")
  t_even, s_even = t + t % 2, s + s % 2
  out = jax.nn.dot_product_attention(
      _pad_sequence(q, t_even), _pad_sequence(k, s_even), _pad_sequence(v, s_even),
      is_causal=is_causal, query_seq_lengths=jnp.full((b,), t, jnp.int32),
      key_value_seq_lengths=key_lengths, implementation=implementation)
  return out[:, :t]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                          *, is_causal: bool = False) -> jax.Array:
  """jax.nn.dot_product_attention, :func:`cpu_attention` on CPU (see CPU_ATTENTION) or
  :func:`cudnn_attention` on GPU when chosen (see GPU_ATTENTION)."""
  backend = layers.specialised_backend()
  if CPU_ATTENTION and backend == "cpu":
    return cpu_attention(q, k, v, mask, is_causal)
  if backend == "gpu" and gpu_attention_implementation(q) == "cudnn":
    return cudnn_attention(q, k, v, mask, is_causal)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)


class Attention(nnx.Module):
  """Multi-head (self or cross) attention with separate q/k/v projections (HF BERT layout).

  q/k/v kernels are [D, H*Dh] with logical names ("embed", "heads"); the output projection is
  [H*Dh, D] ("heads", "embed"), so tensor parallelism splits whole heads.
  """

  def __init__(self, dim: int, num_heads: int, *, kv_dim: int | None = None, rngs: nnx.Rngs,
               dtype: Dtype = None, use_bias: bool = True):
    if dim % num_heads:
      raise ValueError(f"attention width {dim} is not divisible by num_heads {num_heads}")
    self.num_heads = num_heads
    kv_dim = dim if kv_dim is None else kv_dim
    kv_name = "embed" if kv_dim == dim else "kv"
    self.query = linear(dim, dim, ("embed", "heads"), rngs=rngs, dtype=dtype, use_bias=use_bias)
    self.key = linear(kv_dim, dim, (kv_name, "heads"), rngs=rngs, dtype=dtype, use_bias=use_bias)
    self.value = linear(kv_dim, dim, (kv_name, "heads"), rngs=rngs, dtype=dtype, use_bias=use_bias)
    self.out = linear(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype, use_bias=use_bias)

  def __call__(self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None,
               *, is_causal: bool = False) -> jax.Array:
    """x [B, L, D]; context [B, S, Dkv] (None = self-attention); mask [B, S] or [B, 1|H, L, S]."""
    context = x if context is None else context
    b, l, d = x.shape
    s = context.shape[1]
    h = self.num_heads
    # On a mesh, q/k/v and the attention output are pinned to the batch axes (heads over
    # "tensor" as the rules say): pinning only the block input is not enough, XLA then splits
    # them over the FSDP-sharded kernels' dims and gathers the batch. No-ops on one device.
    heads = (None, "heads", None)
    q = constrain_batch(self.query(x).reshape(b, l, h, d // h), heads)
    k = constrain_batch(self.key(context).reshape(b, s, h, d // h), heads)
    v = constrain_batch(self.value(context).reshape(b, s, h, d // h), heads)
    o = dot_product_attention(q, k, v, key_mask_to_bias_mask(mask), is_causal=is_causal)
    o = constrain_batch(o, heads)
    return self.out(o.reshape(b, l, d))


class Mlp(nnx.Module):
  """Linear(D->M) - act - Linear(M->D)."""

  def __init__(self, dim: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype: Dtype = None,
               act: str = "gelu"):
    self.fc1 = linear(dim, mlp_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = linear(mlp_dim, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)
    self.act = activation(act)
    self.fused_gelu = act == "gelu"

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.fused_gelu and (out := layers.gelu_mlp_in_cache(self.fc1, self.fc2, x)) is not None:
      return out
    # Hidden [B, L, M]: batch axes, M over "tensor" (rules); a no-op on one device.
    return self.fc2(constrain_batch(self.act(self.fc1(x)), (None, "mlp")))


class Block(nnx.Module):
  """One transformer layer: self-attention, optional cross-attention, MLP.

  pre_ln=True  (ViT, CLIP, decoders): x + f(LN(x)).
  pre_ln=False (BERT, exactly as HF BertLayer): LN(x + f(x)).
  """

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, pre_ln: bool = True,
               cross_dim: int | None = None, eps: float = 1e-6, dropout: float = 0.0,
               act: str = "gelu", rngs: nnx.Rngs, dtype: Dtype = None):
    self.pre_ln = pre_ln
    self.attn = Attention(dim, num_heads, rngs=rngs, dtype=dtype)
    self.ln1 = layer_norm(dim, rngs=rngs, dtype=dtype, eps=eps)
    if cross_dim is not None:
      self.cross_attn = Attention(dim, num_heads, kv_dim=cross_dim, rngs=rngs, dtype=dtype)
      self.ln_cross = layer_norm(dim, rngs=rngs, dtype=dtype, eps=eps)
    else:
      self.cross_attn = None
    self.mlp = Mlp(dim, mlp_dim, rngs=rngs, dtype=dtype, act=act)
    self.ln2 = layer_norm(dim, rngs=rngs, dtype=dtype, eps=eps)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  def _drop(self, x):
    return x if self.dropout is None else self.dropout(x)

  def _residual(self, x, ln, f):
    if self.pre_ln:
      return x + self._drop(f(ln(x)))
    return ln(x + self._drop(f(x)))

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, is_causal: bool = False,
               context: jax.Array | None = None, context_mask: jax.Array | None = None,
               rows: jax.Array | None = None) -> jax.Array:
    """x [B, L, D]; mask [B, L] key padding; context [B, S, Dc] for cross-attention. ``rows``
    int [B, K]: the output at these positions only, [B, K, D] (keys and values still come
    from every position)."""
    # Pins activations to the batch axes on a mesh (under FSDP XLA otherwise gathers the batch to
    # match the sharded kernels); a no-op on one device.
    x = constrain_batch(x)
    if context is not None:
      context = constrain_batch(context)
    if rows is None:
      x = self._residual(x, self.ln1, lambda y: self.attn(y, mask=mask, is_causal=is_causal))
    else:
      keys = self.ln1(x) if self.pre_ln else x
      allowed = rows_mask(mask, rows, is_causal, x.shape[1])
      x = self._residual(constrain_batch(take_rows(x, rows)), self.ln1,
                         lambda y: self.attn(y, keys, mask=allowed))
    if self.cross_attn is not None:
      if context is None:
        raise ValueError("this block cross-attends: pass context=[B, S, Dc]")
      x = self._residual(x, self.ln_cross,
                         lambda y: self.cross_attn(y, context, mask=context_mask))
    return self._residual(x, self.ln2, self.mlp)


class Transformer(nnx.Module):
  """A stack of ``depth`` Blocks, with a final LayerNorm when pre-LN (``final_ln``)."""

  def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, *, pre_ln: bool = True,
               final_ln: bool = True, cross_dim: int | None = None, eps: float = 1e-6,
               dropout: float = 0.0, act: str = "gelu", rngs: nnx.Rngs, dtype: Dtype = None):
    self.layers = nnx.List([
        Block(dim, num_heads, mlp_dim, pre_ln=pre_ln, cross_dim=cross_dim, eps=eps,
              dropout=dropout, act=act, rngs=rngs, dtype=dtype) for _ in range(depth)])
    self.norm = layer_norm(dim, rngs=rngs, dtype=dtype, eps=eps) if final_ln else None

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, is_causal: bool = False,
               context: jax.Array | None = None, context_mask: jax.Array | None = None,
               rows: jax.Array | None = None) -> jax.Array:
    """x [B, L, D] -> [B, L, D], or [B, K, D] with ``rows`` int [B, K]: the outputs at those
    positions only, for an encoder read through one pooled token (a cls or EOT token). Then the
    last block computes keys and values at every position but queries, attention output and
    MLP at those rows only: the same values as the rows of the full output, for ~5/6 of the last
    block's FLOPs fewer (ViT-B/16: 7 % of the forward)."""
    last = len(self.layers) - 1
    for i, layer in enumerate(self.layers):
      x = layer(x, mask, is_causal=is_causal, context=context, context_mask=context_mask,
                rows=rows if i == last else None)
    return x if self.norm is None else self.norm(x)


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """x [B, L, D], rows int [B, K] -> [B, K, D] (take_along_axis: x[arange(B), rows] would
  gather the batch under FSDP)."""
  return jnp.take_along_axis(x, rows[:, :, None], axis=1)


def rows_mask(mask: jax.Array | None, rows: jax.Array, is_causal: bool, length: int
              ) -> jax.Array | None:
  """The attention mask of queries at ``rows`` [B, K] over ``length`` keys: bool [B, 1, K, S]
  from a key-padding ``mask`` [B, S] and, if causal, keys at or before each row; or None.
  With K = 1 it is a key-padding mask, the kind cuDNN's fused attention takes."""
  allowed = None
  if mask is not None:
    if mask.ndim != 2:
      raise ValueError(f"rows need a key-padding mask [B, S], got {mask.shape}")
    allowed = mask.astype(bool)[:, None, None, :]
  if is_causal:
    before = jnp.arange(length)[None, None, None, :] <= rows[:, None, :, None]
    allowed = before if allowed is None else allowed & before
  return allowed


def sincos_1d(length: int, dim: int, temperature: float = 10_000.0) -> jax.Array:
  """Fixed 1-D sin/cos position embedding [length, dim] (float32)."""
  pos = jnp.arange(length, dtype=jnp.float32)[:, None]
  omega = 1.0 / temperature ** (jnp.arange(dim // 2, dtype=jnp.float32) / (dim // 2))
  ang = pos * omega[None]
  return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=1)


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10_000.0) -> jax.Array:
  """Fixed 2-D sin/cos position embedding [h*w, dim] (big_vision / MAE), row-major over the grid."""
  if dim % 4:
    raise ValueError(f"sincos2d position embedding needs width divisible by 4, got {dim}")
  y, x = jnp.mgrid[:h, :w]
  omega = 1.0 / temperature ** (jnp.arange(dim // 4, dtype=jnp.float32) / (dim // 4))
  y = y.reshape(-1, 1).astype(jnp.float32) * omega[None]
  x = x.reshape(-1, 1).astype(jnp.float32) * omega[None]
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
