"""radjax/mkl_gemm.py: MKL's GEMMs as an XLA custom call, against NumPy and against XLA's path.

MKL is in the test extras on x86_64 Linux, so these run there on any CPU (``$RADJAX_MKL=on``
forces the path where the Intel-only default would not take it); elsewhere they skip.
"""

import math
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
# (M, K, N). K >= 2 max(M, N) (a weight gradient's form) splits K over the threads, the others
# split M or N; K = 7 is one K part, K = 700 and 1000 two.
SHAPES = [(200, 96, 70), (33, 50, 300), (1, 7, 1), (130, 1, 129), (64, 0, 5), (0, 3, 4),
          (24, 700, 40), (5, 1000, 3)]


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
def test_gemm_bias_matches_numpy(dtype):
  """a @ op(b) + bias rounded to a's dtype: rows over several threads' tiles and 256-row blocks
  (1000, 3152), a ragged last block, fewer rows than threads, one column, K = 0."""
  rng = np.random.default_rng(3)
  for m, k, n, transpose_b in [(1000, 96, 70, False), (600, 33, 300, True), (5, 7, 1, False),
                               (3152, 64, 40, True), (513, 0, 6, False)]:
    a = jnp.asarray(rng.standard_normal((m, k)), dtype)
    b = jnp.asarray(rng.standard_normal((n, k) if transpose_b else (k, n)), dtype)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    got = jax.jit(lambda x, y, c: mkl_gemm.gemm_bias(x, y, c, transpose_b=transpose_b))(a, b, bias)
    assert got.shape == (m, n) and got.dtype == a.dtype
    want = _reference(a, b, False, transpose_b) + np.asarray(bias)
    # float32 sums, then one rounding to the output dtype (bf16: 2^-9 relative).
    tol = 2.0 ** -8 if dtype == "bfloat16" else 0.0
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=1e-5 * max(k, 1))


def test_gemm_bias_refuses_what_it_cannot_multiply():
  a = jnp.ones((4, 3), jnp.float32)
  with pytest.raises(ValueError, match="do not match"):
    mkl_gemm.gemm_bias(a, jnp.ones((3, 5), jnp.float32), jnp.ones((4,)))
  with pytest.raises(ValueError, match="do not match"):
    mkl_gemm.gemm_bias(a, jnp.ones((3, 5), jnp.float32), jnp.ones((5,)), transpose_b=True)
  with pytest.raises(ValueError, match="one dtype"):
    mkl_gemm.gemm_bias(a, jnp.ones((3, 5), jnp.bfloat16), jnp.ones((5,)))


def _numpy_gelu_and_slope(h):
  """The erf GELU and its derivative in float64."""
  cdf = 0.5 * (1.0 + np.vectorize(math.erf)(h / math.sqrt(2.0)))
  return h * cdf, cdf + h * np.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)


