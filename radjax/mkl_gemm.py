"""Intel MKL's GEMMs as XLA custom calls, for radjax's CPU matmuls on Intel CPUs: dense layers and
matmul convolutions (:func:`gemm`), attention's batched products (:func:`batched_gemm`) and
stride-1 convolutions as shifted GEMMs (:func:`conv`, :func:`conv_kernel_grad`).

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

The handler runs MKL sequentially on tiles of the output, spread over XLA's own intra-op thread
pool, so MKL starts no threads of its own to compete with XLA's.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from radjax import compile_cache, hostcpu

TARGET = "radjax_mkl_gemm"
BATCHED_TARGET = "radjax_mkl_batched_gemm"
CONV_TARGET = "radjax_mkl_conv"
CONV_WEIGHT_GRAD_TARGET = "radjax_mkl_conv_weight_grad"
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


def build_handler(out_dir: str | None = None) -> str:
  """Compiles ``native/mkl_gemm.cc`` into a shared library (once: the file name carries a hash of
  the source, jaxlib's version and the compiler) and returns its path. Raises RuntimeError with
  the compiler's message when it cannot be built."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  compiler = os.environ.get("CXX", "g++")
  with open(_SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(source + jaxlib.__version__.encode() + compiler.encode()).hexdigest()[:16]
  out_dir = out_dir or os.path.join(compile_cache.user_cache_dir(), "native")
  path = os.path.join(out_dir, f"mkl_gemm-{key}.so")
  if os.path.exists(path):
    return path
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
  os.makedirs(out_dir, exist_ok=True)
  # Built under a temporary name and renamed: processes building at once each get a whole file.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-I", jax.ffi.include_dir(),
         _SOURCE, "-o", tmp]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


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
  handler.radjax_mkl_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
  handler.radjax_mkl_init(address(mkl.cblas_gemm_bf16bf16f32), address(mkl.cblas_sgemm))
  for target, symbol in ((TARGET, "RadjaxMklGemm"), (BATCHED_TARGET, "RadjaxMklBatchedGemm"),
                         (CONV_TARGET, "RadjaxMklConv"),
                         (CONV_WEIGHT_GRAD_TARGET, "RadjaxMklConvWeightGrad")):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handler, symbol)), platform="cpu")
  return None


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


def gemm(a: jax.Array, b: jax.Array, *, transpose_a: bool = False,
         transpose_b: bool = False) -> jax.Array:
  """op(a) @ op(b) in float32 through MKL, op transposing where asked: a [M, K] (or [K, M]),
  b [K, N] (or [N, K]), both bfloat16 or both float32 -> [M, N] float32, accumulated in float32.
  Requires :func:`register` to have succeeded.

  The output stays float32: a bias and the rounding to bfloat16 are left to XLA, which fuses them
  with what follows (done in the handler instead, the ViT-B/16 bf16 step ran 5-14 % slower)."""
  if a.ndim != 2 or b.ndim != 2 or a.dtype != b.dtype or a.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"mkl_gemm: two 2-D bfloat16 or float32 operands of one dtype, got "
                     f"{a.dtype}{list(a.shape)} and {b.dtype}{list(b.shape)}")
  m, k = (a.shape[1], a.shape[0]) if transpose_a else a.shape
  kb, n = (b.shape[1], b.shape[0]) if transpose_b else b.shape
  if k != kb:
    raise ValueError(f"mkl_gemm: contracting dimensions differ: {a.shape} and {b.shape} "
                     f"(transpose_a={transpose_a}, transpose_b={transpose_b})")
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
  return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def _matrices(x: jax.Array, heads_first: bool) -> tuple[int, int, int, int]:
  """(batch, heads, rows, cols) of a 4-D operand [B, H, R, C] (heads_first) or [B, R, H, C]."""
  b, d1, d2, c = x.shape
  return (b, d1, d2, c) if heads_first else (b, d2, d1, c)


def batched_gemm(a: jax.Array, b: jax.Array, *, transpose_a: bool = False, transpose_b: bool = False,
                 a_heads_first: bool = True, b_heads_first: bool = True,
                 out_heads_first: bool = True) -> jax.Array:
  """op(a) @ op(b) for every (batch, head) matrix, in float32 through MKL, as :func:`gemm` does for
  one. Each operand and the output is 4-D, [B, H, R, C] (``*_heads_first``) or [B, R, H, C], the
  layout attention's q/k/v come in: MKL reads and writes those matrices in place, so no transpose
  of the heads is materialised. Output [B, H, M, N] or [B, M, H, N] float32. Requires
  :func:`register` to have succeeded."""
  if a.ndim != 4 or b.ndim != 4 or a.dtype != b.dtype or a.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"mkl_gemm: two 4-D bfloat16 or float32 operands of one dtype, got "
                     f"{a.dtype}{list(a.shape)} and {b.dtype}{list(b.shape)}")
  batch, heads, rows, cols = _matrices(a, a_heads_first)
  b_batch, b_heads, b_rows, b_cols = _matrices(b, b_heads_first)
  m, k = (cols, rows) if transpose_a else (rows, cols)
  kb, n = (b_cols, b_rows) if transpose_b else (b_rows, b_cols)
  if k != kb or (batch, heads) != (b_batch, b_heads):
    raise ValueError(f"mkl_gemm: batched operands do not match: {a.shape} and {b.shape} "
                     f"(transpose_a={transpose_a}, transpose_b={transpose_b})")
  shape = (batch, heads, m, n) if out_heads_first else (batch, m, heads, n)
  call = jax.ffi.ffi_call(BATCHED_TARGET, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")
  return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b, a_heads_first=a_heads_first,
              b_heads_first=b_heads_first, out_heads_first=out_heads_first)


def _check_operands(name: str, *xs: jax.Array) -> None:
  if any(x.ndim != 4 for x in xs) or len({x.dtype for x in xs}) != 1 or xs[0].dtype not in (
      jnp.bfloat16, jnp.float32):
    raise ValueError(f"mkl_gemm.{name}: 4-D bfloat16 or float32 operands of one dtype, got "
                     + ", ".join(f"{x.dtype}{list(x.shape)}" for x in xs))


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


# A compiled call in HLO text: its float32 output's dims and, among the operand layouts, a's dims.
_HLO_CALL = re.compile(r"= f32\[([\d,]+)\]\S* custom-call\([^\n]*custom_call_target=\"(?:"
                       + TARGET + "|" + BATCHED_TARGET
                       + r")\"[^\n]*operand_layout_constraints=\{\w+\[([\d,]+)\]")


# A compiled convolution call: its target, output dims and its two operands' dims.
_HLO_CONV = re.compile(r"= f32\[([\d,]+)\]\S* custom-call\([^\n]*custom_call_target=\"("
                       + CONV_TARGET + "|" + CONV_WEIGHT_GRAD_TARGET
                       + r")\"[^\n]*operand_layout_constraints=\{\w+\[([\d,]+)\]\{[\d,]*\}, \w+\[([\d,]+)\]")


def hlo_flops(hlo_text: str) -> float:
  """FLOPs of the MKL GEMMs in a compiled program's HLO text, which XLA's cost analysis counts as
  none: 2 M N K per matrix, i.e. twice a's element count (M K per matrix, transposed or not) times
  the output's last dim (N, in every layout)."""
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
  return float(total)
