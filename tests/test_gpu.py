"""cuDNN fused attention against XLA's, on the shapes radjax's ViT and CLIP text tower give it:
on a GPU only (run ``python -m pytest tests/test_gpu.py`` there; scripts/gpu_bench.sh does),
except the check of the padding around it, which runs anywhere."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from radjax.models import transformer

needs_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _prefix_mask(key, b, t):
  lengths = jax.random.randint(key, (b,), 2, t + 1)
  return transformer.key_mask_to_bias_mask(jnp.arange(t)[None, :] < lengths[:, None])


@pytest.mark.parametrize("t,causal", [(7, True), (7, False), (8, True)])
def test_padding_around_cudnn_is_exact(t, causal):
  """cudnn_attention pads odd lengths to even ones and passes lengths; run through XLA's kernel,
  forward and gradients equal plain masked attention's."""
  kq, kk, kv, kg, kl = jax.random.split(jax.random.key(t + causal), 5)
  q, k, v, grad_out = (jax.random.normal(key, (3, t, 2, 8)) for key in (kq, kk, kv, kg))
  mask = _prefix_mask(kl, 3, t)

  def grads(attention):  # jitted: compiling each op eagerly costs ~20 s on a small CPU
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v) * grad_out), argnums=(0, 1, 2)))(q, k, v)

  padded = jax.jit(lambda q, k, v: transformer.cudnn_attention(q, k, v, mask, causal, implementation="xla"))
  plain = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal))
  np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), atol=1e-5)
  for got, want in zip(grads(padded), grads(plain)):
    np.testing.assert_allclose(got, want, atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("name,b,t,n,h,padded,causal", [
    ("vit_b16", 4, 197, 12, 64, False, False),
    ("clip_text", 4, 77, 8, 64, True, True),
])
def test_cudnn_attention_matches_float32_reference(monkeypatch, name, b, t, n, h, padded, causal):
  kq, kk, kv, kg, kl = jax.random.split(jax.random.key(t), 5)
  q, k, v = (jax.random.normal(key, (b, t, n, h), jnp.float32) for key in (kq, kk, kv))
  grad_out = jax.random.normal(kg, (b, t, n, h), jnp.float32)
  mask = _prefix_mask(kl, b, t) if padded else None

  def loss_and_grads(impl, dtype):
    monkeypatch.setenv("RADJAX_GPU_ATTENTION", impl)

    def loss(q, k, v):
      o = transformer.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                            mask, is_causal=causal)
      return jnp.sum(o.astype(jnp.float32) * grad_out), o
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    hlo = step.lower(q, k, v).compile().as_text()
    (_, out), grads = step(q, k, v)
    return out, grads, hlo

  ref_out, ref_grads, ref_hlo = loss_and_grads("xla", jnp.float32)
  out, grads, hlo = loss_and_grads("cudnn", jnp.bfloat16)
  assert "cudnn$fmha" in hlo and "cudnn$fmha" not in ref_hlo  # the fused kernel, fwd and bwd
  poisoned = jnp.isnan(out).any() or any(jnp.isnan(g).any() for g in grads)
  assert not poisoned
  assert _rel(out, ref_out) < 1e-2, (name, _rel(out, ref_out))
  for g, r in zip(grads, ref_grads):
    assert _rel(g, r) < 2e-2, (name, _rel(g, r))
