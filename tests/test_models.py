"""radjax.models: parameter counts, forward shapes, masking, registry, FLOPs (CPU, small)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from radjax import defaults, mkl_gemm
from radjax.models import (BertConfig, BertEncoder, CLIPTextConfig, CLIPTextEncoder,
                           ClassifierHead, MAEDecoder, MLMHead, ProjectionHead, ReportDecoder,
                           ResNet, ResNetConfig, Teacher, Temperature, ViT, ViTConfig,
                           build_image_encoder, build_text_encoder, patchify, random_masking,
                           unpatchify)
from radjax.models import flops as F


def n_params(build) -> int:
  """Parameter count of an abstract (never materialised) module."""
  model = nnx.eval_shape(build)
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def rel(a, b):
  return abs(a - b) / b


# ---------------------------------------------------------------- parameter counts (references)
# timm vit_base_patch16_224 without head: 85,798,656; torchvision resnet50 without fc: 23,508,032;
# HF bert-base-uncased BertModel: 109,482,240 (with pooler); open_clip ViT-B-32 text: 63,428,096.

def test_vit_b16_param_count():
  n = n_params(lambda: ViT(ViTConfig("b", patch_size=16, image_size=224), rngs=nnx.Rngs(0)))
  assert rel(n, 85_798_656) < 0.01, n


def test_resnet_param_counts():
  n50 = n_params(lambda: ResNet(ResNetConfig("50", image_size=224, channels=3), rngs=nnx.Rngs(0)))
  assert rel(n50, 23_508_032) < 0.01, n50
  n18 = n_params(lambda: ResNet(ResNetConfig("18", image_size=224, channels=3), rngs=nnx.Rngs(0)))
  assert rel(n18, 11_176_512) < 0.01, n18
  nbn = n_params(lambda: ResNet(ResNetConfig("50", norm="batch"), rngs=nnx.Rngs(0)))
  assert nbn == n50  # BatchNorm running stats are not parameters


def test_bert_base_param_count():
  n = n_params(lambda: BertEncoder(BertConfig(pooler=True), rngs=nnx.Rngs(0)))
  assert rel(n, 109_482_240) < 0.01, n
  n_np = n_params(lambda: BertEncoder(BertConfig(pooler=False), rngs=nnx.Rngs(0)))
  assert n - n_np == 768 * 768 + 768


def test_clip_text_param_count():
  n = n_params(lambda: CLIPTextEncoder(CLIPTextConfig(), rngs=nnx.Rngs(0)))
  assert rel(n, 63_428_096) < 0.01, n


# ---------------------------------------------------------------- annotations / dtype

def _all_params_named(model):
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(var.get_value().shape), (path, names)


def test_every_param_has_logical_axes():
  builds = [
      lambda r: ViT(ViTConfig("ti", patch_size=8, image_size=32, channels=1, depth=1), rngs=r),
      lambda r: ResNet(ResNetConfig("18", image_size=32, channels=1), rngs=r),
      lambda r: BertEncoder(_small_bert(pooler=True), rngs=r),
      lambda r: CLIPTextEncoder(CLIPTextConfig(vocab_size=50, context_length=8, width=32,
                                               num_heads=2, num_layers=1, proj_dim=16), rngs=r),
      lambda r: Teacher(32, 16, 3, fusion="cross_attention", hidden_dim=32, rngs=r),
      lambda r: Teacher(32, 16, 3, fusion="concat", hidden_dim=32, rngs=r),
      lambda r: MAEDecoder(32, 48, 4, dim=32, depth=1, text_dim=16, rngs=r),
      lambda r: MLMHead(32, 50, rngs=r),
      lambda r: ReportDecoder(50, 8, 32, dim=32, depth=1, rngs=r),
      lambda r: ProjectionHead(32, 16, hidden_dim=64, rngs=r),
  ]
  for build in builds:
    _all_params_named(nnx.eval_shape(lambda: build(nnx.Rngs(0))))


def test_bfloat16_compute_float32_params():
  vit = ViT(ViTConfig("ti", patch_size=8, image_size=32, channels=1, depth=1, dtype="bfloat16"),
            rngs=nnx.Rngs(0))
  out = vit(jnp.ones((2, 32, 32, 1)))
  assert out["tokens"].dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(vit, nnx.Param)))


def assert_same_layer(ours: nnx.Module, ref: nnx.Module, x: jax.Array, tol: float) -> None:
  """Same outputs, and gradients for x, kernel and bias of the same dtype and values."""
  g = jax.random.normal(jax.random.key(4), ref(x).shape)

  def grads(layer):
    graphdef, params = nnx.split(layer)
    f = lambda x, p: jnp.vdot(nnx.merge(graphdef, p)(x).astype(jnp.float32), g)
    dx, dp = jax.grad(f, argnums=(0, 1))(x, params)
    return dx, dp["kernel"][...], dp["bias"][...]

  np.testing.assert_allclose(np.asarray(ours(x), np.float32), np.asarray(ref(x), np.float32), rtol=tol, atol=tol)
  for a, b in zip(grads(ours), grads(ref)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("dtype,tol,bf16_dots", [
    (None, 1e-5, None), ("float32", 1e-5, None), ("bfloat16", 2e-2, True), ("bfloat16", 2e-2, False)])
@pytest.mark.parametrize("din,dout", [(24, 40), (40, 24)])  # weight gradient from x^T / from g^T
def test_linear_cpu_path_matches_nnx_linear(monkeypatch, dtype, tol, bf16_dots, din, dout):
  """layers.Linear's own CPU matmuls (custom VJP, materialised transposes; bf16 operands, or
  upcast as on CPUs without fast bf16 dots) against flax's nnx.Linear: the same outputs
  and gradients for x, kernel and bias, on an input with leading batch dims."""
  from radjax.models import layers
  monkeypatch.setattr(layers, "CPU_BF16_DOTS", bf16_dots)
  assert layers.use_cpu_dense(dtype or "float32") and not layers.use_cpu_dense("float16")
  ours = layers.linear(din, dout, ("embed", "mlp"), rngs=nnx.Rngs(0), dtype=dtype)
  ref = nnx.Linear(din, dout, dtype=dtype, rngs=nnx.Rngs(1))
  ref.kernel[...] = ours.kernel[...]
  ref.bias[...] = jax.random.normal(jax.random.key(2), (dout,))
  ours.bias[...] = ref.bias[...]
  assert_same_layer(ours, ref, jax.random.normal(jax.random.key(3), (2, 7, din)), tol)


@pytest.mark.parametrize("dtype,tol,bf16_dots", [
    (None, 1e-5, None), ("bfloat16", 2e-2, True), ("bfloat16", 2e-2, False)])
@pytest.mark.parametrize("k,stride,padding,patch_path", [
    (1, 1, "VALID", False), (1, 2, [(0, 0), (0, 0)], False), (1, 2, "SAME", False),
    (3, 1, "SAME", True), (3, 1, [(1, 0), (2, 1)], True), (3, 1, "VALID", True),
    (3, 2, "SAME", False), (3, 1, "CIRCULAR", False), (3, 1, 3, False)])
def test_conv_cpu_paths_match_nnx_conv(monkeypatch, dtype, tol, bf16_dots, k, stride, padding,
                                       patch_path):
  """layers.Conv on CPU: 1x1 unpadded convolutions as dots; other stride-1 ones as patch
  matmuls in bf16 with bf16 dots, else XLA's with patch-matmul weight gradients; the rest
  nnx.Conv's. Every path gives flax's nnx.Conv outputs and gradients."""
  from radjax.models import layers
  monkeypatch.setattr(layers, "CPU_BF16_DOTS", bf16_dots)
  ours = layers.Conv(6, 10, (k, k), strides=stride, padding=padding, dtype=dtype, rngs=nnx.Rngs(0))
  ref = nnx.Conv(6, 10, (k, k), strides=stride, padding=padding, dtype=dtype, rngs=nnx.Rngs(1))
  ref.kernel[...] = ours.kernel[...]
  ref.bias[...] = ours.bias[...] = jax.random.normal(jax.random.key(2), (10,))
  x = jax.random.normal(jax.random.key(3), (2, 8, 7, 6))
  path, _ = ours.cpu_path(x, layers.as_dtype(dtype or "float32"))
  expected = "dense" if k == 1 else None
  if patch_path:
    expected = "patches" if bf16_dots else "patch_grads"
  assert path == expected
  assert_same_layer(ours, ref, x, tol)


def test_cpu_dot_dtype(monkeypatch):
  """bf16 matmul operands stay bf16 where the CPU's bf16 dots beat float32's and are upcast to
  float32 elsewhere; other dtypes are left alone. The compiled dense layer shows it."""
  from radjax.models import layers
  monkeypatch.setenv("RADJAX_MKL", "off")  # XLA's dot (MKL's custom call: tests/test_mkl_gemm.py)
  x = jnp.ones((8, 16), jnp.bfloat16)
  kernel, bias = jnp.ones((16, 4)), jnp.zeros((4,))
  for native, operand in ((True, jnp.bfloat16), (False, jnp.float32)):
    monkeypatch.setattr(layers, "CPU_BF16_DOTS", native)
    assert layers.cpu_dot_dtype(jnp.bfloat16) == operand
    assert layers.cpu_dot_dtype(jnp.float32) == jnp.float32
    assert layers.cpu_dot_dtype(jnp.float16) == jnp.float16
    hlo = jax.jit(lambda x, k, b: layers._dense_f32acc(x, k, b)).lower(x, kernel, bias).as_text()
    dot = next(l for l in hlo.splitlines() if "dot_general" in l)
    operand_types = dot.split(": (")[1].split(") ->")[0]  # "tensor<8x16xf32>, tensor<16x4xf32>"
    assert operand_types.count("x" + {jnp.bfloat16: "bf16", jnp.float32: "f32"}[operand] + ">") == 2, dot


@pytest.mark.parametrize("kernel_size,pads", [
    ((3, 3), ((1, 1), (1, 1))), ((3, 5), ((2, 0), (0, 4))), ((2, 2), ((0, 1), (1, 0)))])
@pytest.mark.parametrize("conv_name", ["_conv_f32acc", "_conv_patch_grads"])
def test_patch_conv_matches_lax_conv(kernel_size, pads, conv_name):
  """The patch-matmul convolution and its hand-written backward (flipped kernel, re-padded
  cotangent, transposed weight gradient), and XLA's convolution with patch-matmul weight
  gradients, equal lax.conv_general_dilated's in float32, for non-square kernels, inputs and
  asymmetric pads."""
  from radjax.models import layers
  conv = getattr(layers, conv_name)
  kx, kk, kb, kg = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (2, 9, 7, 5))
  kernel = jax.random.normal(kk, kernel_size + (5, 4))
  bias = jax.random.normal(kb, (4,))
  ref = lambda x, k, b: jax.lax.conv_general_dilated(
      x, k, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST) + b
  y_ref, vjp_ref = jax.vjp(ref, x, kernel, bias)
  y, vjp = jax.vjp(lambda x, k, b: conv(x, k, b, pads), x, kernel, bias)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(kg, y.shape)
  for ours, theirs in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("k", [2, 3])
def test_avg_pool_and_its_gradient_match_numpy(k, dtype):
  """ResNet's average pool (strided slices forward, a broadcast backward) against NumPy's window
  means, with a remainder row and column that torch's AvgPool2d drops (gradient 0 there)."""
  from radjax.models.resnet import avg_pool
  x = jax.random.normal(jax.random.key(0), (2, 3 * k + 1, 2 * k + 1, 5), dtype)
  w = np.asarray(jax.random.normal(jax.random.key(1), (2, 3, 2, 5)), np.float64)
  y, vjp = jax.vjp(lambda x: avg_pool(x, k), x)
  (dx,) = vjp(jnp.asarray(w, dtype))
  x64 = np.asarray(x, np.float64)[:, :3 * k, :2 * k]
  want = x64.reshape(2, 3, k, 2, k, 5).mean((2, 4))
  want_dx = np.zeros(x.shape)
  want_dx[:, :3 * k, :2 * k] = np.repeat(np.repeat(w, k, 1), k, 2) / k ** 2
  tol = 1e-2 if dtype == "bfloat16" else 1e-6
  assert y.dtype == dx.dtype == x.dtype
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, rtol=tol, atol=tol)