# (M, K, N, transpose_b): rows over several tiles and 256-row blocks with a ragged last one, fewer
# rows than threads, one column, K = 0.
GELU_SHAPES = [(600, 33, 300, True), (1000, 96, 70, False), (5, 7, 1, False), (513, 0, 6, True)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gemm_bias_gelu_matches_numpy(dtype):
  """pre = a @ op(b) + bias rounded to a's dtype, and GELU(pre) rounded: the erf GELU of the
  rounded pre, to float32's accuracy before the rounding; the negative tail (pre down to -12,
  where 1 + erf cancels in XLA's formula) to a relative 1e-3 in float32."""
  rng = np.random.default_rng(4)
  for m, k, n, transpose_b in GELU_SHAPES:
    a = jnp.asarray(rng.standard_normal((m, k)), dtype)
    b = jnp.asarray(rng.standard_normal((n, k) if transpose_b else (k, n)), dtype)
    bias = jnp.asarray(rng.uniform(-12, 6, n), jnp.float32)
    out, pre = jax.jit(lambda x, y, c: mkl_gemm.gemm_bias_gelu(x, y, c, transpose_b=transpose_b))(a, b, bias)
    assert out.shape == pre.shape == (m, n) and out.dtype == pre.dtype == a.dtype
    want_pre = _reference(a, b, False, transpose_b) + np.asarray(bias)
    rounding = 2.0 ** -8 if dtype == "bfloat16" else 0.0
    np.testing.assert_allclose(np.asarray(pre, np.float64), want_pre, rtol=rounding, atol=1e-5 * max(k, 1))
    want, _ = _numpy_gelu_and_slope(np.asarray(pre, np.float64))
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=max(rounding, 1e-3), atol=1e-6)
  # Tails, zero and non-finite values through the bias (K = 0).
  h = np.array([-90.0, -12.0, -5.0, -1.0, -1e-3, 0.0, 1e-3, 1.0, 5.0, 40.0, np.inf, -np.inf, np.nan],
               np.float32)
  out, pre = mkl_gemm.gemm_bias_gelu(jnp.ones((1, 0), jnp.float32), jnp.ones((0, h.size), jnp.float32),
                                     jnp.asarray(h))
  with np.errstate(invalid="ignore"):
    want, _ = _numpy_gelu_and_slope(h.astype(np.float64))
  np.testing.assert_array_equal(np.asarray(pre)[0], h)
  np.testing.assert_allclose(np.asarray(out)[0, :10], want[:10], rtol=2e-3, atol=1e-30)
  assert np.asarray(out)[0, 10] == np.inf and np.isnan(np.asarray(out)[0, 11:]).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gemm_gelu_grad_matches_numpy(dtype):
  """d = (a @ op(b)) * GELU'(pre) from the float32 product, rounded once, and its column sums
  before rounding."""
  rng = np.random.default_rng(5)
  for m, k, n, transpose_b in GELU_SHAPES:
    a = jnp.asarray(rng.standard_normal((m, k)), dtype)
    b = jnp.asarray(rng.standard_normal((n, k) if transpose_b else (k, n)), dtype)
    pre = jnp.asarray(rng.uniform(-6, 6, (m, n)), dtype)
    d, d_bias = jax.jit(lambda x, y, p: mkl_gemm.gemm_gelu_grad(x, y, p, transpose_b=transpose_b))(a, b, pre)
    assert d.shape == (m, n) and d.dtype == a.dtype and d_bias.shape == (n,) and d_bias.dtype == jnp.float32
    _, slope = _numpy_gelu_and_slope(np.asarray(pre, np.float64))
    want = _reference(a, b, False, transpose_b) * slope
    rounding = 2.0 ** -8 if dtype == "bfloat16" else 0.0
    np.testing.assert_allclose(np.asarray(d, np.float64), want, rtol=rounding, atol=2e-5 * max(k, 1))
    np.testing.assert_allclose(np.asarray(d_bias), want.sum(0), rtol=1e-5, atol=2e-5 * max(k, 1) * m ** 0.5)


def test_gelu_calls_refuse_what_they_cannot_multiply():
  a = jnp.ones((4, 3), jnp.float32)
  with pytest.raises(ValueError, match="do not match"):
    mkl_gemm.gemm_bias_gelu(a, jnp.ones((3, 5), jnp.float32), jnp.ones((4,)))
  with pytest.raises(ValueError, match="do not match"):
    mkl_gemm.gemm_gelu_grad(a, jnp.ones((3, 5), jnp.float32), jnp.ones((4, 4), jnp.float32))
  with pytest.raises(ValueError, match="one dtype"):
    mkl_gemm.gemm_gelu_grad(a, jnp.ones((3, 5), jnp.float32), jnp.ones((4, 5), jnp.bfloat16))


def _numpy_layer_norm(x, scale, bias, eps, dy):
  """LayerNorm over the last dim and its gradients in float64 -> y, dx, dscale, dbias."""
  mean = x.mean(-1, keepdims=True)
  rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
  x_hat = (x - mean) * rstd
  g = dy * scale
  dx = rstd * (g - g.mean(-1, keepdims=True) - x_hat * (g * x_hat).mean(-1, keepdims=True))
  return x_hat * scale + bias, dx, (dy * x_hat).sum(0), dy.sum(0)


@pytest.mark.parametrize("x_dtype,y_dtype", [("float32", "bfloat16"), ("float32", "float32"),
                                             ("bfloat16", "bfloat16"), ("bfloat16", "float32")])
