"""radjax/mkl_gemm.py: MKL's GEMMs as an XLA custom call, against NumPy and against XLA's path.

MKL is in the test extras on x86_64 Linux, so these run there on any CPU (``$RADJAX_MKL=on``
forces the path where the Intel-only default would not take it); elsewhere they skip.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from radjax import hostcpu, mkl_gemm
from radjax.models import layers

pytestmark = pytest.mark.skipif(mkl_gemm.find_mkl() is None, reason="MKL is not installed")


@pytest.fixture(scope="module", autouse=True)
def registered():
  assert mkl_gemm.register() is None


def _reference(a, b, transpose_a, transpose_b):
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return (a64.T if transpose_a else a64) @ (b64.T if transpose_b else b64)


# (M, K, N): tiles split rows (M >= N) or columns, sizes off the 64 grid, one tile, empty sums.
SHAPES = [(200, 96, 70), (33, 50, 300), (1, 7, 1), (130, 1, 129), (64, 0, 5), (0, 3, 4)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_matches_numpy(dtype, transpose_a, transpose_b):
  rng = np.random.default_rng(0)
  for m, k, n in SHAPES:
    a = jnp.asarray(rng.standard_normal((k, m) if transpose_a else (m, k)), dtype)
    b = jnp.asarray(rng.standard_normal((n, k) if transpose_b else (k, n)), dtype)
    got = jax.jit(lambda x, y: mkl_gemm.gemm(x, y, transpose_a=transpose_a, transpose_b=transpose_b))(a, b)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    # The operands are exact in float64; float32 accumulation over K terms of size ~1.
    np.testing.assert_allclose(np.asarray(got), _reference(a, b, transpose_a, transpose_b),
                               rtol=0, atol=1e-5 * max(k, 1))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (True, False), (False, True), (True, True)])
def test_batched_gemm_matches_numpy(dtype, transpose_a, transpose_b):
  """Every layout of operands and output ([B, H, R, C] or [B, R, H, C]), both transposes, a
  matrix count (B H = 2 x 3) that does not split evenly over the threads, and empty sums."""
  rng = np.random.default_rng(1)
  batch, heads = 2, 3
  for m, k, n in [(5, 7, 4), (1, 3, 9), (4, 0, 2)]:
    for a_first, b_first, out_first in np.ndindex(2, 2, 2):
      def operand(rows, cols, heads_first):
        shape = (batch, heads, rows, cols) if heads_first else (batch, rows, heads, cols)
        x = jnp.asarray(rng.standard_normal(shape), dtype)
        as_bhrc = np.asarray(x, np.float64) if heads_first else np.asarray(x, np.float64).transpose(0, 2, 1, 3)
        return x, as_bhrc
      a, a64 = operand(*((k, m) if transpose_a else (m, k)), a_first)
      b, b64 = operand(*((n, k) if transpose_b else (k, n)), b_first)
      want = (a64.swapaxes(-1, -2) if transpose_a else a64) @ (b64.swapaxes(-1, -2) if transpose_b else b64)
      got = jax.jit(lambda x, y: mkl_gemm.batched_gemm(
          x, y, transpose_a=transpose_a, transpose_b=transpose_b, a_heads_first=bool(a_first),
          b_heads_first=bool(b_first), out_heads_first=bool(out_first)))(a, b)
      got = np.asarray(got) if out_first else np.asarray(got).transpose(0, 2, 1, 3)
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(k, 1))


def test_attention_through_mkl_transposes_no_heads(monkeypatch):
  """CPU attention's forward and backward through MKL: six batched GEMMs (q k^T, p v; dp, dq, dk,
  dv) on the [B, T, N, H] operands, and none of the XLA path's head transposes."""
  from radjax.models import transformer
  monkeypatch.setenv(mkl_gemm.ENV, "on")
  q = jnp.ones((2, 5, 3, 8), jnp.bfloat16)
  grad = jax.grad(lambda q, k, v: jnp.sum(transformer.cpu_attention(q, k, v, None, False).astype(jnp.float32)),
                  argnums=(0, 1, 2))
  text = jax.jit(grad).lower(q, q, q).as_text()
  assert text.count(f"@{mkl_gemm.BATCHED_TARGET}(") == 6
  # Only the [B, T, N] softmax row sums are transposed, never a 4-D operand.
  assert not re.search(r"stablehlo.transpose [^\n]*-> tensor<\d+x\d+x\d+x\d+x", text), text