def test_batch_norm_train_matches_numpy():
  """The hand-written BatchNorm forward and backward against the textbook formulas in float64:
  y = scale * (x - mean) / sqrt(var + eps) + bias over [N, H, W];
  dx = scale * rstd / n * (n * g - sum(g) - x_hat * sum(g * x_hat))."""
  from radjax.models.layers import batch_norm_train
  kx, ks, kb, kg = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, (3, 5, 4, 6)) * 2 + 3  # a mean far from 0: E[x^2] - E[x]^2 is tested
  scale, bias = jax.random.normal(ks, (6,)), jax.random.normal(kb, (6,))
  g = jax.random.normal(kg, x.shape)
  (y, mean, var), vjp = jax.vjp(lambda x, s, b: batch_norm_train(x, s, b, 1e-5), x, scale, bias)
  dx, dscale, dbias = vjp((g, jnp.zeros_like(mean), jnp.zeros_like(var)))

  x64, s64, b64, g64 = (np.asarray(a, np.float64) for a in (x, scale, bias, g))
  n = x64.size // 6
  mean64, var64 = x64.mean((0, 1, 2)), x64.var((0, 1, 2))
  rstd = 1 / np.sqrt(var64 + 1e-5)
  x_hat = (x64 - mean64) * rstd
  sum_g, sum_gx = g64.sum((0, 1, 2)), (g64 * x_hat).sum((0, 1, 2))
  for ours, ref in [(y, s64 * x_hat + b64), (mean, mean64), (var, var64),
                    (dx, s64 * rstd / n * (n * g64 - sum_g - x_hat * sum_gx)),
                    (dscale, sum_gx), (dbias, sum_g)]:
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(None, 1e-5), ("bfloat16", 2e-2)])
def test_batch_norm_matches_nnx_batch_norm(dtype, tol):
  """layers.BatchNorm against flax's nnx.BatchNorm: in training mode the same outputs, gradients
  for x, scale and bias, and running statistics; in eval mode (nnx's own path) the same outputs."""
  from radjax.models import layers
  x = jax.random.normal(jax.random.key(0), (4, 5, 3, 8)) * 3 + 1
  w = jax.random.normal(jax.random.key(1), x.shape)
  layers_ = []
  for cls in (layers.BatchNorm, nnx.BatchNorm):
    bn = cls(8, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=nnx.Rngs(0))
    bn.scale[...], bn.bias[...] = jnp.linspace(0.5, 2, 8), jnp.linspace(-1, 1, 8)
    layers_.append(bn)

  def loss(bn, x):
    return jnp.vdot(jax.nn.relu(bn(x, use_running_average=False)).astype(jnp.float32), w)

  results = []
  for bn in layers_:
    value, (dbn, dx) = nnx.value_and_grad(loss, argnums=(0, 1))(bn, x)
    results.append((value, dx, dbn["scale"][...], dbn["bias"][...], bn.mean[...], bn.var[...]))
  for ours, ref in zip(*results):
    assert ours.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                               rtol=tol, atol=tol * 10)
  assert not np.allclose(layers_[0].mean[...], 0)  # the running mean did move
  ours, ref = (np.asarray(bn(x, use_running_average=True), np.float32) for bn in layers_)
  np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol)