def test_layer_norm_and_its_gradients_match_numpy(x_dtype, y_dtype):
  """y, its stats, dx, dscale and dbias against float64, for rows over several tiles, an offset
  and spread that a one-pass variance would lose digits to, a row of constants (variance 0:
  rstd = 1 / sqrt(eps)), fewer rows than threads and 2-wide rows."""
  rng = np.random.default_rng(6)
  for m, d in [(300, 96), (5, 2), (40, 777)]:
    x = jnp.asarray(rng.standard_normal((m, d)) * 3.0 + 50.0, x_dtype).at[1].set(7.0)
    scale = jnp.asarray(rng.standard_normal(d), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(d), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((m, d)), y_dtype)
    y, stats = jax.jit(lambda x, s, b: mkl_gemm.layer_norm(x, s, b, epsilon=1e-5, dtype=y_dtype))(x, scale, bias)
    dx, dscale, dbias = jax.jit(mkl_gemm.layer_norm_grad)(x, scale, stats, dy)
    assert y.dtype == dy.dtype and dx.dtype == x.dtype and stats.shape == (m, 2)
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    want = _numpy_layer_norm(x64, np.asarray(scale, np.float64), np.asarray(bias, np.float64), 1e-5, dy64)
    np.testing.assert_allclose(np.asarray(stats)[:, 0], x64.mean(-1), rtol=1e-6)
    for name, got, ref in zip(("y", "dx", "dscale", "dbias"), (y, dx, dscale, dbias), want):
      rounded = jnp.dtype(got.dtype) == jnp.bfloat16
      atol = (2.0 ** -7 if rounded else 2e-5) * float(np.abs(ref).max())
      np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=0, atol=atol, err_msg=name)


def test_layer_norm_refuses_what_it_cannot_normalise():
  x = jnp.ones((4, 3), jnp.float32)
  with pytest.raises(ValueError, match="scale"):
    mkl_gemm.layer_norm(x, jnp.ones((4,)), jnp.ones((4,)), epsilon=1e-6, dtype=jnp.float32)
  with pytest.raises(ValueError, match="bias"):
    mkl_gemm.layer_norm(x, jnp.ones((3,)), jnp.ones((4,)), epsilon=1e-6, dtype=jnp.float32)
  with pytest.raises(ValueError, match="bfloat16 or float32"):
    mkl_gemm.layer_norm(x, jnp.ones((3,)), jnp.ones((3,)), epsilon=1e-6, dtype=jnp.float16)
  with pytest.raises(ValueError, match=r"\[M, D\]"):
    mkl_gemm.layer_norm_grad(x, jnp.ones((3,)), jnp.ones((4, 2)), jnp.ones((4, 4), jnp.float32))


