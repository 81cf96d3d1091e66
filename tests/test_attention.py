"""radjax's CPU attention (its own forward and hand-written backward) against NumPy in float64,
and the layout of its compiled batched dots."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radjax import mkl_gemm
from radjax.models import layers, transformer


def _numpy_attention(q, k, v, allowed, grad_out):
  """Textbook softmax attention and its gradients in float64. q [B, T, N, H], k/v [B, S, N, H],
  allowed bool broadcastable to [B, N, T, S], grad_out [B, T, N, H] -> out, (dq, dk, dv)."""
  q, k, v, grad_out = (np.asarray(a, np.float64).transpose(0, 2, 1, 3) for a in (q, k, v, grad_out))
  c = q.shape[-1] ** -0.5
  logits = np.where(allowed, c * q @ k.swapaxes(-1, -2), -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = p @ v
  dv = p.swapaxes(-1, -2) @ grad_out
  dp = grad_out @ v.swapaxes(-1, -2)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  dq, dk = c * ds @ k, c * ds.swapaxes(-1, -2) @ q
  back = lambda a: a.transpose(0, 2, 1, 3)
  return back(out), tuple(back(g) for g in (dq, dk, dv))


def _case(name, key):
  b, n, h = 2, 3, 8
  t, s = (3, 6) if name == "cross" else (5, 5)
  kq, kk, kv, kg, kl = jax.random.split(key, 5)
  q = jax.random.normal(kq, (b, t, n, h))
  k, v = (jax.random.normal(x, (b, s, n, h)) for x in (kk, kv))
  grad_out = jax.random.normal(kg, (b, t, n, h))
  mask, causal = None, name == "causal"
  allowed = np.ones((1, 1, t, s), bool)
  if name in ("key_padding", "cross"):
    lengths = np.asarray(jax.random.randint(kl, (b,), 2, s + 1))
    mask = jnp.asarray(np.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
    allowed = np.asarray(mask)
  if causal:
    allowed = allowed & np.tril(np.ones((t, s), bool))
  return q, k, v, grad_out, mask, causal, allowed


@pytest.mark.parametrize("matmuls", ["xla", "mkl"])
@pytest.mark.parametrize("name", ["full", "key_padding", "causal", "cross"])
@pytest.mark.parametrize("dtype,tol,bf16_dots", [
    (jnp.float32, 1e-5, None), (jnp.bfloat16, 3e-2, True), (jnp.bfloat16, 3e-2, False)])
def test_cpu_attention_matches_numpy(monkeypatch, name, dtype, tol, bf16_dots, matmuls):
  """Both paths: XLA's batched dots on materialised heads, and MKL's fused attention reading the
  [B, T, N, H] operands in place (radjax.mkl_gemm)."""
  if matmuls == "mkl" and mkl_gemm.find_mkl() is None:
    pytest.skip("MKL is not installed")
  monkeypatch.setenv(mkl_gemm.ENV, "on" if matmuls == "mkl" else "off")
  assert layers.use_mkl() == (matmuls == "mkl")
  monkeypatch.setattr(layers, "CPU_BF16_DOTS", bf16_dots)
  q, k, v, grad_out, mask, causal, allowed = _case(name, jax.random.key(len(name)))

  def loss(q, k, v):
    out = transformer.cpu_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask, causal)
    return jnp.sum(out.astype(jnp.float32) * grad_out), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  # The reference sees the inputs the kernel saw (rounded to dtype).
  rounded = [np.asarray(x.astype(dtype).astype(jnp.float32)) for x in (q, k, v)]
  want_out, want_grads = _numpy_attention(*rounded, allowed, grad_out)
  assert out.dtype == dtype
  scale = lambda a: np.abs(a).max()
  np.testing.assert_allclose(np.asarray(out, np.float64), want_out, atol=tol * scale(want_out))
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol * scale(want))


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, ...]]:
  """The operand element types of every batched (4-D) dot in compiled HLO text."""
  found = []
  for computation in hlo.split("\n\n"):
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", computation))
    for operands in re.findall(r"= \w+\[[\d,]+\]\{[\d,]+\} dot\(([^)]*)\), lhs_batch_dims=\{0,1\}",
                               computation):
      found.append(tuple(types[o.strip().lstrip("%")] for o in operands.split(",")))
  return found


@pytest.mark.parametrize("bf16_dots,operands", [(True, ("bf16", "bf16")), (False, ("f32", "f32"))])
def test_cpu_attention_batched_dots_operand_dtypes(monkeypatch, bf16_dots, operands):
  """XLA:CPU upcasts a bf16 batched dot whose operand is a transpose it folded into the dot's
  layout to float32 (a slower kernel, and f32 copies of q/k/v); the heads are therefore
  materialised before the dots. On a CPU with fast bf16 dots every batched dot of the bf16
  forward + backward must see bf16 operands; on one without, float32 ones (layers.cpu_dot_dtype:
  there the bf16 kernel is slower than float32's)."""
  if jax.default_backend() != "cpu" or jax.device_count() > 1:
    pytest.skip("XLA:CPU's dot lowering; the heads are materialised on one device only")
  monkeypatch.setattr(layers, "CPU_BF16_DOTS", bf16_dots)
  monkeypatch.setenv(mkl_gemm.ENV, "off")  # XLA's dots (MKL's: tests/test_mkl_gemm.py)
  q, k, v, grad_out, mask, causal, _ = _case("full", jax.random.key(0))
  bf16 = lambda x: x.astype(jnp.bfloat16)

  def loss(q, k, v):
    out = transformer.cpu_attention(bf16(q), bf16(k), bf16(v), mask, causal)
    return jnp.sum(out.astype(jnp.float32) * grad_out)

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
  dots = _dot_operand_dtypes(hlo)
  assert len(dots) == 6, dots  # forward q k^T and p v; backward dp, dq, dk, dv
  assert all(d == operands for d in dots), dots