# ---------------------------------------------------------------- image encoders

@pytest.mark.parametrize("pool,posemb", [("cls", "learned"), ("gap", "sincos2d")])
def test_vit_forward_and_keep_ids(pool, posemb):
  c = ViTConfig("ti", patch_size=8, image_size=32, channels=1, depth=2, pool=pool, posemb=posemb)
  vit = ViT(c, rngs=nnx.Rngs(0))
  assert (vit.embed_dim, vit.num_patches, vit.patch_size) == (192, 16, 8)
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 1))
  p = 1 if pool == "cls" else 0
  out = vit(x)
  assert out["tokens"].shape == (3, 16 + p, 192) and out["pooled"].shape == (3, 192)
  keep, mask, restore = random_masking(jax.random.key(1), 3, 16, 0.75)
  masked = vit(x, keep_ids=keep)
  assert masked["tokens"].shape == (3, 4 + p, 192) and masked["pooled"].shape == (3, 192)
  # keep_ids selecting every patch is the unmasked forward (attention is permutation-equivariant).
  perm = jnp.stack([jax.random.permutation(jax.random.key(i), 16) for i in range(3)])
  full = vit(x, keep_ids=perm)
  np.testing.assert_allclose(full["pooled"], out["pooled"], atol=2e-5)
  # Only the kept patches matter: changing pixels of dropped patches leaves the output unchanged.
  patches = patchify(x, 8)
  noise = jnp.where(mask[..., None] > 0, 10.0, 0.0)
  x2 = unpatchify(patches + noise, 8, channels=1)
  np.testing.assert_allclose(vit(x2, keep_ids=keep)["pooled"], masked["pooled"], atol=2e-5)