def _numpy_batch_norm(x, scale, bias, eps, residual, relu_mask, dy):
  """Training-mode BatchNorm over the rows, + residual, and its gradients in float64, the ReLU's
  mask given -> y before the ReLU, mean, var, dx, dresidual, dscale, dbias."""
  mean, var = x.mean(0), x.var(0)
  rstd = 1.0 / np.sqrt(var + eps)
  x_hat = (x - mean) * rstd
  g = dy * relu_mask
  dx = scale * rstd * (g - g.mean(0) - x_hat * (g * x_hat).mean(0))
  return x_hat * scale + bias + residual, mean, var, dx, g, (g * x_hat).sum(0), g.sum(0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("relu,with_residual", [(False, False), (True, False), (True, True)])
def test_batch_norm_and_its_gradients_match_numpy(dtype, relu, with_residual):
  """y, the moments, dx, the residual's cotangent, dscale and dbias against float64, for rows over
  several tiles and moment blocks (a [20000, 64] map whose offset a float32 running sum would lose
  digits to), fewer rows than threads, and a constant channel (variance 0). The ReLU's mask is
  the one the kernel's y shows, checked itself through y."""
  rng = np.random.default_rng(7)
  for m, c in [(20000, 64), (300, 96), (3, 2)]:
    x = jnp.asarray(rng.standard_normal((m, c)) * 3.0 + 20.0, dtype).at[:, 1].set(5.0)
    scale = jnp.asarray(rng.standard_normal(c), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(c), jnp.float32)
    residual = jnp.asarray(rng.standard_normal((m, c)), dtype) if with_residual else None
    dy = jnp.asarray(rng.standard_normal((m, c)), dtype)
    y, moments = jax.jit(lambda x, s, b, r: mkl_gemm.batch_norm(x, s, b, r, epsilon=1e-5, relu=relu))(
        x, scale, bias, residual)
    dx, dresidual, dscale, dbias = jax.jit(lambda *a: mkl_gemm.batch_norm_grad(
        *a, epsilon=1e-5, relu=relu, residual=with_residual))(x, scale, moments, y, dy)
    assert y.dtype == dx.dtype == x.dtype and moments.shape == (2, c)
    assert (dresidual is not None) == with_residual
    f64 = lambda a: np.asarray(a, np.float64)
    mask = f64(y) > 0 if relu else 1.0
    pre, mean, var, *grads = _numpy_batch_norm(f64(x), f64(scale), f64(bias), 1e-5,
                                               f64(residual) if with_residual else 0.0, mask, f64(dy))
    want_y = np.maximum(pre, 0.0) if relu else pre
    rounded = dtype == "bfloat16"
    for name, got, want in [("y", y, want_y), ("mean", moments[0], mean), ("var", moments[1], var),
                            *zip(("dx", "dresidual", "dscale", "dbias"), (dx, dresidual, dscale, dbias), grads)]:
      if got is None:
        continue
      bf16_array = rounded and name in ("y", "dx", "dresidual")
      atol = (2.0 ** -7 if bf16_array else 3e-5) * float(np.abs(want).max())
      np.testing.assert_allclose(f64(got), want, rtol=0, atol=atol, err_msg=f"{name} [{m}, {c}]")


def test_batch_norm_refuses_what_it_cannot_normalise():
  x = jnp.ones((4, 3), jnp.float32)
  with pytest.raises(ValueError, match=r"x \[M, C\]"):
    mkl_gemm.batch_norm(x, jnp.ones((4,)), jnp.ones((4,)), epsilon=1e-5, relu=False)
  with pytest.raises(ValueError, match="bias"):
    mkl_gemm.batch_norm(x, jnp.ones((3,)), jnp.ones((4,)), epsilon=1e-5, relu=False)
  with pytest.raises(ValueError, match="x's dtype"):
    mkl_gemm.batch_norm(x, jnp.ones((3,)), jnp.ones((3,)), jnp.ones((4, 3), jnp.bfloat16),
                        epsilon=1e-5, relu=True)
  with pytest.raises(ValueError, match=r"\[M, C\] arrays"):
    mkl_gemm.batch_norm_grad(x, jnp.ones((3,)), jnp.ones((2, 3)), x, jnp.ones((4, 4)),
                             epsilon=1e-5, relu=True, residual=False)


def _numpy_attention(q, k, v, mask, causal, scale, d_o):
  """Softmax attention and its gradients in float64, masked like XLA's path (disallowed logits
  set to float32's lowest, so a row with no key allowed is uniform): q [B, T, N, H], k/v
  [B, S, N, H], mask broadcastable to [B, N, T, S] or None -> o, dq, dk, dv."""
  q, k, v, d_o = (np.asarray(x, np.float64) for x in (q, k, v, d_o))
  (b, t, n, _), s = q.shape, k.shape[1]
  allowed = np.ones((b, n, t, s), bool)
  if mask is not None:
    allowed &= np.broadcast_to(np.asarray(mask).reshape((1,) * (4 - mask.ndim) + mask.shape), allowed.shape)
  if causal:
    allowed &= np.tril(np.ones((t, s), bool), s - t)
  logits = np.where(allowed, scale * np.einsum("btnh,bsnh->bnts", q, k), np.finfo(np.float32).min)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dp = np.einsum("btnh,bsnh->bnts", d_o, v)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  return (np.einsum("bnts,bsnh->btnh", p, v), scale * np.einsum("bnts,bsnh->btnh", ds, k),
          scale * np.einsum("bnts,btnh->bsnh", ds, q), np.einsum("bnts,btnh->bsnh", p, d_o))


# (B, T, S, N, H, causal, mask shape): self and cross attention, causal with T < S and T > S,
# masks per key, per (query, key), per head and a scalar, more pairs than threads, and 600 x 300
# logits that take several row blocks. Head sizes that are multiples of 32 take the AMX tiles in
# bfloat16 (where this CPU has them), with T and S off the tiles' multiples of 16 and 32.
ATTENTION_CASES = [(2, 5, 7, 3, 4, False, None), (2, 7, 7, 3, 8, True, None),
                   (3, 9, 6, 2, 5, False, (3, 1, 1, 6)), (2, 6, 4, 2, 3, True, (6, 4)),
                   (2, 4, 5, 3, 2, False, (1, 3, 1, 1)), (1, 600, 300, 1, 8, True, (1, 1, 600, 300)),
                   (2, 197, 197, 3, 64, False, None), (1, 600, 300, 1, 32, True, (1, 1, 600, 300)),
                   (2, 33, 17, 2, 96, False, None), (2, 6, 4, 2, 64, True, (6, 4))]


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_attention_and_its_gradients_match_numpy(dtype, tol, amx):
  """The fused attention and its gradients against NumPy on the same (rounded) inputs, on AMX
  tiles where they take the case and through MKL's GEMMs; one mask leaves a query with no key,
  which is uniform over all keys as in XLA's path."""
  rng = np.random.default_rng(2)
  for b, t, s, n, h, causal, mask_shape in ATTENTION_CASES:
    q, d_o = (jnp.asarray(rng.standard_normal((b, t, n, h)) * 2, dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, s, n, h)), dtype) for _ in range(2))
    mask = None if mask_shape is None else rng.random(mask_shape) > 0.3
    if mask_shape == (6, 4):
      mask[1] = False
    mask = None if mask is None else jnp.asarray(mask)
    scale = h ** -0.5
    options = dict(causal=causal, scale=scale, amx=amx)
    o, stats = jax.jit(lambda q, k, v, m: mkl_gemm.attention(q, k, v, m, **options))(q, k, v, mask)
    assert o.dtype == q.dtype and stats.shape == (b, n, t, 2)
    grads = jax.jit(lambda *args: mkl_gemm.attention_grad(*args, **options))(
        q, k, v, mask, o, stats, d_o)
    for got, want in zip((o, *grads), _numpy_attention(q, k, v, mask, causal, scale, d_o)):
      assert got.dtype == q.dtype and got.shape == want.shape
      np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0,
                                 atol=tol * np.abs(want).max(), err_msg=str((b, t, s, n, h, causal, mask_shape)))


