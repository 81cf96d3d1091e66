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

import contextlib
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from radjax import hostcpu, mkl_gemm
from radjax.parallel import rules

Dtype = Any

# ----------------------------------------------------------------------------- initializers
# Random draws of a 3-D or 4-D shape compile 6-20x slower on XLA:CPU than the same draw flat
# (jaxlib 0.10.2: jax.random.bits of [3, 3, 8, 16] 4.8 s, of [1152] 0.2 s), and a ResNet has a
# dozen distinct conv kernel shapes. Threefry's counters run over the flattened index, so a flat
# draw reshaped is bitwise the same array: these are jax.nn.initializers' normal and
# variance_scaling, value for value. Matrices, the large and sharded parameters, keep their
# 2-D draw, which XLA generates shard by shard.


def _draw(sample, key, shape, dtype):
  if len(shape) <= 2:
    return sample(key, tuple(shape), dtype)
  return sample(key, (math.prod(shape),), dtype).reshape(shape)


def normal(stddev: float):
  """N(0, stddev^2), as ``jax.nn.initializers.normal``."""
  def init(key, shape, dtype=jnp.float32):
    return _draw(jax.random.normal, key, shape, dtype) * jnp.array(stddev, dtype)
  return init


def variance_scaling(scale: float, mode: str, distribution: str):
  """As ``jax.nn.initializers.variance_scaling`` (in_axis -2, out_axis -1) for the "normal" and
  "truncated_normal" distributions and the "fan_in" and "fan_out" modes."""
  if mode not in ("fan_in", "fan_out") or distribution not in ("normal", "truncated_normal"):
    raise ValueError(f"variance_scaling: unsupported mode {mode!r} or distribution {distribution!r}")

  def init(key, shape, dtype=jnp.float32):
    receptive_field = math.prod(shape) / shape[-2] / shape[-1]
    fan = shape[-2 if mode == "fan_in" else -1] * receptive_field
    variance = jnp.array(scale / fan, dtype=dtype)
    if distribution == "normal":
      return _draw(jax.random.normal, key, shape, dtype) * jnp.sqrt(variance)
    stddev = jnp.sqrt(variance) / jnp.array(.87962566103423978, dtype)  # of N(0,1) cut at +-2
    return _draw(lambda k, s, d: jax.random.truncated_normal(k, -2, 2, s, d), key, shape, dtype) * stddev
  return init


default_kernel_init = variance_scaling(1.0, "fan_in", "truncated_normal")  # LeCun normal
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


# ----------------------------------------------------------------------------- matmuls on CPU
# XLA:CPU (jaxlib 0.10) runs a bf16 x bf16 -> bf16 dot by converting both operands to float32
# and calling the f32 kernel, while bf16 x bf16 -> f32 (preferred_element_type) goes to the
# native bf16 kernel (AVX512-BF16 / AMX): ~3x faster on a 2048^3 matmul. Dense layers therefore
# multiply with float32 accumulation, add the bias in float32 and round once to bf16, in the
# forward pass and (custom VJP) in the backward pass, whose weight gradients come out in float32
# directly. Same numerics as GPU/TPU bf16 matmuls (f32 accumulation), one rounding fewer. On
# CPUs whose bf16 dots are emulated or no faster than float32's the operands are upcast to float32
# instead (cpu_dot_dtype).
# float32 layers take the same path for their backward pass: autodiff's weight gradient x^T g
# contracts the major dim of both operands, which XLA:CPU leaves to a plain (Eigen) dot outside
# its YNNPACK fusions; from a materialised x^T it is a YNNPACK dot like the others (ViT-B/16 CLIP
# float32 step +7 % with the scheduler flag of radjax/xla_flags.py; BUILD_NOTES.md).


def _dims(contract_lhs: int, contract_rhs: int):
  return (((contract_lhs,), (contract_rhs,)), ((), ()))


# None: decided by the host CPU (radjax.hostcpu.bf16_dots_faster); True / False to compare.
CPU_BF16_DOTS: bool | None = None


def cpu_dot_dtype(dtype: Dtype) -> Dtype:
  """The operand dtype of radjax's CPU matmuls for compute ``dtype``: bfloat16 only on CPUs
  whose bfloat16 dots beat float32's (AMX, AVX512-BF16 on AMD, Arm BF16:
  :func:`radjax.hostcpu.bf16_dots_faster`), else float32.

  Without bf16 instructions XLA:CPU emulates bf16 x bf16 -> f32 at ~60 % of its float32 GEMM rate
  (AVX2 AMD EPYC: 98-109 against 145-176 GFLOP/s on ViT-B/16's shapes); an Intel Xeon with
  AVX512-BF16 but no AMX runs them at about the same 60 %. Upcasting the operands first computes
  the same products (a product of two bf16 numbers is exact in float32; both accumulate in
  float32) at the float32 rate. Activations stay bf16 in memory either way."""
  bf16_fast = CPU_BF16_DOTS if CPU_BF16_DOTS is not None else hostcpu.bf16_dots_faster()
  return jnp.float32 if jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and not bf16_fast else dtype


def use_mkl() -> bool:
  """Whether radjax's CPU matmuls go through MKL (:mod:`radjax.mkl_gemm`): on one device only,
  as a custom call is opaque to the SPMD partitioner (it would gather sharded operands)."""
  return jax.device_count() == 1 and mkl_gemm.enabled()


