"""Heads: projection to the joint embedding space, learnable temperature, classifier, and the
privileged-information teacher g(V(X), T(Z)).

Outputs are in the compute dtype; callers cast to float32 before losses.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from radjax.models.layers import Dtype, as_dtype, gelu, layer_norm, linear, zeros
from radjax.models.transformer import Block


class ProjectionHead(nnx.Module):
  """[..., D_in] -> [..., D_out]: linear (CLIP) or Linear-GELU-Linear (ConVIRT) when hidden_dim."""

  def __init__(self, in_dim: int, out_dim: int, *, hidden_dim: int | None = None,
               use_bias: bool = False, rngs: nnx.Rngs, dtype: Dtype = None):
    dtype = as_dtype(dtype)
    if hidden_dim:
      self.fc1 = linear(in_dim, hidden_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
      self.fc2 = linear(hidden_dim, out_dim, ("mlp", "embed"), rngs=rngs, dtype=dtype,
                        use_bias=use_bias)
    else:
      self.fc1 = None
      self.fc2 = linear(in_dim, out_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype,
                        use_bias=use_bias)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.fc1 is not None:
      x = gelu(self.fc1(x))
    return self.fc2(x)


class Temperature(nnx.Module):
  """Learnable logit scale 1/T stored as log(1/T) (CLIP), plus an optional learnable bias (SigLIP).

  ``__call__()`` -> float32 scalar scale = exp(log_scale), clipped to ``max_scale`` (CLIP's 100).
  """

  def __init__(self, init_temperature: float = 0.07, *, init_bias: float | None = None,
               max_scale: float = 100.0, learnable: bool = True):
    if init_temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {init_temperature}")
    value = jnp.asarray(math.log(1.0 / init_temperature), jnp.float32)
    self.log_scale = nnx.Param(value) if learnable else nnx.Variable(value)
    self.bias = None if init_bias is None else nnx.Param(jnp.asarray(init_bias, jnp.float32))
    self.max_scale = max_scale

  def __call__(self) -> jax.Array:
    return jnp.minimum(jnp.exp(self.log_scale[...]), self.max_scale)


class ClassifierHead(nnx.Module):
  """[B, D] -> logits [B, K]; zero-initialised kernel (big_vision) so training starts at p=0.5."""

  def __init__(self, in_dim: int, num_classes: int, *, zero_init: bool = True, rngs: nnx.Rngs,
               dtype: Dtype = None):
    kw = {"kernel_init": zeros} if zero_init else {}
    self.fc = linear(in_dim, num_classes, ("embed", "classes"), rngs=rngs, dtype=as_dtype(dtype),
                     **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc(x)


class Teacher(nnx.Module):
  """Fusion head g(V(X), T(Z)) -> logits [B, K] for privileged-information distillation.

  fusion="concat":          MLP on [image pooled ; text pooled].
  fusion="cross_attention": image tokens (projected to ``hidden_dim``) attend to text tokens in
                            ``depth`` pre-LN blocks, then mean-pooled, LayerNorm, linear.
  ``__call__(image: {"tokens": [B,N,Di], "pooled": [B,Di]}, text: {"tokens": [B,L,Dt],
  "pooled": [B,Dt]}, text_mask [B, L] | None)``.
  """

  def __init__(self, image_dim: int, text_dim: int, num_classes: int, *, fusion: str = "concat",
               hidden_dim: int = 256, num_heads: int = 4, depth: int = 1, dropout: float = 0.0,
               rngs: nnx.Rngs, dtype: Dtype = None):
    if fusion not in ("concat", "cross_attention"):
      raise ValueError(f"teacher fusion must be 'concat' or 'cross_attention', got {fusion!r}")
    dtype = as_dtype(dtype)
    self.fusion = fusion
    if fusion == "concat":
      self.fc1 = linear(image_dim + text_dim, hidden_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
      self.blocks = None
    else:
      self.fc1 = linear(image_dim, hidden_dim, ("kv", "embed"), rngs=rngs, dtype=dtype)
      self.blocks = nnx.List([
          Block(hidden_dim, num_heads, 4 * hidden_dim, pre_ln=True, cross_dim=text_dim,
                dropout=dropout, rngs=rngs, dtype=dtype) for _ in range(depth)])
      self.norm = layer_norm(hidden_dim, rngs=rngs, dtype=dtype)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    self.head = ClassifierHead(hidden_dim, num_classes, zero_init=False, rngs=rngs, dtype=dtype)

  def __call__(self, image: dict[str, jax.Array], text: dict[str, jax.Array],
               text_mask: jax.Array | None = None) -> jax.Array:
    if self.blocks is None:
      x = jnp.concatenate([image["pooled"], text["pooled"].astype(image["pooled"].dtype)], -1)
      x = gelu(self.fc1(x))
    else:
      x = self.fc1(image["tokens"])
      for block in self.blocks:
        x = block(x, context=text["tokens"].astype(x.dtype), context_mask=text_mask)
      x = self.norm(x.mean(axis=1))
    if self.dropout is not None:
      x = self.dropout(x)
    return self.head(x)