def test_vit_divisibility_error():
  with pytest.raises(ValueError, match=r"65.*16"):
    ViT(ViTConfig("ti", image_size=65, patch_size=16), rngs=nnx.Rngs(0))


def _shapes(model, *args, **kwargs):
  """The shapes ``model(*args, **kwargs)`` returns, traced, not run: a shape test compiles nothing."""
  return nnx.eval_shape(lambda m: m(*args, **kwargs), model)


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_resnet_forward(norm):
  net = ResNet(ResNetConfig("18", image_size=64, channels=1, norm=norm), rngs=nnx.Rngs(0))
  out = _shapes(net, jnp.ones((2, 64, 64, 1)))
  assert out["tokens"].shape == (2, 4, 512) and out["pooled"].shape == (2, 512)
  assert net.embed_dim == 512 and net.num_patches == 4
  net.eval()
  assert _shapes(net, jnp.ones((2, 64, 64, 1)))["pooled"].shape == (2, 512)
  with pytest.raises(ValueError, match="keep_ids"):
    _shapes(net, jnp.ones((2, 64, 64, 1)), keep_ids=jnp.zeros((2, 1), jnp.int32))


@pytest.mark.parametrize("size", [64, 72, 100])
def test_clip_style_resnet_grid_and_errors(size):
  """style "clip" on sizes that are not multiples of 32: the attention pool's position embedding
  has one row per token the network really produces (average pools round down)."""
  c = ResNetConfig("50", blocks=(1, 1, 1, 1), width=8, image_size=size, channels=1, style="clip")
  net = ResNet(c, rngs=nnx.Rngs(0))
  out = nnx.jit(lambda net, x: net(x))(net, jnp.ones((2, size, size, 1)))  # one compile, not one per op
  assert out["tokens"].shape == (2, net.num_patches, 256) and out["pooled"].shape == (2, 256)
  assert net.attn_pool.pos_embed.shape == (net.num_patches + 1, 256)
  assert F.resnet_flops(c) > F.resnet_flops(dataclasses.replace(c, style="torchvision"))
  with pytest.raises(ValueError, match="bottleneck"):
    ResNet(dataclasses.replace(c, variant="18"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="style"):
    ResNet(dataclasses.replace(c, style="timm"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("mkl", ["off", "on"])
def test_resnet_step_convolution_paths(mkl, monkeypatch):
  """A jitted ResNet backward on CPU compiles and runs with every stride-1 convolution on its CPU
  path: in bf16 with bf16 dots as patch matmuls, which leaves only the stride-2 stem convolution
  (its forward and weight gradient); in float32, and in bf16 without bf16 dots, as XLA's
  convolutions without their weight gradients (forward and input gradient each). With MKL, those
  on maps of 16x16 and more are shifted GEMMs through MKL in every case. Gradients in bf16
  follow float32's (the same network with float32 compute)."""
  from radjax import mkl_gemm
  from radjax.models import layers
  if jax.default_backend() != "cpu" or jax.device_count() > 1:
    pytest.skip("the patch paths are CPU, single-device only")
  if mkl == "on" and mkl_gemm.find_mkl() is None:
    pytest.skip("MKL is not installed")
  monkeypatch.setenv(mkl_gemm.ENV, mkl)
  grads, convs, mkl_convs = {}, {}, {}
  for dtype, bf16_dots in (("bfloat16", True), ("bfloat16", False), ("float32", None)):
    monkeypatch.setattr(layers, "CPU_BF16_DOTS", bf16_dots)
    c = ResNetConfig("50", blocks=(1, 1, 1, 1), width=8, image_size=64, channels=1, style="clip",
                     dtype=dtype)
    graphdef, params, rest = nnx.split(ResNet(c, rngs=nnx.Rngs(0)), nnx.Param, ...)
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest)(x)["pooled"].astype(jnp.float32) ** 2)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 1))
    step = jax.jit(jax.grad(loss))
    hlo = step.lower(params, x).compile().as_text()
    convs[dtype, bf16_dots] = hlo.count(" convolution(")
    mkl_convs[dtype, bf16_dots] = hlo.count(f'custom_call_target="{mkl_gemm.CONV_TARGET}"')
    grads[dtype, bf16_dots] = jax.tree.leaves(step(params, x))
  # The stride-2 stem convolution: forward + weight gradient (2). The 6 stride-1 3x3 ones (2 in
  # the stem at 32x32, 1 per block at 16, 16, 8, 4: a block pools after its convolution): none
  # as patches; forward + input gradient each on "patch_grads". With MKL the four on maps of 16
  # and more are MKL's (forward + input gradient each).
  on_xla = 6 if mkl == "off" else 2
  assert convs == {("bfloat16", True): 2, ("bfloat16", False): 2 + on_xla * 2,
                   ("float32", None): 2 + on_xla * 2}
  assert set(mkl_convs.values()) == {(6 - on_xla) * 2}
  ref = np.concatenate([np.ravel(g) for g in grads["float32", None]])
  for bf16_dots in (True, False):
    ours = np.concatenate([np.ravel(g) for g in grads["bfloat16", bf16_dots]])
    assert np.all(np.isfinite(ours))
    # bf16 rounding through the network: 3.8 % here, and 3.6 % with nnx.Conv's bf16 convolutions.
    assert np.linalg.norm(ours - ref) <= 0.05 * np.linalg.norm(ref)