def test_hlo_flops_counts_the_custom_calls():
  """XLA's cost analysis counts no FLOPs for a custom call; hlo_flops counts 2 M N K per matrix."""
  def program(a, b, q):
    return (mkl_gemm.gemm(a, b, transpose_a=True).sum()
            + mkl_gemm.batched_gemm(q, q, transpose_b=True, a_heads_first=False, b_heads_first=False).sum())

  shapes = (jnp.ones((8, 16), jnp.float32), jnp.ones((8, 4), jnp.float32), jnp.ones((2, 5, 3, 4), jnp.float32))
  hlo = jax.jit(program).lower(*shapes).compile().as_text()
  assert mkl_gemm.hlo_flops(hlo) == 2 * 16 * 4 * 8 + 2 * (2 * 3) * 5 * 5 * 4


def test_hlo_flops_counts_the_useful_convolution():
  """A convolution's calls count the 2 B H' W' kh kw C N FLOPs of the convolution, not those of
  the padded grid they compute on."""
  x = jnp.ones((2, 9, 8, 3), jnp.bfloat16)
  kernel = jnp.ones((3, 2, 3, 5), jnp.bfloat16)
  conv_out = (2, 7, 7, 5)
  program = lambda x, k: (mkl_gemm.conv(x, k).sum()
                          + mkl_gemm.conv_kernel_grad(x, jnp.ones(x.shape[:3] + (5,), x.dtype), (3, 2)).sum())
  hlo = jax.jit(program).lower(x, kernel).compile().as_text()
  assert mkl_gemm.hlo_flops(hlo) == 2 * (2 * np.prod(conv_out) * 3 * 2 * 3)


def _numpy_conv(x_padded, kernel):
  """Stride-1 valid correlation in float64: x_padded [B, Hp, Wp, C], kernel [kh, kw, C, N]."""
  x64, k64 = np.asarray(x_padded, np.float64), np.asarray(kernel, np.float64)
  kh, kw = k64.shape[:2]
  out_h, out_w = x64.shape[1] - kh + 1, x64.shape[2] - kw + 1
  out = np.zeros((x64.shape[0], out_h, out_w, k64.shape[3]))
  for i in range(kh):
    for j in range(kw):
      out += x64[:, i:i + out_h, j:j + out_w] @ k64[i, j]
  return out


