"""Intel MKL's GEMMs as XLA custom calls, for radjax's CPU matmuls on Intel CPUs: dense layers and
matmul convolutions (:func:`gemm`, :func:`gemm_bias`; an erf-GELU MLP's :func:`gemm_bias_gelu` and
:func:`gemm_gelu_grad`), stride-1 convolutions as shifted GEMMs (:func:`conv`,
:func:`conv_kernel_grad`) and softmax attention fused per (batch, head) (:func:`attention`,
:func:`attention_grad`; on a CPU with AMX its bf16 GEMMs run on the tiles from the handler
itself, :func:`amx_permitted`). The same handler library also holds LayerNorm (:func:`layer_norm`,
:func:`layer_norm_grad`) and training-mode BatchNorm with its residual add and ReLU
(:func:`batch_norm`, :func:`batch_norm_grad`), which need no MKL but come with it.

On an Intel Xeon with AMX, MKL's bf16 x bf16 -> f32 GEMM ran ViT-B/16's shapes at 0.9-2.7x XLA's
rate (1.4-1.8 TFLOP/s), and its float32 GEMM at 1.1-1.35x; it also reads a transposed operand at
full speed, where
XLA:CPU contracts an operand's major dimension on a slow path (hence
:func:`radjax.models.layers.transpose_rowmajor`). Measurements: BUILD_NOTES.md. On AMD CPUs MKL's
bf16 GEMM ran at half XLA's and its float32 at the same rate, so this path is Intel's only.

It is used when all of these hold, else radjax's matmuls stay XLA's:
- the CPU's vendor is Intel and the machine x86_64;
- MKL is installed (``pip install 'radjax[mkl]'``: ``libmkl_rt`` in this environment's ``lib``);
- the small C++ handler (``radjax/native/mkl_gemm.cc``, against the XLA FFI headers jaxlib ships)
  compiles with ``$CXX`` (default ``g++``); it is built once per source and jaxlib version into
  ``$XDG_CACHE_HOME/radjax/native`` (``~/.cache/radjax/native``);
- ``$RADJAX_MKL`` is not "off" (to compare with XLA's kernels); "on" uses it on any x86_64 CPU.

The handler runs MKL sequentially on tiles of the work, spread over XLA's own intra-op thread
pool, so MKL starts no threads of its own to compete with XLA's. It is built for the CPU it runs
on (``-march=native``, 512-bit vectors where it has them), so the softmax, GELU and LayerNorm
loops use its widest vectors.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import math
import os
import platform
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from radjax import compile_cache, hostcpu, native_build

TARGET = "radjax_mkl_gemm"
BIAS_TARGET = "radjax_mkl_gemm_bias"
BIAS_GELU_TARGET = "radjax_mkl_gemm_bias_gelu"
GELU_GRAD_TARGET = "radjax_mkl_gemm_gelu_grad"
LAYER_NORM_TARGET = "radjax_layer_norm"
LAYER_NORM_GRAD_TARGET = "radjax_layer_norm_grad"
BATCH_NORM_TARGET = "radjax_batch_norm"
BATCH_NORM_GRAD_TARGET = "radjax_batch_norm_grad"
CONV_TARGET = "radjax_mkl_conv"
CONV_WEIGHT_GRAD_TARGET = "radjax_mkl_conv_weight_grad"
ATTENTION_TARGET = "radjax_mkl_attention"
ATTENTION_GRAD_TARGET = "radjax_mkl_attention_grad"
ENV = "RADJAX_MKL"
_SOURCE = os.path.join(os.path.dirname(__file__), "native", "mkl_gemm.cc")
_MKL_THREADING_SEQUENTIAL = 1


def find_mkl() -> str | None:
  """The path of MKL's single dynamic library (``libmkl_rt``) in this Python environment, or
  None."""
  for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
    found = sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
    if found:
      return found[0]
  return None


_CXX_FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd", "-std=c++17",
              "-shared", "-fPIC", "-w")


def build_handler(out_dir: str | None = None) -> str:
  """Compiles ``native/mkl_gemm.cc`` into a shared library (once per source, jaxlib version,
  compiler, flags and CPU: :func:`radjax.native_build.shared_library`) and returns its path. Raises
  RuntimeError with the compiler's message when it cannot be built."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  # Built for this CPU (-march=native: the softmax loops of the fused attention vectorise), so the
  # name carries its instruction set too: a cache shared by different machines gets one per CPU.
  return native_build.shared_library(
      _SOURCE, os.environ.get("CXX", "g++"), (*_CXX_FLAGS, "-I", jax.ffi.include_dir()),
      out_dir or os.path.join(compile_cache.user_cache_dir(), "native"),
      identity=(jaxlib.__version__, hostcpu.instruction_set_key()))