def test_resnet50_embed_dim():
  net = nnx.eval_shape(lambda: ResNet(ResNetConfig("50", image_size=64, channels=1),
                                      rngs=nnx.Rngs(0)))
  assert net.embed_dim == 2048


OPEN_CLIP_FIXTURE = Path(__file__).parent / "data" / "open_clip_modified_resnet.npz"


def _open_clip_resnet():
  """radjax's ResNet(style="clip") holding the fixture's open_clip ModifiedResNet weights."""
  from radjax.models.open_clip_port import load_open_clip_resnet
  data = dict(np.load(OPEN_CLIP_FIXTURE))
  weights = {k[2:]: v for k, v in data.items() if k.startswith("w/")}
  net = ResNet(ResNetConfig("50", blocks=(2, 1, 1, 1), width=4, attn_heads=2, image_size=64,
                            channels=3, style="clip", norm="batch"), rngs=nnx.Rngs(0))
  return net, weights, data


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_clip_resnet_matches_open_clip(mode):
  """ResNet(style="clip") with open_clip ModifiedResNet weights gives open_clip's feature map and
  attention-pool output (c_proj applied after radjax's "pooled"), with BatchNorm's running
  statistics (eval) and batch statistics (train). Fixture: scripts/open_clip_resnet_fixture.py."""
  from radjax.models.open_clip_port import load_open_clip_resnet
  net, weights, data = _open_clip_resnet()
  c_kernel, c_bias = load_open_clip_resnet(net, weights)
  net.eval() if mode == "eval" else net.train()
  out = net(jnp.asarray(data["image"]))
  assert out["tokens"].shape == (3, 4, 128) and net.grid_size == 2 and net.embed_dim == 128
  np.testing.assert_allclose(np.asarray(out["tokens"]).reshape(3, 2, 2, 128),
                             data[f"features_{mode}"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out["pooled"]) @ c_kernel + c_bias, data[f"pooled_{mode}"],
                             rtol=1e-4, atol=1e-4)


def test_open_clip_resnet_port_names_bad_weights():
  from radjax.models.open_clip_port import load_open_clip_resnet
  net, weights, _ = _open_clip_resnet()
  bad = dict(weights, **{"layer2.0.conv2.weight": weights["layer2.0.conv2.weight"][:, :-1]})
  with pytest.raises(ValueError, match=r"layer2\.0\.conv2\.weight has shape"):
    load_open_clip_resnet(net, bad)
  with pytest.raises(KeyError, match="attnpool.q_proj.bias"):
    load_open_clip_resnet(net, {k: v for k, v in weights.items() if k != "attnpool.q_proj.bias"})
  with pytest.raises(ValueError, match="not used"):
    load_open_clip_resnet(net, dict(weights, **{"layer5.0.conv1.weight": np.zeros(1)}))


# ---------------------------------------------------------------- text encoders

def _small_bert(**kw):
  return BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                    intermediate_size=64, max_position_embeddings=16, **kw)


@pytest.mark.parametrize("pool", ["cls", "pooler", "mean"])
def test_bert_forward(pool):
  bert = BertEncoder(_small_bert(pool=pool, pooler=pool == "pooler"), rngs=nnx.Rngs(0))
  ids = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % 100
  mask = jnp.ones_like(ids).at[1, 6:].set(0)
  out = bert(ids, mask)
  assert out["tokens"].shape == (2, 12, 32) and out["pooled"].shape == (2, 32)
  # Padding does not change real tokens' outputs.
  ids2 = ids.at[1, 6:].set(7)
  np.testing.assert_allclose(bert(ids2, mask)["tokens"][1, :6], out["tokens"][1, :6], atol=1e-5)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    bert(jnp.zeros((1, 17), jnp.int32), jnp.ones((1, 17), jnp.int32))


def test_clip_text_forward_causal_argmax():
  c = CLIPTextConfig(vocab_size=100, context_length=10, width=32, num_heads=4, num_layers=2,
                     proj_dim=16)
  enc = CLIPTextEncoder(c, rngs=nnx.Rngs(0))
  ids = jnp.array([[1, 5, 6, 99, 0, 0, 0, 0], [1, 7, 8, 9, 10, 99, 0, 0]], jnp.int32)
  out = enc(ids)
  assert out["tokens"].shape == (2, 8, 32) and out["pooled"].shape == (2, 16)
  # Causal: tokens after the EOT (argmax id) do not change the pooled output.
  np.testing.assert_allclose(enc(ids.at[:, 7].set(3))["pooled"], out["pooled"], atol=1e-5)


def test_text_encoders_add_input_bias_to_the_embeddings():
  ids = jnp.array([[1, 5, 6, 99, 0, 0], [1, 7, 8, 9, 10, 99]], jnp.int32)
  bert = BertEncoder(_small_bert(), rngs=nnx.Rngs(0))
  clip_text = CLIPTextEncoder(CLIPTextConfig(vocab_size=100, context_length=10, width=32, num_heads=4,
                                             num_layers=2), rngs=nnx.Rngs(0))
  for enc in (bert, clip_text):
    plain = enc(ids)["tokens"]
    np.testing.assert_allclose(enc(ids, input_bias=jnp.zeros((2, 1, 32)))["tokens"], plain, atol=1e-6)
    # A per-example bias [B, 1, D] reaches every position of its own example only.
    bias = jnp.zeros((2, 1, 32)).at[0].set(jax.random.normal(jax.random.key(0), (1, 32)))
    out = enc(ids, input_bias=bias)["tokens"]
    assert np.abs(np.asarray(out[0] - plain[0])).max(-1).min() > 1e-4  # every position moved
    np.testing.assert_allclose(out[1], plain[1], atol=1e-5)