# (B, Hp, Wp, C, N, kh, kw): square and oblong kernels, one tap, rows that split unevenly over
# the threads and into several row blocks, no input channels.
CONV_SHAPES = [(2, 7, 9, 5, 6, 3, 3), (3, 8, 6, 4, 7, 5, 3), (1, 5, 5, 2, 3, 1, 1),
               (2, 40, 70, 16, 8, 3, 3), (2, 5, 6, 0, 3, 3, 3)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_conv_and_its_gradients_match_numpy(dtype):
  """conv on the wide grid (the convolution in its corner, zeros in the last rows), the input
  gradient as conv of the padded cotangent with the flipped, transposed kernel, and the kernel
  gradient, against NumPy loops over the taps."""
  rng = np.random.default_rng(2)
  for batch, hp, wp, c, n, kh, kw in CONV_SHAPES:
    x = jnp.asarray(rng.standard_normal((batch, hp, wp, c)), dtype)
    kernel = jnp.asarray(rng.standard_normal((kh, kw, c, n)), dtype)
    out_h, out_w = hp - kh + 1, wp - kw + 1
    atol = 1e-5 * max(kh * kw * c, 1)
    wide = np.asarray(jax.jit(mkl_gemm.conv)(x, kernel))
    assert wide.shape == (batch, hp, wp, n) and wide.dtype == np.float32
    np.testing.assert_allclose(wide[:, :out_h, :out_w], _numpy_conv(x, kernel), rtol=0, atol=atol)
    tail = (kh - 1) * wp + kw - 1  # rows no tap can read whole
    assert not wide.reshape(-1, n)[wide.reshape(-1, n).shape[0] - tail:].any()

    # The input gradient: full correlation of the cotangent with the flipped kernel.
    g = jnp.asarray(rng.standard_normal((batch, out_h, out_w, n)), dtype)
    g_padded = jnp.pad(g, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
    dx = jax.jit(lambda g_, k_: mkl_gemm.conv(g_, k_, flip=True, transpose_kernel=True))(g_padded, kernel)
    flipped = np.asarray(kernel, np.float64)[::-1, ::-1].transpose(0, 1, 3, 2)
    np.testing.assert_allclose(np.asarray(dx)[:, :hp, :wp], _numpy_conv(g_padded, flipped),
                               rtol=0, atol=1e-5 * max(kh * kw * n, 1))

    g_wide = jnp.pad(g, ((0, 0), (0, kh - 1), (0, kw - 1), (0, 0)))
    dk = jax.jit(lambda x_, g_: mkl_gemm.conv_kernel_grad(x_, g_, (kh, kw)))(x, g_wide)
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    want = np.stack([np.stack([np.einsum("bhwc,bhwn->cn", x64[:, i:i + out_h, j:j + out_w], g64)
                               for j in range(kw)]) for i in range(kh)])
    np.testing.assert_allclose(np.asarray(dk), want, rtol=0, atol=1e-5 * batch * out_h * out_w)


def test_conv_refuses_what_it_cannot_convolve():
  x = jnp.ones((1, 5, 5, 3), jnp.float32)
  with pytest.raises(ValueError, match="does not fit"):
    mkl_gemm.conv(x, jnp.ones((3, 3, 4, 2), jnp.float32))
  with pytest.raises(ValueError, match="does not fit"):
    mkl_gemm.conv(x, jnp.ones((6, 1, 3, 2), jnp.float32))
  with pytest.raises(ValueError, match="one dtype"):
    mkl_gemm.conv(x, jnp.ones((3, 3, 3, 2), jnp.bfloat16))
  with pytest.raises(ValueError, match="one grid"):
    mkl_gemm.conv_kernel_grad(x, jnp.ones((1, 5, 4, 2), jnp.float32), (3, 3))


def test_gemm_refuses_what_it_cannot_multiply():
  a = jnp.ones((4, 3), jnp.float32)
  with pytest.raises(ValueError, match="contracting dimensions differ"):
    mkl_gemm.gemm(a, jnp.ones((4, 5), jnp.float32))
  with pytest.raises(ValueError, match="one dtype"):
    mkl_gemm.gemm(a, jnp.ones((3, 5), jnp.bfloat16))
  with pytest.raises(ValueError, match="2-D"):
    mkl_gemm.gemm(jnp.ones((2, 4, 3)), jnp.ones((3, 5)))


def _value_and_grads(make_layer, x_shape, dtype):
  """A layer's loss and its gradients for the parameters and the input, and the program."""
  graphdef, params = nnx.split(make_layer(dtype))
  x = jax.random.normal(jax.random.key(1), x_shape, jnp.float32)

  def loss(params, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x.astype(dtype)).astype(jnp.float32)))

  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  value, (param_grads, x_grad) = f(params, x)
  grads = [param_grads["kernel"][...], param_grads["bias"][...], x_grad]
  return value, grads, f.lower(params, x).as_text()