def cpu_matmul_path() -> str:
  """Which kernels radjax's CPU matmuls run here: "MKL", or "XLA (why not MKL)"."""
  if jax.device_count() > 1:
    return f"XLA ({jax.device_count()} devices: MKL's custom call runs on one only)"
  reason = mkl_gemm.unavailable_reason()
  return "MKL" if reason is None else f"XLA (not MKL: {reason})"


def _mm(a: jax.Array, b: jax.Array, dims) -> jax.Array:
  """a [M, K] x b [K, N] -> [M, N] in float32, a and b each contracted on the dim ``dims`` names
  (0 or 1: either may come transposed)."""
  dt = cpu_dot_dtype(a.dtype)
  a, b = a.astype(dt), b.astype(dt)
  if use_mkl():
    (contract_a,), (contract_b,) = dims[0]
    return mkl_gemm.gemm(a, b, transpose_a=contract_a == 0, transpose_b=contract_b == 1)
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def transpose_rowmajor(x: jax.Array, axes: Sequence[int] | None = None) -> jax.Array:
  """``jnp.transpose(x, axes)`` materialised in row-major layout.

  XLA otherwise makes a transpose a free layout change and folds it into the consuming dot,
  which on CPU then contracts the major dim of an operand: a slow path (and bf16 operands get
  upcast to f32). A weight gradient x^T g over [M, K] x [M, N] runs ~2-3x faster on a
  materialised x^T.

  Only with a single device: the layout constraint is a custom call that the SPMD partitioner
  cannot see through, so on a mesh it would gather the (batch-sharded) operand; there the plain
  transpose is used.
  """
  y = jnp.transpose(x, axes)
  if jax.device_count() > 1:
    return y
  from jax.experimental.layout import Layout, with_layout_constraint  # pylint: disable=import-outside-toplevel
  return with_layout_constraint(y, Layout(major_to_minor=tuple(range(y.ndim))))


def _weight_grad(x: jax.Array, g: jax.Array, materialise_x: bool = False) -> jax.Array:
  """x [M, K], g [M, N] (compute dtype) -> x^T g [K, N] in float32, with canonical operands.

  Either x^T g from a materialised x^T, or (g^T x)^T, which transposes g and the small [N, K]
  result instead: the cheaper when K > N (an MLP's second layer, a convolution's patches; alone
  12-35 % faster in bf16). The barrier keeps XLA from folding the last transpose into the dot,
  which would then contract the major dim of both operands: a plain dot outside YNNPACK, which
  rejects bf16 x bf16 -> f32. ``materialise_x`` (see :func:`_dense_f32acc`) keeps x^T: ResNet's
  1x1 convolutions are measured that way only. With MKL (:mod:`radjax.mkl_gemm`): one GEMM that
  reads x transposed, none of these.
  """
  if use_mkl():
    return _mm(x, g, _dims(0, 0))
  if materialise_x:
    x = jax.lax.optimization_barrier(transpose_rowmajor(x, (0, 1)))
  elif x.shape[1] > g.shape[1]:
    return transpose_rowmajor(jax.lax.optimization_barrier(_mm(transpose_rowmajor(g), x, _dims(1, 0))))
  return _mm(transpose_rowmajor(x), g, _dims(1, 0))


# Rows from which a dense layer's product (forward, and dx in the backward) goes through
# mkl_gemm.gemm_bias: rows split over the threads, B packed once per call, the bias added and
# the result rounded in cache, so XLA neither writes nor reads a float32 [M, N] (ViT-B/16 bf16
# step +11-14 %; BUILD_NOTES.md, "Rounded in cache"). Below it a thread's share is small and the
# plain GEMM, which may split columns instead, is kept.
MKL_BIAS_MIN_ROWS = 512


def _mm_rounded(a: jax.Array, b: jax.Array, bias: jax.Array, transpose_b: bool = False) -> jax.Array:
  """a [M, K] @ b [K, N] (or [N, K] with ``transpose_b``) + bias [N], accumulated in float32 and
  rounded to a.dtype."""
  if use_mkl() and a.shape[0] >= MKL_BIAS_MIN_ROWS:
    dt = cpu_dot_dtype(a.dtype)
    return mkl_gemm.gemm_bias(a.astype(dt), b.astype(dt), bias, transpose_b=transpose_b).astype(a.dtype)
  return (_mm(a, b, _dims(1, 1 if transpose_b else 0)) + bias.astype(jnp.float32)).astype(a.dtype)


def _input_grad(g: jax.Array, k: jax.Array) -> jax.Array:
  """A dense layer's dx: g [M, N] @ k^T, k [K, N] -> [M, K] in g's dtype."""
  return _mm_rounded(g, k, jnp.zeros((k.shape[0],), jnp.float32), transpose_b=True)