# ---------------------------------------------------------------- pooled_only
# Encoders read through one pooled token run their last block's queries and MLP on that row
# only (Transformer's ``rows``): the pooled output and its gradients must equal the full path's.

_TEXT_IDS = jnp.array([[1, 5, 6, 99, 0, 0, 0, 0], [1, 7, 8, 9, 10, 99, 0, 0],
                       [1, 2, 3, 4, 5, 6, 7, 99]], jnp.int32)
_TEXT_MASK = (jnp.arange(8)[None] <= jnp.argmax(_TEXT_IDS, 1)[:, None]).astype(jnp.int32)


def _pooled_only_cases():
  small_vit = dict(image_size=16, patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64,
                   channels=1)
  img = jax.random.normal(jax.random.key(1), (3, 16, 16, 1))
  text = dict(vocab_size=100, context_length=10, width=32, num_heads=4, num_layers=2, proj_dim=16)
  # (name, build, inputs, how padding after the pooled token may change without effect)
  return [
      ("vit_cls", lambda: ViT(ViTConfig(**small_vit), rngs=nnx.Rngs(0)), (img,), None),
      ("vit_gap", lambda: ViT(ViTConfig(pool="gap", **small_vit), rngs=nnx.Rngs(0)), (img,), None),
      ("clip_text_argmax", lambda: CLIPTextEncoder(CLIPTextConfig(**text), rngs=nnx.Rngs(0)),
       (_TEXT_IDS,), "causal"),
      ("clip_text_last", lambda: CLIPTextEncoder(CLIPTextConfig(pool="last", **text),
                                                 rngs=nnx.Rngs(0)), (_TEXT_IDS, _TEXT_MASK), "causal"),
      ("bert_cls", lambda: BertEncoder(_small_bert(), rngs=nnx.Rngs(0)),
       (_TEXT_IDS, _TEXT_MASK), "mask"),
      ("bert_pooler", lambda: BertEncoder(_small_bert(pool="pooler", pooler=True), rngs=nnx.Rngs(0)),
       (_TEXT_IDS, _TEXT_MASK), "mask"),
      ("bert_mean", lambda: BertEncoder(_small_bert(pool="mean"), rngs=nnx.Rngs(0)),
       (_TEXT_IDS, _TEXT_MASK), "mask"),
      ("resnet", lambda: ResNet(ResNetConfig("18", image_size=32, channels=1, width=8),
                                rngs=nnx.Rngs(0)),
       (jax.random.normal(jax.random.key(2), (2, 32, 32, 1)),), None),
  ]


@pytest.mark.parametrize("case", _pooled_only_cases(), ids=lambda c: c[0])
def test_pooled_only_matches_the_full_pooled_output(case):
  _, build, inputs, padding = case
  model = build()
  assert set(nnx.eval_shape(lambda m: m(*inputs, pooled_only=True), model)) == {"pooled"}
  probe = jax.random.normal(jax.random.key(3), nnx.eval_shape(lambda m: m(*inputs)["pooled"], model).shape)

  # The pooled output and the gradients of a loss on it, in one jitted function per path: one
  # compile costs a fraction of compiling each op of the forward and the backward eagerly.
  @nnx.jit(static_argnums=1)
  def pooled_and_grads(m, pooled_only):
    def loss(m):
      pooled = m(*inputs, pooled_only=pooled_only)["pooled"]
      return (pooled * probe).sum(), pooled
    (_, pooled), grads = nnx.value_and_grad(loss, has_aux=True)(m)
    return pooled, jax.tree.leaves(grads)

  (want, grads_full), (got, grads_part) = pooled_and_grads(model, False), pooled_and_grads(model, True)
  np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.abs(want).max()))
  # Leaf by leaf, to 1e-4 of the leaf's scale (and 1e-6 of the largest: the key bias's gradient
  # is zero up to rounding).
  largest = max(float(jnp.abs(g).max()) for g in grads_full)
  for g_full, g_part in zip(grads_full, grads_part):
    np.testing.assert_allclose(g_part, g_full,
                               atol=1e-4 * float(jnp.abs(g_full).max()) + 1e-6 * largest)
  if padding is not None:
    # Positions after the pooled token (causal) or masked out (BERT) stay invisible to it.
    part = nnx.jit(lambda m, *a: m(*a, pooled_only=True)["pooled"])
    ids = inputs[0].at[:2, 7].set(42)
    np.testing.assert_allclose(part(model, ids, *inputs[1:]), got, atol=1e-5)


def test_transformer_rows_take_key_padding_masks_only():
  from radjax.models.transformer import Transformer
  tr = Transformer(1, 16, 2, 32, rngs=nnx.Rngs(0))
  x, rows = jnp.ones((2, 5, 16)), jnp.zeros((2, 1), jnp.int32)
  assert tr(x, jnp.ones((2, 5)), rows=rows).shape == (2, 1, 16)
  with pytest.raises(ValueError, match="key-padding mask"):
    tr(x, jnp.ones((2, 1, 5, 5), bool), rows=rows)


# ---------------------------------------------------------------- heads and decoders