LAYERS = {
    "linear": (lambda dtype: layers.linear(96, 80, ("embed", "mlp"), rngs=nnx.Rngs(0), dtype=dtype),
               (3, 70, 96)),
    # 12x12 padded to 14x14: the shifted-GEMM path; 6x6 padded to 8x8 is mostly border, and
    # takes the patches' GEMMs.
    "conv3x3": (lambda dtype: layers.Conv(6, 10, (3, 3), padding="SAME", dtype=dtype, rngs=nnx.Rngs(0)),
                (2, 12, 12, 6)),
    "conv3x3_small_map": (lambda dtype: layers.Conv(6, 10, (3, 3), padding="SAME", dtype=dtype,
                                                    rngs=nnx.Rngs(0)), (2, 6, 6, 6)),
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_through_mkl_match_xla(name, dtype, monkeypatch):
  """A Linear's and a patch-matmul convolution's value and gradients (kernel, bias, input) are
  the same through MKL as through XLA's dots, up to the order of float32 sums; the program holds
  the custom call only when MKL is on."""
  make_layer, x_shape = LAYERS[name]
  monkeypatch.setenv(mkl_gemm.ENV, "on")
  assert layers.cpu_matmul_path() == "MKL"
  value_mkl, grads_mkl, hlo_mkl = _value_and_grads(make_layer, x_shape, dtype)
  monkeypatch.setenv(mkl_gemm.ENV, "off")
  assert layers.cpu_matmul_path() == f"XLA (not MKL: ${mkl_gemm.ENV}=off)"
  value_xla, grads_xla, hlo_xla = _value_and_grads(make_layer, x_shape, dtype)
  assert mkl_gemm.TARGET not in hlo_xla
  # A Linear: the forward pass, dx and dW, one GEMM each; a convolution on a large enough map
  # the same as shifted GEMMs; on a small one at least its dW as one GEMM.
  calls = {target: hlo_mkl.count(f"@{target}(") for target in (
      mkl_gemm.TARGET, mkl_gemm.CONV_TARGET, mkl_gemm.CONV_WEIGHT_GRAD_TARGET)}
  if name == "linear":
    assert calls == {mkl_gemm.TARGET: 3, mkl_gemm.CONV_TARGET: 0, mkl_gemm.CONV_WEIGHT_GRAD_TARGET: 0}, hlo_mkl
  elif name == "conv3x3":
    assert calls == {mkl_gemm.TARGET: 0, mkl_gemm.CONV_TARGET: 2, mkl_gemm.CONV_WEIGHT_GRAD_TARGET: 1}, hlo_mkl
  else:
    assert calls[mkl_gemm.TARGET] >= 1 and calls[mkl_gemm.CONV_TARGET] == 0, hlo_mkl
  tol = 1e-2 if dtype == "bfloat16" else 1e-5
  np.testing.assert_allclose(value_mkl, value_xla, rtol=tol)
  for got, want in zip(grads_mkl, grads_xla):
    scale = float(jnp.abs(want.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0,
                               atol=tol * scale)


def test_default_is_intel_only(monkeypatch):
  monkeypatch.delenv(mkl_gemm.ENV, raising=False)
  intel = hostcpu.host_cpu().get("vendor") == "GenuineIntel"
  reason = mkl_gemm.unavailable_reason()
  assert (reason is None) == intel, reason
  if not intel:
    assert "not an Intel CPU" in reason


def test_build_reports_a_compiler_error(tmp_path, monkeypatch):
  monkeypatch.setenv("CXX", "radjax-no-such-compiler")
  with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'radjax-no-such-compiler'"):
    mkl_gemm.build_handler(str(tmp_path))
  monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
  with pytest.raises(RuntimeError, match="failed"):
    mkl_gemm.build_handler(str(tmp_path))
  assert list(tmp_path.iterdir()) == []  # no partial library left behind