@functools.cache
def register() -> str | None:
  """Loads MKL and the handler and registers the custom call (once per process, on any x86_64
  CPU); returns why it could not, or None."""
  mkl_path = find_mkl()
  if mkl_path is None:
    return "MKL is not installed (pip install 'radjax[mkl]')"
  try:
    handler_path = build_handler()
  except (RuntimeError, OSError) as e:
    return f"its handler did not build: {e}"
  try:
    mkl = ctypes.CDLL(mkl_path, mode=ctypes.RTLD_GLOBAL)
    handler = ctypes.CDLL(handler_path)
  except OSError as e:
    return f"cannot load {mkl_path} or {handler_path}: {e}"
  mkl.MKL_Set_Threading_Layer(_MKL_THREADING_SEQUENTIAL)
  address = lambda f: ctypes.cast(f, ctypes.c_void_p)
  functions = ("cblas_gemm_bf16bf16f32", "cblas_sgemm", "cblas_gemm_bf16bf16f32_pack_get_size",
               "cblas_gemm_bf16bf16f32_pack", "cblas_gemm_bf16bf16f32_compute",
               "cblas_sgemm_pack_get_size", "cblas_sgemm_pack", "cblas_sgemm_compute")
  handler.radjax_mkl_init.argtypes = [ctypes.c_void_p] * len(functions)
  handler.radjax_mkl_init(*(address(getattr(mkl, name)) for name in functions))
  for target, symbol in ((TARGET, "RadjaxMklGemm"), (BIAS_TARGET, "RadjaxMklGemmBias"),
                         (BIAS_GELU_TARGET, "RadjaxMklGemmBiasGelu"),
                         (GELU_GRAD_TARGET, "RadjaxMklGemmGeluGrad"),
                         (LAYER_NORM_TARGET, "RadjaxLayerNorm"),
                         (LAYER_NORM_GRAD_TARGET, "RadjaxLayerNormGrad"),
                         (BATCH_NORM_TARGET, "RadjaxBatchNorm"),
                         (BATCH_NORM_GRAD_TARGET, "RadjaxBatchNormGrad"),
                         (CONV_TARGET, "RadjaxMklConv"),
                         (CONV_WEIGHT_GRAD_TARGET, "RadjaxMklConvWeightGrad"),
                         (ATTENTION_TARGET, "RadjaxMklAttention"),
                         (ATTENTION_GRAD_TARGET, "RadjaxMklAttentionGrad")):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handler, symbol)), platform="cpu")
  global _handler
  _handler = handler
  return None


_handler = None


def amx_permitted() -> bool:
  """Whether the fused attention's bfloat16 GEMMs can run on AMX tiles here: the handler was built
  for a CPU with AMX and Linux granted this process its tile state (after :func:`register`)."""
  return _handler is not None and bool(_handler.radjax_amx_permitted())


def unavailable_reason() -> str | None:
  """Why radjax's CPU matmuls do not go through MKL here, or None when they do. ``$RADJAX_MKL``:
  unset or "auto" (on Intel CPUs), "off" / "0" (never: XLA's kernels, to compare), "on" / "1"
  (on any x86_64 CPU: for tests)."""
  choice = os.environ.get(ENV, "auto").strip().lower()
  if choice in ("0", "off", "false", "no"):
    return f"${ENV}={choice}"
  if platform.machine() not in ("x86_64", "AMD64"):
    return "not an x86_64 CPU"
  if choice not in ("1", "on", "true", "yes") and hostcpu.host_cpu().get("vendor") != "GenuineIntel":
    return "not an Intel CPU (MKL's bf16 GEMM measured slower than XLA's on AMD)"
  return register()