@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 6), (3, 3, 8, 16), (1, 1, 5, 2)])
def test_flat_drawn_initializers_equal_flax_value_for_value(shape):
  """radjax draws 3-D and 4-D initial weights flat (such a draw compiles ~20x slower on XLA:CPU)
  and must get exactly the arrays flax's initializers give, so runs and checkpoints do not change."""
  from radjax.models import layers
  key = jax.random.key(3)
  for ours, flax_init in [(layers.default_kernel_init, nnx.initializers.lecun_normal()),
                          (layers.variance_scaling(2.0, "fan_out", "normal"),
                           nnx.initializers.variance_scaling(2.0, "fan_out", "normal")),
                          (layers.normal(0.02), nnx.initializers.normal(0.02))]:
    np.testing.assert_array_equal(ours(key, shape, jnp.float32), flax_init(key, shape, jnp.float32))


def test_heads_shapes():
  rngs = nnx.Rngs(0)
  x = jnp.ones((3, 32))
  assert _shapes(ProjectionHead(32, 16, rngs=rngs), x).shape == (3, 16)
  assert _shapes(ProjectionHead(32, 16, hidden_dim=64, rngs=rngs), x).shape == (3, 16)
  t = Temperature(0.07, init_bias=-10.0)
  np.testing.assert_allclose(t(), 1 / 0.07, rtol=1e-5)
  assert t.bias[...] == -10.0
  clf = ClassifierHead(32, 5, rngs=rngs)
  np.testing.assert_array_equal(clf(x), 0.0)
  image = {"tokens": jnp.ones((3, 9, 32)), "pooled": jnp.ones((3, 32))}
  text = {"tokens": jnp.ones((3, 7, 24)), "pooled": jnp.ones((3, 24))}
  tmask = jnp.ones((3, 7), jnp.int32).at[:, 5:].set(0)
  for fusion in ("concat", "cross_attention"):
    g = Teacher(32, 24, 5, fusion=fusion, hidden_dim=32, rngs=rngs)
    assert _shapes(g, image, text, tmask).shape == (3, 5)
  with pytest.raises(ValueError, match="fusion"):
    Teacher(32, 24, 5, fusion="sum", rngs=rngs)


@pytest.mark.parametrize("text_dim", [None, 24])
def test_mae_decoder(text_dim):
  vit = ViT(ViTConfig("ti", patch_size=8, image_size=32, channels=1, depth=1), rngs=nnx.Rngs(0))
  dec = MAEDecoder(vit.embed_dim, 64, vit.grid_size, dim=32, depth=1, text_dim=text_dim,
                   num_prefix_tokens=vit.num_prefix_tokens, rngs=nnx.Rngs(1))
  keep, mask, restore = random_masking(jax.random.key(0), 2, 16, 0.75)
  kw = {}
  if text_dim:
    kw = dict(text_tokens=jnp.ones((2, 5, text_dim)), text_mask=jnp.ones((2, 5), jnp.int32))
  pred = nnx.eval_shape(lambda vit, dec: dec(vit(jnp.ones((2, 32, 32, 1)), keep_ids=keep)["tokens"], restore, **kw),
                        vit, dec)
  assert pred.shape == (2, 16, 64)


def test_mlm_head():
  bert = BertEncoder(_small_bert(), rngs=nnx.Rngs(0))
  h = bert(jnp.ones((2, 8), jnp.int32))["tokens"]
  tied = MLMHead(32, 100, tied=True, rngs=nnx.Rngs(1))
  assert tied(h, bert.word_embeddings()).shape == (2, 8, 100)
  with pytest.raises(ValueError, match="embedding"):
    tied(h)
  assert MLMHead(32, 100, tied=False, rngs=nnx.Rngs(1))(h).shape == (2, 8, 100)


def test_report_decoder_and_generate():
  dec = ReportDecoder(50, 12, 24, dim=32, depth=2, num_heads=4, rngs=nnx.Rngs(0))
  img = jax.random.normal(jax.random.key(0), (2, 9, 24))
  ids = jax.random.randint(jax.random.key(1), (2, 10), 0, 50)
  logits = dec(ids, img)
  assert logits.shape == (2, 10, 50)
  # Causal: changing a later token leaves earlier logits unchanged.
  np.testing.assert_allclose(dec(ids.at[:, 7].set(3), img)[:, :7], logits[:, :7], atol=1e-5)
  gen = nnx.jit(lambda m, t: m.generate(t, 8, bos_id=1, eos_id=2))(dec, img)
  assert gen.shape == (2, 8) and gen.dtype == jnp.int32
  np.testing.assert_array_equal(gen[:, 0], 1)
  # Greedy consistency: each generated token is the argmax given the prefix.
  step_logits = dec(gen, img)
  np.testing.assert_array_equal(
      jnp.where(jnp.cumsum(gen[:, 1:-1] == 2, axis=1) > 0, 2, jnp.argmax(step_logits[:, :6], -1)),
      gen[:, 1:7])


# ---------------------------------------------------------------- masking utilities

def test_patchify_roundtrip_and_masking():
  x = jax.random.normal(jax.random.key(0), (2, 16, 24, 3))
  p = patchify(x, 4)
  assert p.shape == (2, 24, 48)
  np.testing.assert_array_equal(p[0, 1], x[0, 0:4, 4:8].reshape(-1))
  np.testing.assert_array_equal(unpatchify(p, 4, grid=(4, 6)), x)
  keep, mask, restore = random_masking(jax.random.key(1), 4, 24, 0.75)
  assert keep.shape == (4, 6) and mask.shape == (4, 24) and restore.shape == (4, 24)
  np.testing.assert_array_equal(mask.sum(1), 18)
  np.testing.assert_array_equal(jnp.take_along_axis(mask, keep, 1), 0)
  ids = jnp.concatenate([keep, jnp.full((4, 18), -1)], 1)
  restored = jnp.take_along_axis(ids, restore, 1)
  np.testing.assert_array_equal(jnp.where(mask > 0, -1, jnp.arange(24)), restored)


