"""Small building blocks shared by every radjax model: partitioned Linear / LayerNorm / Embed.

Every parameter carries logical axis names (``out_sharding`` metadata) that
:mod:`radjax.parallel.rules` maps to the ("data", "fsdp", "tensor") mesh. The
annotation is metadata only (``eager_sharding=False``): modules build without a
mesh on one device, and ``sharded_init`` decides the placement.

Logical axis vocabulary used across radjax.models:
  embed      model width (residual stream) of a transformer / output of a patch embedding
  mlp        hidden width of an MLP
  heads      the fused (num_heads * head_dim) axis of q/k/v and the attention output projection
  kv         width of a cross-attention context that is not ``embed`` (e.g. text width seen
             by an image model)
  vocab      vocabulary rows of token embeddings / output projections
  patch      flattened p*p*C pixels of a patch
  pos        positions of a learned position embedding
  conv_in / conv_out   input / output channels of a convolution
  classes    number of labels of a classifier
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any

default_kernel_init = nnx.initializers.lecun_normal()
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def partitioned(init, *names: str | None):
  """Wraps an initializer so its Variable carries logical axis ``names`` (one per dim)."""
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def as_dtype(dtype: str | Dtype | None) -> Dtype | None:
  """"bfloat16" / "float32" / jnp dtype / None -> jnp dtype or None."""
  if dtype is None or not isinstance(dtype, str):
    return dtype
  try:
    return jnp.dtype(dtype).type
  except TypeError as e:
    raise ValueError(f"unknown dtype {dtype!r} (expected 'float32' or 'bfloat16')") from e


def linear(din: int, dout: int, names: Sequence[str | None], *, rngs: nnx.Rngs,
           dtype: Dtype = None, use_bias: bool = True, kernel_init=default_kernel_init,
           bias_init=zeros) -> nnx.Linear:
  """nnx.Linear with kernel [din, dout] named ``names`` and bias [dout] named ``names[-1]``."""
  return nnx.Linear(
      din, dout, use_bias=use_bias, dtype=dtype, rngs=rngs,
      kernel_init=partitioned(kernel_init, *names),
      bias_init=partitioned(bias_init, names[-1]))


def layer_norm(dim: int, *, rngs: nnx.Rngs, dtype: Dtype = None, eps: float = 1e-6,
               name: str = "embed") -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs,
                       scale_init=partitioned(ones, name), bias_init=partitioned(zeros, name))


def embed(num: int, dim: int, *, rngs: nnx.Rngs, dtype: Dtype = None, stddev: float = 0.02,
          names: Sequence[str] = ("vocab", "embed")) -> nnx.Embed:
  """Embedding table [num, dim]; normal(stddev) init as BERT / ViT."""
  return nnx.Embed(num, dim, dtype=dtype, rngs=rngs,
                   embedding_init=partitioned(nnx.initializers.normal(stddev), *names))


def param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[str | None]) -> nnx.Param:
  """A free-standing float32 parameter with logical names."""
  return nnx.Param(partitioned(init, *names)(rngs.params(), tuple(shape), jnp.float32))


def gelu(x: jax.Array) -> jax.Array:
  # erf GELU, as BERT, timm ViT and open_clip (not the tanh approximation flax defaults to).
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {
    "gelu": gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]