def enabled() -> bool:
  """Whether radjax's CPU matmuls go through MKL (:func:`unavailable_reason` is None)."""
  return unavailable_reason() is None


def _check_operands(name: str, *xs: jax.Array, ndim: int = 4) -> None:
  if any(x.ndim != ndim for x in xs) or len({x.dtype for x in xs}) != 1 or xs[0].dtype not in (
      jnp.bfloat16, jnp.float32):
    raise ValueError(f"mkl_gemm.{name}: {ndim}-D bfloat16 or float32 operands of one dtype, got "
                     + ", ".join(f"{x.dtype}{list(x.shape)}" for x in xs))


def gemm(a: jax.Array, b: jax.Array, *, transpose_a: bool = False,
         transpose_b: bool = False) -> jax.Array:
  """op(a) @ op(b) in float32 through MKL, op transposing where asked: a [M, K] (or [K, M]),
  b [K, N] (or [N, K]), both bfloat16 or both float32 -> [M, N] float32, accumulated in float32.
  Requires :func:`register` to have succeeded.

  The output stays float32 (weight gradients, small layers); :func:`gemm_bias` adds a bias and
  rounds in the handler, for dense layers' activations."""
  _check_operands("gemm", a, b, ndim=2)
  m, k = (a.shape[1], a.shape[0]) if transpose_a else a.shape
  kb, n = (b.shape[1], b.shape[0]) if transpose_b else b.shape
  if k != kb:
    raise ValueError(f"mkl_gemm: contracting dimensions differ: {a.shape} and {b.shape} "
                     f"(transpose_a={transpose_a}, transpose_b={transpose_b})")
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
  return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def _check_row_gemm(name: str, a: jax.Array, b: jax.Array, transpose_b: bool, other_name: str,
                    other: jax.Array, rows: bool) -> int:
  """N of a [M, K] @ op(b), after checking them and ``other``: [M, N] if ``rows`` else [N]."""
  _check_operands(name, a, b, ndim=2)
  kb, n = (b.shape[1], b.shape[0]) if transpose_b else b.shape
  if a.shape[1] != kb or other.shape != ((a.shape[0], n) if rows else (n,)):
    raise ValueError(f"mkl_gemm.{name}: a {list(a.shape)}, b {list(b.shape)} "
                     f"(transpose_b={transpose_b}) and {other_name} {list(other.shape)} do not match")
  return n


def gemm_bias(a: jax.Array, b: jax.Array, bias: jax.Array, *, transpose_b: bool = False) -> jax.Array:
  """a @ op(b) + bias through MKL, accumulated in float32 and rounded to a's dtype in the handler:
  a [M, K], b [K, N] (or [N, K] with ``transpose_b``), both bfloat16 or both float32, bias [N]
  (cast to float32) -> [M, N] in a's dtype. B is packed once per call and the product stays in
  cache until rounded, so only the result reaches memory. Requires :func:`register`."""
  n = _check_row_gemm("gemm_bias", a, b, transpose_b, "bias", bias, rows=False)
  call = jax.ffi.ffi_call(BIAS_TARGET, jax.ShapeDtypeStruct((a.shape[0], n), a.dtype),
                          vmap_method="sequential")
  return call(a, b, bias.astype(jnp.float32), transpose_b=transpose_b)


def gemm_bias_gelu(a: jax.Array, b: jax.Array, bias: jax.Array, *,
                   transpose_b: bool = False) -> tuple[jax.Array, jax.Array]:
  """A dense layer and its erf GELU in one call, like :func:`gemm_bias`: pre = a @ op(b) + bias
  rounded to a's dtype, and GELU(pre) = pre / 2 (1 + erf(pre / sqrt 2)) computed from it in
  float32 (erf within 1.5e-7 absolute) and rounded; both [M, N] in a's dtype. Returns
  (GELU(pre), pre): :func:`gemm_gelu_grad` takes pre."""
  n = _check_row_gemm("gemm_bias_gelu", a, b, transpose_b, "bias", bias, rows=False)
  out = jax.ShapeDtypeStruct((a.shape[0], n), a.dtype)
  call = jax.ffi.ffi_call(BIAS_GELU_TARGET, (out, out), vmap_method="sequential")
  return call(a, b, bias.astype(jnp.float32), transpose_b=transpose_b)