# ---------------------------------------------------------------- registry

def test_registry_defaults_and_variants():
  cfg = defaults.model_config()
  rngs = nnx.Rngs(0)
  v = build_image_encoder(cfg, rngs, image_size=32, channels=1)
  assert isinstance(v, ViT) and _shapes(v, jnp.ones((2, 32, 32, 1)))["pooled"].shape == (2, v.embed_dim)
  t = build_text_encoder(cfg, rngs, vocab_size=64, max_len=16)
  out = _shapes(t, jnp.ones((2, 16), jnp.int32), jnp.ones((2, 16), jnp.int32))
  assert isinstance(t, BertEncoder) and out["pooled"].shape == (2, cfg.text.hidden_size)
  r = build_image_encoder(dict(name="resnet", variant="18"), rngs, image_size=32, channels=1)
  assert isinstance(r, ResNet)
  c = build_text_encoder(dict(name="clip_text", hidden_size=32, num_layers=1, num_heads=4,
                              intermediate_size=64), rngs, vocab_size=64, max_len=8)
  assert isinstance(c, CLIPTextEncoder)
  with pytest.raises(ValueError, match="image.name"):
    build_image_encoder(dict(name="convnext"), rngs, image_size=32, channels=1)


# ---------------------------------------------------------------- FLOPs vs XLA cost analysis

def _xla_flops(build, *shapes, grad=False):
  graphdef, state = nnx.split(nnx.eval_shape(build))

  def fwd(state, *args):
    out = nnx.merge(graphdef, state)(*args)
    return out["pooled"].astype(jnp.float32).sum()

  f = jax.grad(fwd) if grad else fwd
  compiled = jax.jit(f).lower(state, *shapes).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # XLA counts no FLOPs for custom calls: MKL's GEMMs, where radjax uses them, by their shapes.
  return cost["flops"] + mkl_gemm.hlo_flops(compiled.as_text())


class _PooledOnly(nnx.Module):
  def __init__(self, encoder, pooled_only: bool):
    self.encoder, self.pooled_only = encoder, pooled_only

  def __call__(self, *args):
    return self.encoder(*args, pooled_only=self.pooled_only)


def test_flops_match_cost_analysis():
  b = 2
  img = lambda s, c: jax.ShapeDtypeStruct((b, s, s, c), jnp.float32)
  tok = jax.ShapeDtypeStruct((b, 64), jnp.int32)
  vit = ViTConfig("b", image_size=224)
  checks = [
      (lambda: ViT(vit, rngs=nnx.Rngs(0)), (img(224, 3),), F.vit_flops(vit)),
      (lambda: ResNet(ResNetConfig("50"), rngs=nnx.Rngs(0)), (img(224, 3),),
       F.resnet_flops(ResNetConfig("50"))),
      (lambda: ResNet(ResNetConfig("18"), rngs=nnx.Rngs(0)), (img(224, 3),),
       F.resnet_flops(ResNetConfig("18"))),
      (lambda: BertEncoder(BertConfig(num_layers=2), rngs=nnx.Rngs(0)), (tok, tok),
       F.bert_flops(BertConfig(num_layers=2), 64)),
      (lambda: CLIPTextEncoder(CLIPTextConfig(num_layers=2, context_length=64), rngs=nnx.Rngs(0)),
       (tok,), F.clip_text_flops(CLIPTextConfig(num_layers=2, context_length=64))),
  ]
  for build, shapes, analytic in checks:
    xla = _xla_flops(build, *shapes) / b
    assert rel(analytic, xla) < 0.1, (analytic, xla)
  # pooled_only: the FLOPs saved in the last block, analytic against XLA's count of the same two
  # programs (2 blocks, so the last one is half the encoder).
  small_vit = ViTConfig("s", image_size=64, patch_size=8, depth=2)
  small_text = CLIPTextConfig(num_layers=2, context_length=64)
  saved = [
      (lambda **kw: _xla_flops(lambda: _PooledOnly(ViT(small_vit, rngs=nnx.Rngs(0)), **kw),
                               img(64, 3)),
       F.vit_flops(small_vit) - F.vit_flops(small_vit, pooled_only=True)),
      (lambda **kw: _xla_flops(lambda: _PooledOnly(CLIPTextEncoder(small_text, rngs=nnx.Rngs(0)),
                                                   **kw), tok),
       F.clip_text_flops(small_text) - F.clip_text_flops(small_text, pooled_only=True)),
  ]
  for xla_flops, analytic in saved:
    xla = (xla_flops(pooled_only=False) - xla_flops(pooled_only=True)) / b
    assert analytic > 0 and rel(analytic, xla) < 0.1, (analytic, xla)
  # Forward + backward ~ 3 x forward.
  small = ViTConfig("s", image_size=64, patch_size=8, depth=2)
  xla = _xla_flops(lambda: ViT(small, rngs=nnx.Rngs(0)), img(64, 3), grad=True) / b
  assert rel(F.train_flops(F.vit_flops(small)), xla) < 0.2, (F.train_flops(F.vit_flops(small)), xla)
  # Published references: ResNet-50 4.1 GMACs, ViT-B/16 17.6 GMACs at 224.
  assert rel(F.resnet_flops(ResNetConfig("50")) / 2, 4.1e9) < 0.02
  assert rel(F.vit_flops(vit) / 2, 17.6e9) < 0.02


def test_model_flops_from_config():
  out = F.model_flops(defaults.model_config(), image_size=64, channels=1, text_len=64,
                      vocab_size=2048)
  assert out["image"] > 0 and out["text"] > 0