def _bias_or_zeros(layer: nnx.Module) -> jax.Array:
  """A Linear's or Conv's bias, or float32 zeros where it has none: [out features]."""
  if layer.bias is not None:
    return layer.bias[...]
  return jnp.zeros((layer.kernel.shape[-1],), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dense_f32acc(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                  materialise_x: bool = False) -> jax.Array:
  """x [M, K] (compute dtype), kernel [K, N] / bias [N] (params, any float dtype) -> [M, N] in x.dtype.

  ``materialise_x``: the backward pass computes x before transposing it. XLA otherwise fuses
  x's producers into the transpose; when they are many (a ResNet block's norms, adds and ReLUs
  over [50176, 256]) that fusion reads them all in transposed order, ~4x slower than computing x
  and transposing it (ResNet-50 CLIP float32 step +21 %). For a ViT's dense layers it changes
  no time and costs memory (ViT-B/16: +0.4 GiB), so it is the convolutions' choice.
  """
  return _mm_rounded(x, kernel.astype(x.dtype), bias)


def _dense_fwd(x, kernel, bias, materialise_x):
  del materialise_x
  k = kernel.astype(x.dtype)
  # Empty arrays carry the parameter dtypes (residuals must be arrays).
  return _mm_rounded(x, k, bias), (x, k, jnp.zeros((0,), kernel.dtype), jnp.zeros((0,), bias.dtype))


def _dense_bwd(materialise_x, res, g):
  x, k, kernel_like, bias_like = res
  g = g.astype(x.dtype)
  dx = _input_grad(g, k)
  dk = _weight_grad(x, g, materialise_x).astype(kernel_like.dtype)
  db = g.astype(jnp.float32).sum(0).astype(bias_like.dtype)
  return dx, dk, db


_dense_f32acc.defvjp(_dense_fwd, _dense_bwd)


# An erf-GELU MLP with MKL (fc2(GELU(fc1(x)))): fc1's GEMM applies GELU to its product in cache
# and keeps the pre-activation for the backward, where fc2's input-gradient GEMM multiplies by
# GELU's derivative in cache and sums fc1's bias gradient. XLA's three GELU passes over the
# [M, 4D] hidden layer (8 % of the ViT-B/16 bf16 step) and its float32 residual go.
@jax.custom_vjp
def _gelu_mlp(x: jax.Array, kernel1: jax.Array, bias1: jax.Array, kernel2: jax.Array,
              bias2: jax.Array) -> jax.Array:
  """x [M, D] (compute dtype), kernel1 [D, H], bias1 [H], kernel2 [H, D'], bias2 [D'] -> [M, D']."""
  return _gelu_mlp_fwd(x, kernel1, bias1, kernel2, bias2)[0]


def _gelu_mlp_fwd(x, kernel1, bias1, kernel2, bias2):
  w1, w2 = kernel1.astype(x.dtype), kernel2.astype(x.dtype)
  hidden, pre = mkl_gemm.gemm_bias_gelu(x, w1, bias1)
  likes = tuple(jnp.zeros((0,), p.dtype) for p in (kernel1, bias1, kernel2, bias2))
  return _mm_rounded(hidden, w2, bias2), (x, w1, w2, pre, hidden, likes)


def _gelu_mlp_bwd(res, g):
  x, w1, w2, pre, hidden, (kernel1_like, bias1_like, kernel2_like, bias2_like) = res
  g = g.astype(x.dtype)
  d_pre, d_bias1 = mkl_gemm.gemm_gelu_grad(g, w2, pre, transpose_b=True)
  dx = _input_grad(d_pre, w1)
  return (dx, _weight_grad(x, d_pre).astype(kernel1_like.dtype), d_bias1.astype(bias1_like.dtype),
          _weight_grad(hidden, g).astype(kernel2_like.dtype),
          g.astype(jnp.float32).sum(0).astype(bias2_like.dtype))


_gelu_mlp.defvjp(_gelu_mlp_fwd, _gelu_mlp_bwd)


def gelu_mlp_in_cache(fc1: "Linear", fc2: "Linear", x: jax.Array) -> jax.Array | None:
  """fc2(gelu(fc1(x))) through :func:`_gelu_mlp` where it applies (MKL, compute dtype = the
  operands' dtype, at least MKL_BIAS_MIN_ROWS rows), else None."""
  dtype = _compute_dtype(fc1.dtype, x, fc1.kernel[...])
  rows = math.prod(x.shape[:-1])
  if (not use_cpu_dense(dtype) or not use_mkl() or rows < MKL_BIAS_MIN_ROWS
      or cpu_dot_dtype(dtype) != dtype or _compute_dtype(fc2.dtype, x, fc2.kernel[...]) != dtype):
    return None
  out = _gelu_mlp(x.reshape(rows, x.shape[-1]).astype(dtype), fc1.kernel[...], _bias_or_zeros(fc1),
                  fc2.kernel[...], _bias_or_zeros(fc2))
  return out.reshape(x.shape[:-1] + (out.shape[-1],))


_PORTABLE = False


@contextlib.contextmanager
def portable_paths():
  """Models traced inside take the standard path of every layer, as on an accelerator without
  radjax's specialisations: no CPU matmul, convolution or attention paths, whose layout
  constraints are custom calls outside jax.export's stable set. For programs that are exported
  to run on any platform (``radjax export``)."""
  global _PORTABLE
  previous, _PORTABLE = _PORTABLE, True
  try:
    yield
  finally:
    _PORTABLE = previous


def specialised_backend() -> str:
  """The backend whose specialised paths models take: ``jax.default_backend()``, or "portable"
  inside :func:`portable_paths`."""
  return "portable" if _PORTABLE else jax.default_backend()


def use_cpu_dense(dtype: Dtype) -> bool:
  """True where :class:`Linear` (and :class:`Conv`'s 1x1 case) takes its own CPU path (bf16 or
  f32 compute on CPU)."""
  on_cpu = specialised_backend() == "cpu"
  return on_cpu and jnp.dtype(as_dtype(dtype)) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def _compute_dtype(module_dtype: Dtype, inputs: jax.Array, kernel: jax.Array):
  """The dtype flax computes a layer in: its ``dtype``, else the promotion of input and kernel."""
  if module_dtype is None:
    return jnp.promote_types(inputs.dtype, kernel.dtype)
  return jnp.dtype(as_dtype(module_dtype))


class Linear(nnx.Linear):
  """nnx.Linear (same parameters, same results up to rounding) whose matmuls on CPU accumulate
  in float32 and whose weight gradients come from a materialised x^T (see the note above).
  Elsewhere: nnx.Linear."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    kernel = self.kernel[...]
    dtype = _compute_dtype(self.dtype, inputs, kernel)
    if out_sharding is not None or not use_cpu_dense(dtype):
      return super().__call__(inputs, out_sharding)
    bias = _bias_or_zeros(self)
    lead = inputs.shape[:-1]
    x = inputs.reshape(-1, inputs.shape[-1]).astype(dtype)
    return _dense_f32acc(x, kernel, bias).reshape(lead + (kernel.shape[-1],))


def _conv_out_size(x: jax.Array, kernel_size: tuple[int, int], pads) -> tuple[int, int]:
  return tuple(n + lo + hi - k + 1 for n, k, (lo, hi) in zip(x.shape[1:3], kernel_size, pads))


def _patches(x: jax.Array, kernel_size: tuple[int, int], pads) -> jax.Array:
  """x [B, H, W, C], zero-padded by ``pads`` ((top, bottom), (left, right)) -> [B * H' * W',
  kh * kw * C]: every stride-1 kh x kw window, columns in (i, j, c) order (an HWIO kernel
  reshaped to [kh * kw * C, O] multiplies it).

  Built in two stacks (the kw column shifts, then the kh row shifts), on the bits as unsigned
  integers: on XLA:CPU both choices measured faster, for reasons not traced (ResNet's 56x56x128
  at batch 16: one concatenation of the kh * kw slices in bf16 78 ms, two stacks in bf16 34 ms,
  two stacks as uint16 20 ms, against 13 ms to copy the 115 MB once)."""
  (kh, kw), (b, _, _, c) = kernel_size, x.shape
  out_h, out_w = _conv_out_size(x, kernel_size, pads)
  bits = jax.lax.bitcast_convert_type(x, {2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
  bits = jnp.pad(bits, ((0, 0), pads[0], pads[1], (0, 0)))
  cols = jnp.stack([bits[:, :, j:j + out_w] for j in range(kw)], 3)   # [B, H+p, W', kw, C]
  cols = jnp.stack([cols[:, i:i + out_h] for i in range(kh)], 3)      # [B, H', W', kh, kw, C]
  return jax.lax.bitcast_convert_type(cols, x.dtype).reshape(b * out_h * out_w, kh * kw * c)


def _input_grad_pads(kernel_size: tuple[int, int], pads):
  """How to pad a stride-1 convolution's cotangent g so that the input gradient is its full
  correlation with the flipped kernel: row h of dx sums g[h + top - i] k[i] over i, i.e. g
  padded by (kh - 1 - top, kh - 1 - bottom) (and the same for columns)."""
  return tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel_size, pads))


def _conv_out(x, kernel, bias, pads):
  kh, kw, cin, cout = kernel.shape
  cols = _patches(x, (kh, kw), pads)
  return _mm_rounded(cols, kernel.astype(x.dtype).reshape(kh * kw * cin, cout), bias).reshape(
      (x.shape[0],) + _conv_out_size(x, (kh, kw), pads) + (cout,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv_f32acc(x: jax.Array, kernel: jax.Array, bias: jax.Array, pads) -> jax.Array:
  """Stride-1 convolution as a matmul of patches: x [B, H, W, C] (compute dtype), kernel
  [kh, kw, C, O] / bias [O] (params), ``pads`` ((top, bottom), (left, right)), each pad in
  [0, k - 1] -> [B, H', W', O] in x.dtype, accumulated in float32.

  XLA:CPU has no bf16 convolution kernel (it converts to float32); as bf16 GEMMs with float32
  accumulation ResNet-50's 3x3 convolutions run 1.1-2.6x faster, forward + backward
  (BUILD_NOTES.md, "RN50's 3x3 convolutions as patch matmuls"). On a CPU without bf16 dot
  instructions :func:`_conv_patch_grads` is faster still (AVX2 Zen 2, RN50 bf16 step: 2.13
  against 1.99 examples/s). The residual is x, not its patches (9x its size for a 3x3 kernel):
  the backward builds them again."""
  return _conv_out(x, kernel, bias, pads)


def _conv_fwd(x, kernel, bias, pads):
  return _conv_out(x, kernel, bias, pads), (x, kernel, jnp.zeros((0,), bias.dtype))


def _conv_bwd(pads, res, g):
  x, kernel, bias_like = res
  kh, kw, cin, cout = kernel.shape
  g = g.astype(x.dtype)
  g_pads = _input_grad_pads((kh, kw), pads)
  flipped = kernel.astype(x.dtype)[::-1, ::-1].transpose(0, 1, 3, 2).reshape(kh * kw * cout, cin)
  dx = _mm(_patches(g, (kh, kw), g_pads), flipped, _dims(1, 0)).astype(x.dtype).reshape(x.shape)
  return (dx,) + _conv_param_grads(x, kernel, bias_like, pads, g)


def _conv_param_grads(x, kernel, bias_like, pads, g):
  """Kernel and bias gradients of a stride-1 convolution (x [B, H, W, C], kernel [kh, kw, C, O],
  cotangent g [B, H', W', O] in x.dtype): the patches of x, transposed, times g."""
  kh, kw, _, cout = kernel.shape
  g_rows = g.reshape(-1, cout)
  dk = _weight_grad(_patches(x, (kh, kw), pads), g_rows).reshape(kernel.shape).astype(kernel.dtype)
  db = g_rows.astype(jnp.float32).sum(0).astype(bias_like.dtype)
  return dk, db


_conv_f32acc.defvjp(_conv_fwd, _conv_bwd)


def _conv_xla(x: jax.Array, kernel: jax.Array, pads) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (1, 1), pads,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv_patch_grads(x: jax.Array, kernel: jax.Array, bias: jax.Array, pads) -> jax.Array:
  """XLA's stride-1 convolution (arguments as :func:`_conv_f32acc`'s) with its input gradient,
  but kernel and bias gradients from the patches of x (:func:`_conv_param_grads`).

  XLA:CPU runs the forward and input-gradient convolutions near its GEMM rate, but its
  weight-gradient convolutions on ResNet-50's 3x3 shapes ran at 8-11 GFLOP/s inside the float32
  step on an AVX2 AMD EPYC (Zen 2), 4.4 s of 13.6 s of op time; as patch matmuls the step ran
  1.59 -> 2.01 examples/s (BUILD_NOTES.md, "A sixth machine")."""
  return _conv_xla(x, kernel, pads) + bias.astype(x.dtype)


def _conv_patch_grads_fwd(x, kernel, bias, pads):
  return _conv_patch_grads(x, kernel, bias, pads), (x, kernel, jnp.zeros((0,), bias.dtype))


def _conv_patch_grads_bwd(pads, res, g):
  x, kernel, bias_like = res
  g = g.astype(x.dtype)
  _, input_vjp = jax.vjp(lambda x_: _conv_xla(x_, kernel, pads), x)
  return input_vjp(g) + _conv_param_grads(x, kernel, bias_like, pads, g)


_conv_patch_grads.defvjp(_conv_patch_grads_fwd, _conv_patch_grads_bwd)


# :func:`_conv_mkl` computes the convolution on the padded input's whole grid; below this share of
# useful outputs the waste costs more than it saves. ResNet-50's 3x3 convolutions at batch 16,
# forward + backward, against the patch paths: 14x14 (77 % useful) 1.1-1.5x faster, 7x7 (60 %)
# 0.6-0.8x (BUILD_NOTES.md, "3x3 convolutions through MKL").
MKL_CONV_MIN_FILL = 0.7


def _wide_grid_fill(x: jax.Array, kernel_size, pads) -> float:
  out_h, out_w = _conv_out_size(x, kernel_size, pads)
  padded = [n + lo + hi for n, (lo, hi) in zip(x.shape[1:3], pads)]
  return out_h * out_w / (padded[0] * padded[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv_mkl(x: jax.Array, kernel: jax.Array, bias: jax.Array, pads) -> jax.Array:
  """A stride-1 convolution (arguments as :func:`_conv_f32acc`'s) through MKL, forward and
  backward, as kh * kw GEMMs over shifted rows of the padded input (:func:`mkl_gemm.conv`): no
  patches are built. Output in x.dtype, accumulated in float32; the operands as :func:`_mm`'s
  (:func:`cpu_dot_dtype`)."""
  return _conv_mkl_fwd(x, kernel, bias, pads)[0]


def _conv_mkl_fwd(x, kernel, bias, pads):
  kh, kw = kernel.shape[:2]
  out_h, out_w = _conv_out_size(x, (kh, kw), pads)
  dt = cpu_dot_dtype(x.dtype)
  x_padded = jnp.pad(x.astype(dt), ((0, 0), *pads, (0, 0)))
  wide = mkl_gemm.conv(x_padded, kernel.astype(dt))
  y = (wide[:, :out_h, :out_w] + bias.astype(jnp.float32)).astype(x.dtype)
  return y, (x_padded, kernel, jnp.zeros((0,), bias.dtype), jnp.zeros((0,), x.dtype))


def _conv_mkl_bwd(pads, res, g):
  x_padded, kernel, bias_like, x_like = res
  kh, kw = kernel.shape[:2]
  (_, hp, wp, _), (_, out_h, out_w, _) = x_padded.shape, g.shape
  g = g.astype(x_like.dtype).astype(x_padded.dtype)
  g_padded = jnp.pad(g, ((0, 0), *_input_grad_pads((kh, kw), pads), (0, 0)))
  in_h, in_w = hp - sum(pads[0]), wp - sum(pads[1])
  dx = mkl_gemm.conv(g_padded, kernel.astype(g.dtype), flip=True, transpose_kernel=True)
  dx = dx[:, :in_h, :in_w].astype(x_like.dtype)
  g_wide = jnp.pad(g, ((0, 0), (0, hp - out_h), (0, wp - out_w), (0, 0)))
  dk = mkl_gemm.conv_kernel_grad(x_padded, g_wide, (kh, kw)).astype(kernel.dtype)
  db = g.astype(jnp.float32).sum((0, 1, 2)).astype(bias_like.dtype)
  return dx, dk, db


_conv_mkl.defvjp(_conv_mkl_fwd, _conv_mkl_bwd)


class Conv(nnx.Conv):
  """nnx.Conv (same parameters, same results up to rounding) with four CPU paths
  (:meth:`cpu_path`):

  - "dense": 1x1 convolutions without padding take :class:`Linear`'s CPU path. XLA:CPU runs them
    as convolutions at 25-145 GFLOP/s on ResNet-50's shapes, against 72-416 GFLOP/s as the same
    matmuls (BUILD_NOTES.md, "RN50").
  - "mkl": other 2-D stride-1 convolutions, on one device with MKL (:func:`use_mkl`), unless the
    map is so small that most of the padded grid is border (:data:`MKL_CONV_MIN_FILL`): shifted
    GEMMs through MKL, forward and backward (:func:`_conv_mkl`).
  - "patches": the other stride-1 convolutions, on one device, in bf16 on a CPU with bf16 dot
    instructions are matmuls of their patches, forward and backward (:func:`_conv_f32acc`).
  - "patch_grads": the same convolutions in float32, or in bf16 on a CPU without bf16 dots,
    are XLA's, except for their weight gradients (:func:`_conv_patch_grads`).

  On a mesh the patches' row-major transposes would gather the batch, so there, and for every
  other convolution: nnx.Conv."""

  def _strides(self) -> tuple[int, ...]:
    s = self.strides
    return tuple(s) if isinstance(s, Sequence) else (s or 1,) * len(self.kernel_size)

  def cpu_path(self, inputs: jax.Array, dtype: Dtype):
    """("dense", None), ("patches", pads), ("patch_grads", pads) or (None, None) for this input
    and compute dtype."""
    ks, strides = tuple(self.kernel_size), self._strides()
    unit = lambda v: v in (None, 1) or tuple(v) == (1,) * len(ks)
    if not (use_cpu_dense(dtype) and unit(self.input_dilation) and unit(self.kernel_dilation)
            and self.feature_group_count == 1 and self.mask is None
            and inputs.ndim == len(ks) + 2 and self.padding not in ("CIRCULAR", "REFLECT", "CAUSAL")):
      return None, None
    if isinstance(self.padding, str):
      pads = jax.lax.padtype_to_pads(inputs.shape[1:-1], ks, strides, self.padding)
    else:
      pads = nnx.nn.linear.canonicalize_padding(self.padding, len(ks))
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if all(k == 1 for k in ks) and all(p == (0, 0) for p in pads):
      return "dense", None
    if (len(ks) == 2 and all(s == 1 for s in strides) and jax.device_count() == 1
        and all(0 <= v < k for k, p in zip(ks, pads) for v in p)):
      if use_mkl() and _wide_grid_fill(inputs, ks, pads) >= MKL_CONV_MIN_FILL:
        return "mkl", pads
      bf16_operands = jnp.dtype(cpu_dot_dtype(as_dtype(dtype))) == jnp.dtype(jnp.bfloat16)
      return ("patches" if bf16_operands else "patch_grads"), pads
    return None, None

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    kernel = self.kernel[...]
    dtype = _compute_dtype(self.dtype, inputs, kernel)
    path, pads = self.cpu_path(inputs, dtype) if out_sharding is None else (None, None)
    if path is None:
      return super().__call__(inputs, out_sharding)
    bias = _bias_or_zeros(self)
    if path != "dense":
      conv = {"patches": _conv_f32acc, "patch_grads": _conv_patch_grads, "mkl": _conv_mkl}[path]
      return conv(inputs.astype(dtype), kernel, bias, pads)
    x = inputs[(slice(None),) + tuple(slice(None, None, s) for s in self._strides())]
    y = _dense_f32acc(x.reshape(-1, x.shape[-1]).astype(dtype), kernel.reshape(-1, kernel.shape[-1]),
                      bias, True)
    return y.reshape(x.shape[:-1] + (kernel.shape[-1],))


def linear(din: int, dout: int, names: Sequence[str | None], *, rngs: nnx.Rngs,
           dtype: Dtype = None, use_bias: bool = True, kernel_init=default_kernel_init,
           bias_init=zeros) -> nnx.Linear:
  """nnx.Linear with kernel [din, dout] named ``names`` and bias [dout] named ``names[-1]``
  (a :class:`Linear`: its own matmul path on CPU)."""
  return Linear(
      din, dout, use_bias=use_bias, dtype=dtype, rngs=rngs,
      kernel_init=partitioned(kernel_init, *names),
      bias_init=partitioned(bias_init, names[-1]))


# LayerNorm with MKL's handler library loaded (one device, CPU): one call each way
# (mkl_gemm.layer_norm / layer_norm_grad) that takes a row's statistics while it sits in L1,
# where XLA's path made separate passes over memory for the moments, the normalisation and the
# backward's row and column sums (ViT-B/16 bf16: 25 LayerNorms of [3152, 768] a step).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm_fused(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                      dtype: Dtype) -> jax.Array:
  """x [M, D], scale and bias [D] (params) -> [M, D] in ``dtype``."""
  return mkl_gemm.layer_norm(x, scale, bias, epsilon=epsilon, dtype=dtype)[0]


def _layer_norm_fused_fwd(x, scale, bias, epsilon, dtype):
  y, stats = mkl_gemm.layer_norm(x, scale, bias, epsilon=epsilon, dtype=dtype)
  return y, (x, scale, stats, jnp.zeros((0,), bias.dtype))


def _layer_norm_fused_bwd(epsilon, dtype, res, dy):
  del epsilon, dtype
  x, scale, stats, bias_like = res
  dx, dscale, dbias = mkl_gemm.layer_norm_grad(x, scale, stats, dy)
  return dx, dscale.astype(scale.dtype), dbias.astype(bias_like.dtype)


_layer_norm_fused.defvjp(_layer_norm_fused_fwd, _layer_norm_fused_bwd)


class LayerNorm(nnx.LayerNorm):
  """nnx.LayerNorm (same parameters; the same results up to rounding: its statistics come from x
  as given, where nnx's first rounds x to ``dtype``) through :func:`_layer_norm_fused` on CPU
  with MKL, over the last dim with scale and bias. Elsewhere: nnx.LayerNorm."""

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    dtype = jnp.dtype(as_dtype(self.dtype) or x.dtype)
    fused = (mask is None and self.scale is not None and self.bias is not None
             and self.reduction_axes in (-1, (-1,)) and self.feature_axes in (-1, (-1,))
             and self.axis_name is None and specialised_backend() == "cpu" and use_mkl()
             and {jnp.dtype(x.dtype), dtype} <= {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)})
    if not fused:
      return super().__call__(x, mask=mask)
    y = _layer_norm_fused(x.reshape(-1, x.shape[-1]), self.scale[...], self.bias[...],
                          float(self.epsilon), dtype)
    return y.reshape(x.shape)


def layer_norm(dim: int, *, rngs: nnx.Rngs, dtype: Dtype = None, eps: float = 1e-6,
               name: str = "embed") -> LayerNorm:
  return LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs,
                   scale_init=partitioned(ones, name), bias_init=partitioned(zeros, name))


# ----------------------------------------------------------------------------- batch norm
# Autodiff writes BatchNorm's backward as a chain of per-channel vector ops broadcast into the
# element-wise cotangent; XLA fuses that chain, the ReLU's select and the residual's add into
# one loop fusion per layer that ran at 40-65 ms for RN50's [16, 14, 14, 1024] in the float32
# step (BUILD_NOTES.md, "RN50's BatchNorm backward"). The hand-written backward reduces g and
# g*x once per channel and applies dx = g*a + x*c + d with per-channel a, c, d: 1.5-2.5x faster
# forward + backward alone.


def _batch_moments(xf: jax.Array) -> tuple[jax.Array, jax.Array]:
  axes = tuple(range(xf.ndim - 1))
  mean = xf.mean(axes)
  # E[x^2] - E[x]^2, clipped at 0: flax's use_fast_variance, one pass over x.
  return mean, jnp.maximum((xf * xf).mean(axes) - mean * mean, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm over every axis but the last, in float32.

  x: [..., C]; scale, bias: [C]. Returns (y [..., C] in x.dtype, batch mean [C], batch variance
  [C], both float32). The statistics are outputs for the running averages only: their
  cotangents are ignored (the caller stops their gradient, as nnx.BatchNorm does).
  """
  return _batch_norm_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_fwd(x, scale, bias, epsilon):
  xf = x.astype(jnp.float32)
  mean, var = _batch_moments(xf)
  rstd = jax.lax.rsqrt(var + epsilon)
  a = scale.astype(jnp.float32) * rstd
  y = (xf * a + (bias.astype(jnp.float32) - mean * a)).astype(x.dtype)
  return (y, mean, var), (x, scale, bias, mean, rstd)


def _batch_norm_bwd(epsilon, res, cotangents):
  del epsilon
  x, scale, bias, mean, rstd = res
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  gf, xf = cotangents[0].astype(jnp.float32), x.astype(jnp.float32)
  sum_g = gf.sum(axes)
  # sum(g * x_hat) with x_hat = (x - mean) * rstd, from the same pass over g and x as sum_g.
  dscale = rstd * ((gf * xf).sum(axes) - mean * sum_g)
  a = scale.astype(jnp.float32) * rstd
  c = -a * rstd * dscale / n
  d = -a * sum_g / n - c * mean
  dx = (gf * a + xf * c + d).astype(x.dtype)
  return dx, dscale.astype(scale.dtype), sum_g.astype(bias.dtype)


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


# With MKL's handler library loaded (one device, CPU), training-mode BatchNorm is one native call
# each way (mkl_gemm.batch_norm / batch_norm_grad) that takes the residual's add and the ReLU
# along: XLA's path made separate passes for the moments, the normalisation, the add and the
# ReLU, forward and backward, most of them on one thread (RN50 bf16: 53 BatchNorms a step).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _batch_norm_native(x: jax.Array, scale: jax.Array, bias: jax.Array, residual: jax.Array | None,
                       epsilon: float, relu: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x [M, C], scale and bias [C], residual [M, C] or None -> (y [M, C] in x's dtype, batch mean
  [C], batch variance [C]), as :func:`batch_norm_train` followed by the add and the ReLU."""
  y, moments = mkl_gemm.batch_norm(x, scale, bias, residual, epsilon=epsilon, relu=relu)
  return y, moments[0], moments[1]


def _batch_norm_native_fwd(x, scale, bias, residual, epsilon, relu):
  y, moments = mkl_gemm.batch_norm(x, scale, bias, residual, epsilon=epsilon, relu=relu)
  residual_like = None if residual is None else jnp.zeros((0,), residual.dtype)
  return (y, moments[0], moments[1]), (x, scale, moments, y, jnp.zeros((0,), bias.dtype), residual_like)


def _batch_norm_native_bwd(epsilon, relu, res, cotangents):
  x, scale, moments, y, bias_like, residual_like = res
  dx, dresidual, dscale, dbias = mkl_gemm.batch_norm_grad(
      x, scale, moments, y, cotangents[0], epsilon=epsilon, relu=relu,
      residual=residual_like is not None)
  return dx, dscale.astype(scale.dtype), dbias.astype(bias_like.dtype), dresidual


_batch_norm_native.defvjp(_batch_norm_native_fwd, _batch_norm_native_bwd)


def add_relu(y: jax.Array, residual: jax.Array | None, relu: bool) -> jax.Array:
  """y (+ residual), then max(., 0) if ``relu``."""
  y = y if residual is None else y + residual
  return jax.nn.relu(y) if relu else y


class BatchNorm(nnx.BatchNorm):
  """nnx.BatchNorm (same variables, same results up to rounding) whose training-mode call over the
  last axis goes through :func:`batch_norm_train` and its hand-written backward, or on CPU with MKL's
  handler library through :func:`_batch_norm_native`. ``residual`` (added to the normalised
  output) and ``relu`` (then max(., 0)) are part of the call so that the native path applies them
  in the same pass. Running-average mode, masks, ``axis_name`` and other axes take nnx.BatchNorm's
  own path."""

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None,
               residual: jax.Array | None = None, relu: bool = False):
    use_running_average = (self.use_running_average if use_running_average is None
                           else use_running_average)
    if (use_running_average is not False or mask is not None or self.axis_name is not None
        or self.scale is None or self.bias is None or not self.use_fast_variance
        or tuple(self.axis if isinstance(self.axis, (tuple, list)) else (self.axis,))
        not in ((-1,), (x.ndim - 1,))):
      return add_relu(super().__call__(x, use_running_average, mask=mask), residual, relu)
    x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
    native = (specialised_backend() == "cpu" and use_mkl()
              and jnp.dtype(x.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)))
    if native:
      rows = lambda a: a.reshape(-1, a.shape[-1])
      y, mean, var = _batch_norm_native(rows(x), scale, bias,
                                        None if residual is None else rows(residual.astype(x.dtype)),
                                        float(self.epsilon), relu)
      y = y.reshape(x.shape)
    else:
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
      y = add_relu(y, residual, relu)
    m = self.momentum
    self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
    self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var)
    return y


class Embed(nnx.Embed):
  """nnx.Embed (same parameter, same results) that, on a mesh, gathers its table over "fsdp"
  before the lookup (:func:`radjax.parallel.rules.gather_fsdp`): an FSDP step then gathers the
  table, as it does matmul kernels, rather than the batch of ids and of output gradients."""

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if out_sharding is not None or self.num_embeddings == 1:
      return super().__call__(inputs, out_sharding)
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError("Input type must be an integer or unsigned integer.")
    (table,) = self.promote_dtype((self.embedding[...],), dtype=self.dtype, inexact=False)
    table = rules.gather_fsdp(table, self.embedding.get_metadata().get("out_sharding"))
    return jnp.take(table, inputs, axis=0)


def embed(num: int, dim: int, *, rngs: nnx.Rngs, dtype: Dtype = None, stddev: float = 0.02,
          names: Sequence[str | None] = ("vocab", "embed")) -> Embed:
  """Embedding table [num, dim]; normal(stddev) init as BERT / ViT (an :class:`Embed`)."""
  return Embed(num, dim, dtype=dtype, rngs=rngs,
               embedding_init=partitioned(normal(stddev), *names))


def param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[str | None]) -> nnx.Param:
  """A free-standing float32 parameter with logical names."""
  return nnx.Param(partitioned(init, *names)(rngs.params(), tuple(shape), jnp.float32))


def gelu(x: jax.Array) -> jax.Array:
  # erf GELU, as BERT, timm ViT and open_clip (not the tanh approximation flax defaults to),
  # written as HF/PyTorch do, x/2 (1 + erf(x/sqrt2)), in float32: jax.nn.gelu's erfc form runs
  # ~3x slower forward+backward on XLA:CPU (bf16 [16,197,3072]: 47 -> 17 ms) for tail accuracy
  # (|x| > 4, relative) that no activation here needs; results round to x.dtype once.
  xf = x.astype(jnp.float32)
  return (0.5 * xf * (1.0 + jax.lax.erf(xf * 0.7071067811865476))).astype(x.dtype)


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