def gemm_gelu_grad(a: jax.Array, b: jax.Array, pre: jax.Array, *,
                   transpose_b: bool = False) -> tuple[jax.Array, jax.Array]:
  """The backward of :func:`gemm_bias_gelu`'s GELU fused with the GEMM that brings its output's
  cotangent: d = (a @ op(b)) * GELU'(pre), the product in float32, rounded to a's dtype, with
  a [M, K], b [K, N] (or [N, K]) and pre [M, N] of one dtype. Returns (d [M, N], d's column sums
  [N] in float32 before rounding: the bias gradient of the layer that made pre)."""
  n = _check_row_gemm("gemm_gelu_grad", a, b, transpose_b, "pre", pre, rows=True)
  _check_operands("gemm_gelu_grad", a, pre, ndim=2)
  call = jax.ffi.ffi_call(GELU_GRAD_TARGET, (jax.ShapeDtypeStruct((a.shape[0], n), a.dtype),
                                             jax.ShapeDtypeStruct((n,), jnp.float32)),
                          vmap_method="sequential")
  return call(a, b, pre, transpose_b=transpose_b)


def _check_layer_norm(name: str, x: jax.Array, y_like: jax.Array, scale: jax.Array) -> None:
  if (x.ndim != 2 or y_like.shape != x.shape or scale.shape != x.shape[1:]
      or not {x.dtype, y_like.dtype} <= {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}):
    raise ValueError(f"mkl_gemm.{name}: x and y [M, D] (bfloat16 or float32) and scale [D], got "
                     f"{x.dtype}{list(x.shape)}, {y_like.dtype}{list(y_like.shape)}, {list(scale.shape)}")


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float,
               dtype) -> tuple[jax.Array, jax.Array]:
  """LayerNorm over the last dim in one pass per row (the handler in the same library as the
  GEMMs): x [M, D] (bfloat16 or float32), scale and bias [D] (cast to float32) -> y [M, D] in
  ``dtype`` = (x - mean) / sqrt(var + epsilon) * scale + bias, computed in float32 from x as given,
  and stats [M, 2] float32 (mean, 1 / sqrt(var + epsilon)) for :func:`layer_norm_grad`."""
  y = jax.ShapeDtypeStruct(x.shape, dtype)
  _check_layer_norm("layer_norm", x, y, scale)
  if bias.shape != scale.shape:
    raise ValueError(f"mkl_gemm.layer_norm: bias {list(bias.shape)}, expected {list(scale.shape)}")
  call = jax.ffi.ffi_call(LAYER_NORM_TARGET, (y, jax.ShapeDtypeStruct((x.shape[0], 2), jnp.float32)),
                          vmap_method="sequential")
  return call(x, scale.astype(jnp.float32), bias.astype(jnp.float32), epsilon=np.float32(epsilon))