def test_attention_takes_amx_tiles_where_the_cpu_has_them():
  """A CPU with AMX (and a kernel that grants it) gets the tiles; the flag is read, not assumed."""
  assert mkl_gemm.register() is None
  if "amx_bf16" not in hostcpu.host_cpu()["matmul_isa"]:
    assert not mkl_gemm.amx_permitted()
  elif not mkl_gemm.amx_permitted():
    pytest.skip("this kernel did not grant the AMX tile state")


def test_attention_refuses_what_it_cannot_attend():
  q = jnp.ones((2, 5, 3, 4), jnp.float32)
  with pytest.raises(ValueError, match="one dtype"):
    mkl_gemm.attention(q, q.astype(jnp.bfloat16), q, None, causal=False, scale=1.0)
  with pytest.raises(ValueError, match="k and v"):
    mkl_gemm.attention(q, q[:, :, :2], q[:, :, :2], None, causal=False, scale=1.0)
  with pytest.raises(ValueError, match="not broadcastable"):
    mkl_gemm.attention(q, q, q, jnp.ones((2, 1, 1, 4), bool), causal=False, scale=1.0)
  with pytest.raises(ValueError, match="o and d_o"):
    mkl_gemm.attention_grad(q, q, q, None, q, jnp.zeros((2, 3, 5, 2)), q[:, :4], causal=False, scale=1.0)


def test_attention_through_mkl_is_two_calls_and_no_head_transposes(monkeypatch):
  """CPU attention's forward and backward through MKL: one fused call each on the [B, T, N, H]
  operands, no XLA dot and no transpose of a 4-D operand."""
  from radjax.models import transformer
  monkeypatch.setenv(mkl_gemm.ENV, "on")
  q = jnp.ones((2, 5, 3, 8), jnp.bfloat16)
  grad = jax.grad(lambda q, k, v: jnp.sum(transformer.cpu_attention(q, k, v, None, False).astype(jnp.float32)),
                  argnums=(0, 1, 2))
  text = jax.jit(grad).lower(q, q, q).as_text()
  assert text.count(f"@{mkl_gemm.ATTENTION_TARGET}(") == 1
  assert text.count(f"@{mkl_gemm.ATTENTION_GRAD_TARGET}(") == 1
  assert "stablehlo.dot_general" not in text
  assert not re.search(r"stablehlo.transpose [^\n]*-> tensor<\d+x\d+x\d+x\d+x", text), text


def test_hlo_flops_counts_the_custom_calls():
  """XLA's cost analysis counts no FLOPs for a custom call; hlo_flops counts 2 M N K for a GEMM
  (with or without the bias and rounding, GELU or its derivative), and 2 T S H per (batch, head) for each of attention's
  2 GEMMs forward and 5 backward."""
  def program(a, b, c, q, k):
    o, stats = mkl_gemm.attention(q, k, k, None, causal=True, scale=0.5)
    grads = mkl_gemm.attention_grad(q, k, k, None, o, stats, o, causal=True, scale=0.5)
    rounded = mkl_gemm.gemm_bias(a, c, jnp.ones((5,)), transpose_b=True)
    gelu, pre = mkl_gemm.gemm_bias_gelu(a, c, jnp.ones((5,)), transpose_b=True)
    d, _ = mkl_gemm.gemm_gelu_grad(a, c, pre, transpose_b=True)
    return (mkl_gemm.gemm(a, b, transpose_a=True).sum() + rounded.sum() + gelu.sum() + d.sum()
            + sum(g.sum() for g in grads))

  shapes = (jnp.ones((8, 16), jnp.float32), jnp.ones((8, 4), jnp.float32), jnp.ones((5, 16), jnp.float32),
            jnp.ones((2, 5, 3, 4), jnp.float32), jnp.ones((2, 6, 3, 4), jnp.float32))
  hlo = jax.jit(program).lower(*shapes).compile().as_text()
  assert mkl_gemm.hlo_flops(hlo) == 2 * 16 * 4 * 8 + 3 * 2 * 8 * 16 * 5 + (2 + 5) * 2 * (2 * 3) * 5 * 6 * 4


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
    # 560 rows >= MKL_BIAS_MIN_ROWS: the forward and dx rounded in the handler.
    "linear_many_rows": (lambda dtype: layers.linear(96, 80, ("embed", "mlp"), rngs=nnx.Rngs(0),
                                                     dtype=dtype), (8, 70, 96)),
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
  # A Linear: the forward pass, dx and dW, one GEMM each, the first two rounded in the handler
  # from MKL_BIAS_MIN_ROWS rows on; a convolution on a large enough map the same as shifted GEMMs;
  # on a small one at least its dW as one GEMM.
  targets = (mkl_gemm.TARGET, mkl_gemm.BIAS_TARGET, mkl_gemm.CONV_TARGET, mkl_gemm.CONV_WEIGHT_GRAD_TARGET)
  calls = tuple(hlo_mkl.count(f"@{target}(") for target in targets)
  if name == "linear":
    assert calls == (3, 0, 0, 0), hlo_mkl
  elif name == "linear_many_rows":
    assert calls == (1, 2, 0, 0), hlo_mkl
  elif name == "conv3x3":
    assert calls == (0, 0, 2, 1), hlo_mkl
  else:
    assert calls[0] >= 1 and calls[2] == 0, hlo_mkl
  tol = 1e-2 if dtype == "bfloat16" else 1e-5
  np.testing.assert_allclose(value_mkl, value_xla, rtol=tol)
  for got, want in zip(grads_mkl, grads_xla):
    scale = float(jnp.abs(want.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0,
                               atol=tol * scale)


def _mlp_value_and_grads(rows, dtype):
  """An erf-GELU transformer Mlp's loss, its gradients (fc1 and fc2 kernel and bias, input) and
  its program, for an input of ``rows`` rows."""
  from radjax.models import transformer  # pylint: disable=import-outside-toplevel
  graphdef, params = nnx.split(transformer.Mlp(48, 96, rngs=nnx.Rngs(0), dtype=dtype))
  x = jax.random.normal(jax.random.key(1), (rows // 70, 70, 48), jnp.float32)

  def loss(params, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x.astype(dtype)).astype(jnp.float32)))

  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  value, (g, x_grad) = f(params, x)
  grads = [g[layer][name][...] for layer in ("fc1", "fc2") for name in ("kernel", "bias")] + [x_grad]
  return value, grads, f.lower(params, x).compile().as_text()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gelu_mlp_through_mkl_matches_xla(dtype, monkeypatch):
  """An erf-GELU Mlp of 560 rows through MKL: GELU in fc1's GEMM call and its derivative in the
  backward's, no erf left to XLA, and the value and every gradient as XLA's path gives them. With
  fewer than MKL_BIAS_MIN_ROWS rows it takes the separate layers."""
  monkeypatch.setenv(mkl_gemm.ENV, "on")
  value_mkl, grads_mkl, hlo_mkl = _mlp_value_and_grads(560, dtype)
  assert hlo_mkl.count(f'custom_call_target="{mkl_gemm.BIAS_GELU_TARGET}"') == 1, hlo_mkl
  assert hlo_mkl.count(f'custom_call_target="{mkl_gemm.GELU_GRAD_TARGET}"') == 1, hlo_mkl
  assert " erf(" not in hlo_mkl
  _, _, hlo_few_rows = _mlp_value_and_grads(140, dtype)
  assert mkl_gemm.BIAS_GELU_TARGET not in hlo_few_rows and " erf(" in hlo_few_rows
  monkeypatch.setenv(mkl_gemm.ENV, "off")
  value_xla, grads_xla, hlo_xla = _mlp_value_and_grads(560, dtype)
  assert mkl_gemm.BIAS_GELU_TARGET not in hlo_xla
  tol = 1e-2 if dtype == "bfloat16" else 1e-5
  np.testing.assert_allclose(value_mkl, value_xla, rtol=tol)
  for got, want in zip(grads_mkl, grads_xla, strict=True):
    scale = float(jnp.abs(want.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0,
                               atol=tol * scale)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_layer_norm_module_through_mkl_matches_nnx(dtype, monkeypatch):
  """layers.LayerNorm on a float32 residual: one call each way through MKL's library, and the
  value and the scale, bias and input gradients of nnx.LayerNorm (which rounds x to ``dtype``
  first: hence bf16's tolerance). With a mask it is nnx.LayerNorm's path."""
  monkeypatch.setenv(mkl_gemm.ENV, "on")
  x = jax.random.normal(jax.random.key(2), (3, 70, 48), jnp.float32) * 2.0 + 1.0
  mine = layers.layer_norm(48, rngs=nnx.Rngs(0), dtype=dtype)
  theirs = nnx.LayerNorm(48, epsilon=1e-6, dtype=dtype, rngs=nnx.Rngs(0))
  for module in (mine, theirs):  # the same non-trivial parameters for both
    module.scale[...] = jnp.linspace(0.5, 1.5, 48)
    module.bias[...] = jnp.linspace(-1.0, 1.0, 48)

  def value_and_grads(module):
    graphdef, params = nnx.split(module)
    loss = lambda params, x: jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x).astype(jnp.float32)))
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    value, (g, dx) = f(params, x)
    return value, [g["scale"][...], g["bias"][...], dx], f.lower(params, x).as_text()

  value, grads, text = value_and_grads(mine)
  assert text.count(f"@{mkl_gemm.LAYER_NORM_TARGET}(") == 1
  assert text.count(f"@{mkl_gemm.LAYER_NORM_GRAD_TARGET}(") == 1
  want_value, want_grads, _ = value_and_grads(theirs)
  tol = 2e-2 if dtype == "bfloat16" else 1e-5
  np.testing.assert_allclose(value, want_value, rtol=tol)
  for got, want in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                               atol=tol * float(jnp.abs(want).max()))
  mask = jnp.ones(x.shape, bool)
  masked = jax.jit(lambda x: mine(x, mask=mask)).lower(x).as_text()
  assert mkl_gemm.LAYER_NORM_TARGET not in masked


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_batch_norm_module_through_mkl_matches_nnx(dtype, monkeypatch):
  """layers.BatchNorm in training mode with a residual and the ReLU: one call each way through
  MKL's library, and the value, the scale, bias, input and residual gradients and the running
  averages of nnx.BatchNorm followed by the add and jax.nn.relu. In running-average mode it is
  nnx.BatchNorm's path."""
  monkeypatch.setenv(mkl_gemm.ENV, "on")
  x = jax.random.normal(jax.random.key(3), (4, 9, 9, 24), jnp.float32) * 2.0 + 1.0
  scale, bias = np.linspace(0.5, 1.5, 24), np.linspace(-1.0, 1.0, 24)
  # The residual keeps every input of the ReLU 0.25 or more from 0, where bf16's roundings (one
  # here, two on nnx's path) could flip the ReLU's mask.
  x64 = np.asarray(x, np.float64)
  normalised = (x64 - x64.mean((0, 1, 2))) / np.sqrt(x64.var((0, 1, 2)) + 1e-5) * scale + bias
  residual = np.asarray(jax.random.normal(jax.random.key(4), x.shape), np.float64)
  residual = jnp.asarray(residual + 0.25 * np.sign(normalised + residual), dtype)
  kw = dict(momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=nnx.Rngs(0))
  mine, theirs = layers.BatchNorm(24, **kw), nnx.BatchNorm(24, **kw)
  for module in (mine, theirs):  # the same non-trivial parameters for both
    module.scale[...], module.bias[...] = jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32)

  def value_and_grads(module, call):
    graphdef, params, stats = nnx.split(module, nnx.Param, nnx.BatchStat)

    def loss(params, stats, x, residual):
      module = nnx.merge(graphdef, params, stats)
      y = call(module, x, residual)
      return jnp.sum(jnp.sin(y.astype(jnp.float32))), nnx.state(module, nnx.BatchStat)

    # The statistics are differentiated too (their gradient is zero): nnx updates them in place,
    # which needs them at the trace level of the parameters.
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    (value, new_stats), (g, _, dx, dresidual) = f(params, stats, x, residual)
    arrays = [g["scale"][...], g["bias"][...], dx, dresidual, new_stats["mean"][...], new_stats["var"][...]]
    return value, arrays, f.lower(params, stats, x, residual).as_text()

  value, arrays, text = value_and_grads(mine, lambda m, x, r: m(x, residual=r, relu=True))
  assert text.count(f"@{mkl_gemm.BATCH_NORM_TARGET}(") == 1
  assert text.count(f"@{mkl_gemm.BATCH_NORM_GRAD_TARGET}(") == 1
  want_value, want_arrays, _ = value_and_grads(theirs, lambda m, x, r: jax.nn.relu(m(x) + r))
  # bf16: y differs by an ulp where nnx's path rounds twice, and the loss's cos(y) carries that
  # into the cotangent; the float64 test above holds the kernel to bf16's own rounding.
  tol = 4e-2 if dtype == "bfloat16" else 1e-5
  np.testing.assert_allclose(value, want_value, rtol=tol)
  for got, want in zip(arrays, want_arrays, strict=True):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0,
                               atol=tol * float(jnp.abs(want.astype(jnp.float32)).max()))
  mine.eval()
  evaluated = jax.jit(lambda x: mine(x, relu=True)).lower(x).as_text()
  assert mkl_gemm.BATCH_NORM_TARGET not in evaluated


def test_default_is_intel_only(monkeypatch):
  monkeypatch.delenv(mkl_gemm.ENV, raising=False)
  intel = hostcpu.host_cpu().get("vendor") == "GenuineIntel"
  reason = mkl_gemm.unavailable_reason()
  assert (reason is None) == intel, reason
  if not intel:
    assert "not an Intel CPU" in reason


def test_build_reports_a_compiler_error(tmp_path, monkeypatch):
  monkeypatch.setenv("CXX", "radjax-no-such-compiler")
  with pytest.raises(RuntimeError, match="no compiler 'radjax-no-such-compiler'"):
    mkl_gemm.build_handler(str(tmp_path))
  monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
  with pytest.raises(RuntimeError, match="failed"):
    mkl_gemm.build_handler(str(tmp_path))
  assert list(tmp_path.iterdir()) == []  # no partial library left behind