def layer_norm_grad(x: jax.Array, scale: jax.Array, stats: jax.Array,
                    dy: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dx in x's dtype, dscale and dbias [D] float32) of :func:`layer_norm` for the cotangent dy
  [M, D] of its output, given its x, scale and stats."""
  _check_layer_norm("layer_norm_grad", x, dy, scale)
  call = jax.ffi.ffi_call(LAYER_NORM_GRAD_TARGET, (jax.ShapeDtypeStruct(x.shape, x.dtype),)
                          + (jax.ShapeDtypeStruct(scale.shape, jnp.float32),) * 2,
                          vmap_method="sequential")
  return call(x, scale.astype(jnp.float32), stats.astype(jnp.float32), dy)


def _check_batch_norm(name: str, x: jax.Array, scale: jax.Array, *like_x: jax.Array | None) -> None:
  if x.ndim != 2 or scale.shape != x.shape[1:] or any(
      a is not None and (a.shape != x.shape or a.dtype != x.dtype) for a in like_x):
    raise ValueError(f"mkl_gemm.{name}: x [M, C], per-channel vectors [C] and [M, C] arrays in "
                     f"x's dtype expected, got x {list(x.shape)} {x.dtype}, vector "
                     f"{list(scale.shape)}, arrays "
                     f"{[(list(a.shape), str(a.dtype)) for a in like_x if a is not None]}")


def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, residual: jax.Array | None = None,
               *, epsilon: float, relu: bool) -> tuple[jax.Array, jax.Array]:
  """Training-mode BatchNorm over the rows of x [M, C] (bfloat16 or float32), one pass for the
  moments and one for the output: y [M, C] in x's dtype = (x - mean) / sqrt(var + epsilon) *
  scale + bias (+ residual [M, C] in x's dtype; then max(., 0) with ``relu``), computed in
  float32, and moments [2, C] float32 = (batch mean, biased batch variance E[x^2] - E[x]^2)."""
  _check_batch_norm("batch_norm", x, scale, residual)
  if bias.shape != scale.shape:
    raise ValueError(f"mkl_gemm.batch_norm: bias {list(bias.shape)}, expected {list(scale.shape)}")
  call = jax.ffi.ffi_call(BATCH_NORM_TARGET, (jax.ShapeDtypeStruct(x.shape, x.dtype),
                                              jax.ShapeDtypeStruct((2, x.shape[1]), jnp.float32)),
                          vmap_method="sequential")
  no_residual = jnp.zeros((0,), x.dtype)  # the handler's "none"
  return call(x, scale.astype(jnp.float32), bias.astype(jnp.float32),
              no_residual if residual is None else residual, epsilon=np.float32(epsilon), relu=relu)


def batch_norm_grad(x: jax.Array, scale: jax.Array, moments: jax.Array, y: jax.Array, dy: jax.Array,
                    *, epsilon: float, relu: bool, residual: bool
                    ) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array]:
  """The backward of :func:`batch_norm` for the cotangent dy [M, C] of its output y: (dx, the
  residual's cotangent (dy through the ReLU; None without ``residual``), dscale [C] float32,
  dbias [C] float32), given its x, scale and moments. y is read for the ReLU's mask."""
  _check_batch_norm("batch_norm_grad", x, scale, y, dy)
  rows = x.shape if residual else (0,)
  call = jax.ffi.ffi_call(BATCH_NORM_GRAD_TARGET,
                          (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(rows, x.dtype))
                          + (jax.ShapeDtypeStruct(scale.shape, jnp.float32),) * 2,
                          vmap_method="sequential")
  dx, dresidual, dscale, dbias = call(x, scale.astype(jnp.float32), moments.astype(jnp.float32), y, dy,
                                      epsilon=np.float32(epsilon), relu=relu)
  return dx, dresidual if residual else None, dscale, dbias


def conv(x_padded: jax.Array, kernel: jax.Array, *, flip: bool = False,
         transpose_kernel: bool = False) -> jax.Array:
  """A stride-1 2-D convolution through MKL as kh * kw GEMMs over shifted rows of the input (no
  patches built): x_padded [B, Hp, Wp, C] (the input with its zero padding), kernel [kh, kw, C, N]
  (``transpose_kernel``: [kh, kw, N, C], each tap transposed; ``flip``: taps in reverse order)
  -> [B, Hp, Wp, N] float32 on x's "wide" grid: [:, :Hp - kh + 1, :Wp - kw + 1] is the
  convolution, the rest garbage (zeros in the last rows). The input gradient of a convolution is
  this on its padded cotangent with ``flip`` and ``transpose_kernel``."""
  _check_operands("conv", x_padded, kernel)
  kh, kw = kernel.shape[:2]
  c, n = kernel.shape[2:][::-1] if transpose_kernel else kernel.shape[2:]
  if x_padded.shape[3] != c or x_padded.shape[1] < kh or x_padded.shape[2] < kw:
    raise ValueError(f"mkl_gemm.conv: input {list(x_padded.shape)} does not fit kernel "
                     f"{list(kernel.shape)} (transpose_kernel={transpose_kernel})")
  call = jax.ffi.ffi_call(CONV_TARGET, jax.ShapeDtypeStruct(x_padded.shape[:3] + (n,), jnp.float32),
                          vmap_method="sequential")
  return call(x_padded, kernel, flip=flip, transpose_w=transpose_kernel)


def conv_kernel_grad(x_padded: jax.Array, g_wide: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
  """The kernel gradient of :func:`conv`: x_padded [B, Hp, Wp, C] and the cotangent on the same
  wide grid, g_wide [B, Hp, Wp, O], zero outside its [:Hp - kh + 1, :Wp - kw + 1] corner
  -> [kh, kw, C, O] float32."""
  _check_operands("conv_kernel_grad", x_padded, g_wide)
  if x_padded.shape[:3] != g_wide.shape[:3]:
    raise ValueError(f"mkl_gemm.conv_kernel_grad: input {list(x_padded.shape)} and cotangent "
                     f"{list(g_wide.shape)} are not on one grid")
  kh, kw = kernel_size
  shape = (kh, kw, x_padded.shape[3], g_wide.shape[3])
  call = jax.ffi.ffi_call(CONV_WEIGHT_GRAD_TARGET, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")
  return call(x_padded, g_wide)


def _attention_operands(q, k, v, mask):
  """The mask as bool [Bm, Nm, Tm, Sm] (each 1 or the full size; None: one True) after checking
  q [B, T, N, H], k and v [B, S, N, H]."""
  _check_operands("attention", q, k, v)
  (b, t, n, h), s = q.shape, k.shape[1]
  if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (n, h) or 0 in (t, s, h):
    raise ValueError(f"mkl_gemm.attention: q [B, T, N, H], k and v [B, S, N, H], none empty, got "
                     f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
  mask = jnp.ones((1, 1, 1, 1), bool) if mask is None else mask.astype(bool)
  mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  if any(m not in (1, full) for m, full in zip(mask.shape, (b, n, t, s))):
    raise ValueError(f"mkl_gemm.attention: mask {list(mask.shape)} is not broadcastable to "
                     f"[B, N, T, S] = {[b, n, t, s]}")
  return mask


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *, causal: bool,
              scale: float, amx: bool = True) -> tuple[jax.Array, jax.Array]:
  """Softmax attention through MKL, fused per (batch, head): q [B, T, N, H], k and v [B, S, N, H]
  (bfloat16 or float32), mask bool broadcastable to [B, N, T, S] (True = attend) or None, causal:
  key j attends to query i when j <= i + S - T. Logits are ``scale`` q k^T in float32, softmax in
  float32, its probabilities rounded to q's dtype for the product with v. With ``amx`` the
  handler's own AMX tile GEMMs replace MKL's where :func:`amx_permitted` and the operands are
  bfloat16 with H a multiple of 32 (the same float32 sums of bfloat16 products); False compares.

  Returns o [B, T, N, H] in q's dtype and stats [B, N, T, 2] float32 (each row's max logit and
  1 / sum of exponentials), which :func:`attention_grad` takes."""
  mask = _attention_operands(q, k, v, mask)
  b, t, n, _ = q.shape
  call = jax.ffi.ffi_call(ATTENTION_TARGET, (jax.ShapeDtypeStruct(q.shape, q.dtype),
                                             jax.ShapeDtypeStruct((b, n, t, 2), jnp.float32)),
                          vmap_method="sequential")
  return call(q, k, v, mask, causal=bool(causal), scale=np.float32(scale), amx=bool(amx))


def attention_grad(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, o: jax.Array,
                   stats: jax.Array, d_o: jax.Array, *, causal: bool, scale: float,
                   amx: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dq, dk, dv) of :func:`attention` for the cotangent d_o [B, T, N, H] of its output o, given
  the same q, k, v, mask, causal, scale and amx and its stats; each in q's dtype. The
  probabilities are recomputed (one more q k^T), not stored."""
  mask = _attention_operands(q, k, v, mask)
  if o.shape != q.shape or d_o.shape != q.shape or o.dtype != q.dtype or d_o.dtype != q.dtype:
    raise ValueError(f"mkl_gemm.attention_grad: o and d_o like q {q.dtype}{list(q.shape)}, got "
                     f"{o.dtype}{list(o.shape)} and {d_o.dtype}{list(d_o.shape)}")
  call = jax.ffi.ffi_call(ATTENTION_GRAD_TARGET,
                          tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)),
                          vmap_method="sequential")
  return call(q, k, v, mask, o, stats.astype(jnp.float32), d_o, causal=bool(causal),
              scale=np.float32(scale), amx=bool(amx))


# A compiled GEMM call in HLO text: its (first) output's dims and, among the operand layouts, a's dims.
_HLO_CALL = re.compile(r"= \(?\w+\[([\d,]+)\][^\n]*? custom-call\([^\n]*custom_call_target=\"(?:"
                       + "|".join((TARGET, BIAS_TARGET, BIAS_GELU_TARGET, GELU_GRAD_TARGET))
                       + r")\"[^\n]*operand_layout_constraints=\{\w+\[([\d,]+)\]")


# A compiled convolution call: its target, output dims and its two operands' dims.
_HLO_CONV = re.compile(r"= f32\[([\d,]+)\]\S* custom-call\([^\n]*custom_call_target=\"("
                       + CONV_TARGET + "|" + CONV_WEIGHT_GRAD_TARGET
                       + r")\"[^\n]*operand_layout_constraints=\{\w+\[([\d,]+)\]\{[\d,]*\}, \w+\[([\d,]+)\]")


# A compiled attention call: its target and the dims of q [B, T, N, H] and k [B, S, N, H].
_HLO_ATTENTION = re.compile(r"custom_call_target=\"(" + ATTENTION_TARGET + "|" + ATTENTION_GRAD_TARGET
                            + r")\"[^\n]*operand_layout_constraints=\{\w+\[([\d,]+)\]\{[\d,]*\}, \w+\[([\d,]+)\]")

# GEMMs of T x S x H per (batch, head): q k^T and p v forward; the backward recomputes q k^T and
# adds do v^T, p^T do, dS k and dS^T q.
_ATTENTION_GEMMS = {ATTENTION_TARGET: 2, ATTENTION_GRAD_TARGET: 5}


def hlo_flops(hlo_text: str) -> float:
  """FLOPs of the MKL calls in a compiled program's HLO text, which XLA's cost analysis counts as
  none: for a GEMM 2 M N K, i.e. twice a's element count (M K, transposed or not) times the
  output's last dim; for a convolution its useful products (not the wide grid's); for attention
  2 T S H per GEMM and (batch, head), causal or not (MKL computes the masked logits too)."""
  total = 0
  for out_dims, a_dims in _HLO_CALL.findall(hlo_text):
    total += 2 * math.prod(int(d) for d in a_dims.split(",")) * int(out_dims.split(",")[-1])
  for out_dims, target, x_dims, w_dims in _HLO_CONV.findall(hlo_text):
    out, x, w = ([int(d) for d in dims.split(",")] for dims in (out_dims, x_dims, w_dims))
    if target == CONV_TARGET:  # w is the kernel [kh, kw, ., .]; out [B, Hp, Wp, N]
      (kh, kw), (batch, hp, wp, c), n = w[:2], x, out[3]
    else:  # w is the cotangent [B, Hp, Wp, O]; out the kernel [kh, kw, C, O]
      kh, kw, c, n = out
      batch, hp, wp = x[:3]
    total += 2 * batch * (hp - kh + 1) * (wp - kw + 1) * kh * kw * c * n
  for target, q_dims, k_dims in _HLO_ATTENTION.findall(hlo_text):
    q_shape = [int(d) for d in q_dims.split(",")]
    total += 2 * _ATTENTION_GEMMS[target] * math.prod(q_shape) * int(k_dims.split(",")[1])
  return float(total)
