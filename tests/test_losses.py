"""radjax.losses against independent NumPy float64 references, gradients, properties, stability."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import radjax.losses as L

# ---------------------------------------------------------------------------
# NumPy float64 references (written from the definitions; they do not call radjax).


def np_lse(x, axis):
  m = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_log_softmax(x):
  return x - np_lse(x, -1)[..., None]


def np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def np_masked_mean(v, m):
  m = np.asarray(m, np.float64)
  return float((v * m).sum() / m.sum()) if m.sum() > 0 else 0.0


def np_clip(img, txt, t):
  lg = np_normalize(img) @ np_normalize(txt).T / t
  d = np.diag(lg)
  return 0.5 * ((np_lse(lg, 1) - d).mean() + (np_lse(lg, 0) - d).mean())


def np_siglip(img, txt, t, b):
  lg = np_normalize(img) @ np_normalize(txt).T / t + b
  z = 2 * np.eye(len(img)) - 1
  return -np_log_sigmoid(z * lg).sum() / len(img)


def np_unicl(img, txt, t, pos):
  lg = np_normalize(img) @ np_normalize(txt).T / t
  pos = (pos != 0).astype(np.float64)

  def one(lg, p):
    lp = np_log_softmax(lg)
    keep = p.sum(1) > 0
    per = -(p * lp).sum(1)[keep] / p.sum(1)[keep]
    return per.mean() if keep.any() else 0.0

  return 0.5 * (one(lg, pos) + one(lg.T, pos.T))


def np_recon(p, t, m, norm):
  if norm:
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
  return np_masked_mean(((p - t) ** 2).mean(-1), m)


def np_token(lg, tgt, m):
  lp = np_log_softmax(lg)
  ce = -np.take_along_axis(lp, np.clip(tgt, 0, lg.shape[-1] - 1)[..., None], -1)[..., 0]
  return np_masked_mean(ce, m)


def np_bce_elem(x, y):
  return -(y * np_log_sigmoid(x) + (1 - y) * np_log_sigmoid(-x))


def np_bce(x, y, m=None):
  m = np.ones_like(x) if m is None else np.broadcast_to(np.reshape(m, (len(x), -1)), x.shape)
  return np_masked_mean(np_bce_elem(x, y), m)


def np_ce(x, y, m=None):
  ce = -np_log_softmax(x)[np.arange(len(x)), y]
  return np_masked_mean(ce, np.ones(len(x)) if m is None else m)


def np_softmax(x):
  return np.exp(np_log_softmax(x))


def np_distill(s, t, y, lam, tau, multilabel, m=None):
  if multilabel:
    hard = np_bce(s, y, m)
    soft = np_bce_elem(s, 1 / (1 + np.exp(-t / tau))).mean()
  else:
    hard = np_ce(s, y, m)
    soft = -(np_softmax(t / tau) * np_log_softmax(s)).sum(-1).mean()
  return (1 - lam) * hard + lam * soft


def f64(x):
  return np.asarray(x, np.float64)


def make_mask(rng, shape, kind):
  if kind == "random":
    m = (rng.rand(*shape) < 0.5).astype(np.float32)
    m.flat[0] = 1.0  # at least one
    return m
  m = np.zeros(shape, np.float32)
  if kind == "single":
    m.flat[rng.randint(m.size)] = 1.0
  return m  # "empty": nothing masked


# Jitted losses: one compilation per shape is ~8x faster on CPU than eager op-by-op
# dispatch (which compiles every primitive); test_losses_jit checks eager == jit.
_STATIC = {"distillation_loss": ("multilabel",),
           "masked_reconstruction_loss": ("normalize_target",)}
_JITTED = ("clip_loss", "siglip_loss", "unicl_loss", "contrastive_accuracy",
           "masked_reconstruction_loss", "masked_token_loss", "multilabel_bce", "cross_entropy",
           "soft_cross_entropy", "distillation_loss", "masked_mean")
J = types.SimpleNamespace(**{n: jax.jit(getattr(L, n), static_argnames=_STATIC.get(n, ()))
                             for n in _JITTED})


SHAPES_BD = [(1, 4), (3, 1), (5, 16), (8, 7)]
RTOL, ATOL = 2e-5, 2e-5


def is_f32_scalar(x):
  return isinstance(x, jax.Array) and x.shape == () and x.dtype == jnp.float32


# ---------------------------------------------------------------------------
# Values vs reference.


@pytest.mark.parametrize("b,d", SHAPES_BD)
def test_contrastive_match_reference(b, d):
  rng = np.random.RandomState(b * 100 + d)
  img, txt = rng.randn(b, d).astype(np.float32), rng.randn(b, d).astype(np.float32)
  t, bias = 0.07 + rng.rand(), rng.randn()
  out = J.clip_loss(img, txt, t)
  assert is_f32_scalar(out)
  np.testing.assert_allclose(out, np_clip(f64(img), f64(txt), t), RTOL, ATOL)
  out = J.siglip_loss(img, txt, t, bias)
  assert is_f32_scalar(out)
  np.testing.assert_allclose(out, np_siglip(f64(img), f64(txt), t, bias), RTOL, ATOL)
  pos = (rng.rand(b, b) < 0.3) | np.eye(b, dtype=bool)
  np.testing.assert_allclose(J.unicl_loss(img, txt, t, pos), np_unicl(f64(img), f64(txt), t, pos),
                             RTOL, ATOL)
  acc = (np.argmax(np_normalize(f64(img)) @ np_normalize(f64(txt)).T, 1) == np.arange(b)).mean()
  np.testing.assert_allclose(J.contrastive_accuracy(img, txt), acc)
  assert J.contrastive_accuracy(img, img) == 1.0 or d == 1


def test_unicl_with_identity_is_clip():
  rng = np.random.RandomState(0)
  img, txt = rng.randn(6, 5), rng.randn(6, 5)
  np.testing.assert_allclose(J.unicl_loss(img, txt, 0.2, np.eye(6)), J.clip_loss(img, txt, 0.2),
                             rtol=1e-6)


@pytest.mark.parametrize("b,n,d", [(1, 1, 3), (2, 5, 4), (3, 7, 12)])
@pytest.mark.parametrize("kind", ["random", "single", "empty"])
@pytest.mark.parametrize("norm", [False, True])
def test_masked_reconstruction_matches_reference(b, n, d, kind, norm):
  rng = np.random.RandomState(b + 10 * n + 100 * d)
  p, t = rng.randn(b, n, d).astype(np.float32), 3 + 2 * rng.randn(b, n, d).astype(np.float32)
  m = make_mask(rng, (b, n), kind)
  out = J.masked_reconstruction_loss(p, t, m, normalize_target=norm)
  assert is_f32_scalar(out)
  np.testing.assert_allclose(out, np_recon(f64(p), f64(t), m, norm), RTOL, ATOL)
  if kind == "empty":
    assert out == 0.0


@pytest.mark.parametrize("b,l,v", [(1, 1, 2), (2, 6, 11), (4, 3, 30)])
@pytest.mark.parametrize("kind", ["random", "single", "empty"])
def test_masked_token_matches_reference(b, l, v, kind):
  rng = np.random.RandomState(b + 10 * l + 100 * v)
  lg = 3 * rng.randn(b, l, v).astype(np.float32)
  m = make_mask(rng, (b, l), kind)
  tgt = np.where(m > 0, rng.randint(0, v, (b, l)), -100).astype(np.int32)  # ignore index elsewhere
  out = J.masked_token_loss(lg, tgt, m)
  assert is_f32_scalar(out)
  np.testing.assert_allclose(out, np_token(f64(lg), tgt, m), RTOL, ATOL)
  assert np.isfinite(out)


@pytest.mark.parametrize("b,k", [(1, 1), (3, 5), (8, 14)])
@pytest.mark.parametrize("kind", [None, "random", "single", "empty", "rows"])
def test_multilabel_bce_matches_reference(b, k, kind):
  rng = np.random.RandomState(b + 10 * k)
  x = 4 * rng.randn(b, k).astype(np.float32)
  y = (rng.rand(b, k) < 0.4).astype(np.float32)
  if kind is None:
    m = None
  elif kind == "rows":
    m = make_mask(rng, (b,), "random")
  else:
    m = make_mask(rng, (b, k), kind)
  out = J.multilabel_bce(x, y, m)
  assert is_f32_scalar(out)
  np.testing.assert_allclose(out, np_bce(f64(x), y, m), RTOL, ATOL)


def test_multilabel_bce_ignores_garbage_at_unobserved_entries():
  x = jnp.array([[1.0, -2.0, 0.5]])
  y = np.array([[1.0, np.nan, -1.0]], np.float32)
  m = np.array([[1.0, 1.0, 0.0]], np.float32)  # NaN is masked even though m says observed
  val, grad = vg(J.multilabel_bce)(x, y, m)
  np.testing.assert_allclose(val, np_bce_elem(1.0, 1.0), rtol=1e-6)
  assert np.all(np.isfinite(grad)) and grad[0, 1] == 0 and grad[0, 2] == 0


@pytest.mark.parametrize("b,c", [(1, 2), (5, 3), (9, 10)])
@pytest.mark.parametrize("kind", [None, "random", "single", "empty"])
def test_cross_entropy_matches_reference(b, c, kind):
  rng = np.random.RandomState(b + 10 * c)
  x = 3 * rng.randn(b, c).astype(np.float32)
  y = rng.randint(0, c, b).astype(np.int32)
  m = None if kind is None else make_mask(rng, (b,), kind)
  out = J.cross_entropy(x, y, m)
  assert is_f32_scalar(out)
  np.testing.assert_allclose(out, np_ce(f64(x), y, m), RTOL, ATOL)
  p = np_softmax(rng.randn(b, c))
  ref = -(p * np_log_softmax(f64(x))).sum(-1).mean()
  np.testing.assert_allclose(J.soft_cross_entropy(x, p), ref, RTOL, ATOL)


@pytest.mark.parametrize("b,k", [(1, 1), (4, 3), (7, 6)])
@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("kind", [None, "random", "single", "empty", "rows"])
def test_distillation_matches_reference(b, k, multilabel, kind):
  rng = np.random.RandomState(b + 10 * k + 100 * multilabel)
  if not multilabel and k == 1:
    k = 2
  s, t = 3 * rng.randn(b, k).astype(np.float32), 3 * rng.randn(b, k).astype(np.float32)
  y = ((rng.rand(b, k) < 0.5).astype(np.float32) if multilabel
       else rng.randint(0, k, b).astype(np.int32))
  if kind is None:
    m = None
  elif kind == "rows" or not multilabel:
    m = make_mask(rng, (b,), "random" if kind == "rows" else kind)
  else:
    m = make_mask(rng, (b, k), kind)
  lam, tau = rng.rand(), 0.5 + 3 * rng.rand()
  out = J.distillation_loss(s, t, y, lam, tau, multilabel=multilabel, label_mask=m)
  assert is_f32_scalar(out)
  ref = np_distill(f64(s), f64(t), y, lam, tau, multilabel, m)
  np.testing.assert_allclose(out, ref, RTOL, ATOL)


# ---------------------------------------------------------------------------
# bfloat16 inputs: float32 scalar, close to the reference on the rounded inputs.


def bf16(x):
  xb = jnp.asarray(x, jnp.bfloat16)
  return xb, np.asarray(xb.astype(jnp.float32), np.float64)


def test_bfloat16_inputs_give_float32():
  rng = np.random.RandomState(0)
  (img, img64), (txt, txt64) = bf16(rng.randn(6, 8)), bf16(rng.randn(6, 8))
  checks = [
      (J.clip_loss(img, txt, 0.1), np_clip(img64, txt64, 0.1)),
      (J.siglip_loss(img, txt, 0.1, -1.0), np_siglip(img64, txt64, 0.1, -1.0)),
  ]
  (p, p64), (t, t64) = bf16(rng.randn(2, 4, 5)), bf16(rng.randn(2, 4, 5))
  m = make_mask(rng, (2, 4), "random")
  checks.append((J.masked_reconstruction_loss(p, t, m, True), np_recon(p64, t64, m, True)))
  lg, lg64 = bf16(3 * rng.randn(2, 4, 9))
  tgt = rng.randint(0, 9, (2, 4))
  checks.append((J.masked_token_loss(lg, tgt, m), np_token(lg64, tgt, m)))
  (x, x64), (z, z64) = bf16(3 * rng.randn(6, 4)), bf16(3 * rng.randn(6, 4))
  y = (rng.rand(6, 4) < 0.5).astype(np.float32)
  checks.append((J.multilabel_bce(x, y), np_bce(x64, y)))
  checks.append((J.distillation_loss(x, z, y, 0.3, 2.0, multilabel=True),
                 np_distill(x64, z64, y, 0.3, 2.0, True)))
  yc = rng.randint(0, 4, 6)
  checks.append((J.distillation_loss(x, z, yc, 0.3, 2.0),
                 np_distill(x64, z64, yc, 0.3, 2.0, False)))
  for out, ref in checks:
    assert is_f32_scalar(out)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# Gradients vs finite differences (float64).


def test_gradients_match_finite_differences():
  rng = np.random.RandomState(1)
  with jax.enable_x64(True):
    a = lambda *s: jnp.asarray(rng.randn(*s), jnp.float64)  # noqa: E731
    img, txt = a(5, 4), a(5, 4)
    t, bias = jnp.float64(0.3), jnp.float64(-1.0)
    kw = dict(order=1, modes=("rev",))
    check_grads(J.clip_loss, (img, txt, t), **kw)
    check_grads(J.siglip_loss, (img, txt, t, bias), **kw)
    pos = jnp.asarray((rng.rand(5, 5) < 0.3) | np.eye(5, dtype=bool))
    check_grads(lambda i, x: J.unicl_loss(i, x, t, pos), (img, txt), **kw)

    p, tg = a(2, 3, 6), a(2, 3, 6)
    m = jnp.asarray(make_mask(rng, (2, 3), "random"), jnp.float64)
    for norm in (False, True):
      check_grads(lambda p, tg: J.masked_reconstruction_loss(p, tg, m, norm), (p, tg), **kw)
    lg = a(2, 3, 7)
    ids = jnp.asarray(rng.randint(0, 7, (2, 3)))
    check_grads(lambda lg: J.masked_token_loss(lg, ids, m), (lg,), **kw)

    x, z = a(4, 3), a(4, 3)
    y = jnp.asarray(rng.rand(4, 3) < 0.5, jnp.float64)
    lm = jnp.asarray(make_mask(rng, (4, 3), "random"), jnp.float64)
    check_grads(lambda x: J.multilabel_bce(x, y, lm), (x,), **kw)
    check_grads(lambda x: J.distillation_loss(x, z, y, 0.4, 2.0, True, lm), (x,), **kw)
    yc = jnp.asarray(rng.randint(0, 3, 4))
    check_grads(lambda x: J.distillation_loss(x, z, yc, 0.4, 2.0), (x,), **kw)
    check_grads(lambda x: J.cross_entropy(x, yc, lm[:, 0]), (x,), **kw)


@pytest.mark.parametrize("multilabel", [False, True])
def test_teacher_gets_no_gradient(multilabel):
  rng = np.random.RandomState(2)
  s, t = jnp.asarray(rng.randn(4, 3)), jnp.asarray(rng.randn(4, 3))
  y = (rng.rand(4, 3) < 0.5).astype(np.float32) if multilabel else rng.randint(0, 3, 4)
  gs, gt = jax.grad(J.distillation_loss, argnums=(0, 1))(s, t, y, 0.7, 2.0, multilabel)
  assert np.all(np.asarray(gt) == 0.0)
  assert np.abs(np.asarray(gs)).sum() > 0


def test_losses_jit():
  rng = np.random.RandomState(3)
  img, txt = rng.randn(4, 6).astype(np.float32), rng.randn(4, 6).astype(np.float32)
  np.testing.assert_allclose(J.clip_loss(img, txt, 0.1), L.clip_loss(img, txt, 0.1),
                             rtol=1e-6)
  f = J.distillation_loss
  y = (rng.rand(4, 6) < 0.5).astype(np.float32)
  np.testing.assert_allclose(f(img, txt, y, 0.5, 2.0, multilabel=True),
                             L.distillation_loss(img, txt, y, 0.5, 2.0, multilabel=True), rtol=1e-6)


# ---------------------------------------------------------------------------
# Property tests.

_B = st.sampled_from([2, 3, 6])
_SEED = st.integers(0, 2**31 - 1)


@settings(max_examples=20, deadline=None)
@given(b=_B, seed=_SEED)
def test_clip_invariant_to_joint_batch_permutation(b, seed):
  rng = np.random.RandomState(seed)
  img, txt = rng.randn(b, 5).astype(np.float32), rng.randn(b, 5).astype(np.float32)
  perm = rng.permutation(b)
  np.testing.assert_allclose(J.clip_loss(img[perm], txt[perm], 0.2), J.clip_loss(img, txt, 0.2),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(J.siglip_loss(img[perm], txt[perm], 0.2, -1.0),
                             J.siglip_loss(img, txt, 0.2, -1.0), rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(b=_B, seed=_SEED, multilabel=st.booleans(), masked=st.booleans())
def test_distillation_lam_zero_is_plain_loss(b, seed, multilabel, masked):
  rng = np.random.RandomState(seed)
  k = 4
  s, t = 5 * rng.randn(b, k).astype(np.float32), 5 * rng.randn(b, k).astype(np.float32)
  if multilabel:
    y = (rng.rand(b, k) < 0.5).astype(np.float32)
    m = (rng.rand(b, k) < 0.6).astype(np.float32) if masked else None
    plain = J.multilabel_bce(s, y, m)
  else:
    y = rng.randint(0, k, b).astype(np.int32)
    m = (rng.rand(b) < 0.6).astype(np.float32) if masked else None
    plain = J.cross_entropy(s, y, m)
  tau = 0.1 + 5 * rng.rand()
  out = J.distillation_loss(s, t, y, 0.0, tau, multilabel=multilabel, label_mask=m)
  np.testing.assert_allclose(out, plain, rtol=1e-6, atol=1e-7)


@settings(max_examples=20, deadline=None)
@given(b=st.sampled_from([2, 4, 8]), seed=_SEED)
def test_clip_perfect_alignment_decreases_to_zero_with_temperature(b, seed):
  rng = np.random.RandomState(seed)
  emb = rng.randn(b, 8)
  u = np_normalize(emb)
  gap = 1 - np.max(u @ u.T - 2 * np.eye(b))  # 1 - largest off-diagonal cosine
  assume(gap > 0.2)
  temps = [1.0, 0.5, 0.2, 0.1, 0.05, 0.02]
  losses = [float(J.clip_loss(emb.astype(np.float32), emb.astype(np.float32), t)) for t in temps]
  # float32 log-sum-exp resolves a loss near 0 to about 1e-6; monotone up to that.
  assert all(l1 <= l0 + 5e-6 for l0, l1 in zip(losses, losses[1:])), losses
  assert losses[-1] < losses[0]
  assert losses[-1] <= np.log1p((b - 1) * np.exp(-gap / temps[-1])) + 1e-5
  assert losses[-1] < 1e-2


# ---------------------------------------------------------------------------
# Stability.


def vg(f, argnums=0):
  return jax.jit(jax.value_and_grad(f, argnums=argnums), static_argnums=_static_of(f))


def _static_of(f):
  # distillation_loss's `multilabel` (6th positional) and reconstruction's flag are static.
  return {J.distillation_loss: (5,), J.masked_reconstruction_loss: (3,)}.get(f, ())


def _finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


def test_huge_logits_are_finite():
  big = 1e4
  img = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
  txt = img[::-1].copy()
  for f in (lambda i, t: J.clip_loss(i, t, 1e-4),
            lambda i, t: J.siglip_loss(i, t, 1e-4, 1e4),
            lambda i, t: J.siglip_loss(i, t, 1e-4, -1e4)):
    assert _finite(vg(f, argnums=(0, 1))(img, txt))
  x = np.array([[big, -big, 0.0], [-big, big, big]], np.float32)
  y = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]], np.float32)
  yc = np.array([1, 0])
  assert _finite(vg(J.multilabel_bce)(x, y))
  assert _finite(vg(J.cross_entropy)(x, yc))
  for ml, lab in ((True, y), (False, yc)):
    assert _finite(vg(J.distillation_loss, argnums=(0, 1))(x, -x, lab, 0.5, 1e-3, ml))
  lg = big * np.random.RandomState(0).randn(2, 3, 5).astype(np.float32)
  ids, m = np.zeros((2, 3), np.int32), np.ones((2, 3), np.float32)
  assert _finite(vg(J.masked_token_loss)(lg, ids, m))
  assert _finite(vg(J.masked_reconstruction_loss)(lg, -lg, m, True))
  # bf16 huge logits too.
  assert _finite(J.multilabel_bce(jnp.asarray(x, jnp.bfloat16), y))


def test_zero_rows_are_finite():
  img = np.zeros((3, 4), np.float32)
  txt = np.random.RandomState(0).randn(3, 4).astype(np.float32)
  txt[1] = 0
  for f in (lambda i, t: J.clip_loss(i, t, 0.07), lambda i, t: J.siglip_loss(i, t, 0.1, -10.0),
            lambda i, t: J.unicl_loss(i, t, 0.07, np.eye(3))):
    assert _finite(vg(f, argnums=(0, 1))(img, txt))
    assert _finite(vg(f, argnums=(0, 1))(jnp.asarray(img, jnp.bfloat16), txt))
  assert np.isfinite(J.contrastive_accuracy(img, txt))
  # An all-zero constant patch with target normalisation: var = 0 -> eps keeps it finite.
  z = np.zeros((1, 2, 4), np.float32)
  assert _finite(vg(J.masked_reconstruction_loss)(z, z, np.ones((1, 2)), True))


def test_all_masked_out_gives_zero_and_finite_grad():
  rng = np.random.RandomState(0)
  x = rng.randn(3, 4).astype(np.float32)
  zero2 = np.zeros((3, 4), np.float32)
  for f in (lambda x: J.multilabel_bce(x, zero2, zero2),
            lambda x: J.cross_entropy(x, np.zeros(3, np.int32), np.zeros(3)),
            lambda x: J.masked_token_loss(x[None], np.zeros((1, 3), np.int32), np.zeros((1, 3))),
            lambda x: J.masked_reconstruction_loss(x[None], x[None] + 1, np.zeros((1, 3)), True),
            lambda x: J.distillation_loss(x, x, zero2, 0.0, 1.0, True, zero2),
            lambda x: J.masked_mean(x, zero2)):
    val, g = vg(f)(x)
    assert val == 0.0 and _finite(g), f


# ---------------------------------------------------------------------------
# Uncertain-label policy.


RAW = np.array([[1.0, 0.0, -1.0, np.nan], [-1.0, np.nan, 1.0, 0.0]], np.float32)


@pytest.mark.parametrize("policy,labels,mask", [
    ("ignore", [[1, 0, 0, 0], [0, 0, 1, 0]], [[1, 1, 0, 0], [0, 0, 1, 1]]),
    ("ones", [[1, 0, 1, 0], [1, 0, 1, 0]], [[1, 1, 1, 0], [1, 0, 1, 1]]),
    ("zeros", [[1, 0, 0, 0], [0, 0, 1, 0]], [[1, 1, 1, 0], [1, 0, 1, 1]]),
])
def test_apply_uncertain_policy(policy, labels, mask):
  y, m = L.apply_uncertain_policy(RAW, None, policy)
  assert isinstance(y, np.ndarray) and y.dtype == np.float32 and m.dtype == np.float32
  np.testing.assert_array_equal(y, labels)
  np.testing.assert_array_equal(m, mask)
  yj, mj = jax.jit(lambda r: L.apply_uncertain_policy(r, None, policy))(jnp.asarray(RAW))
  np.testing.assert_array_equal(yj, labels)
  np.testing.assert_array_equal(mj, mask)


def test_apply_uncertain_policy_keeps_existing_mask_and_default_is_ignore():
  given_mask = np.array([[0, 1, 1, 1], [1, 1, 0, 1]], np.float32)
  y, m = L.apply_uncertain_policy(RAW, given_mask)
  np.testing.assert_array_equal(m, [[0, 1, 0, 0], [0, 0, 0, 1]])
  np.testing.assert_array_equal(y, [[0, 0, 0, 0], [0, 0, 0, 0]])
  assert J.multilabel_bce(np.ones((2, 4), np.float32), y, m) > 0


def test_apply_uncertain_policy_errors():
  with pytest.raises(ValueError, match="policy"):
    L.apply_uncertain_policy(RAW, None, "u-maybe")
  with pytest.raises(ValueError, match="label_mask"):
    L.apply_uncertain_policy(RAW, np.ones((2, 3)))


# ---------------------------------------------------------------------------
# Shape errors name the argument.

_E2 = np.zeros((4, 8), np.float32)
_E3 = np.zeros((4, 8), np.float32)[:3]


@pytest.mark.parametrize("call,name", [
    (lambda: L.clip_loss(np.zeros(8), _E2, 0.1), "image_emb"),
    (lambda: L.clip_loss(_E2, np.zeros((4, 8, 1)), 0.1), "text_emb"),
    (lambda: L.clip_loss(_E2, _E3, 0.1), "text_emb"),
    (lambda: L.clip_loss(_E2, _E2, np.ones(2)), "temperature"),
    (lambda: L.siglip_loss(_E2, _E2, 0.1, np.ones(3)), "bias"),
    (lambda: L.siglip_loss(_E3, _E2, 0.1, 0.0), "image_emb"),
    (lambda: L.unicl_loss(_E2, _E2, 0.1, np.eye(3)), "positives"),
    (lambda: L.contrastive_accuracy(_E2, np.zeros((4, 7))), "text_emb"),
    (lambda: L.masked_reconstruction_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.ones(2)), "pred"),
    (lambda: L.masked_reconstruction_loss(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)),
                                          np.ones((2, 3))), "target"),
    (lambda: L.masked_reconstruction_loss(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)),
                                          np.ones((2, 4))), "mask"),
    (lambda: L.masked_token_loss(np.zeros((2, 3)), np.zeros((2, 3), int), np.ones((2, 3))),
     "logits"),
    (lambda: L.masked_token_loss(np.zeros((2, 3, 5)), np.zeros((2, 4), int), np.ones((2, 3))),
     "targets"),
    (lambda: L.masked_token_loss(np.zeros((2, 3, 5)), np.zeros((2, 3)), np.ones((2, 3))),
     "targets"),
    (lambda: L.masked_token_loss(np.zeros((2, 3, 5)), np.zeros((2, 3), int), np.ones(2)), "mask"),
    (lambda: L.multilabel_bce(np.zeros((2, 3)), np.zeros((2, 4))), "labels"),
    (lambda: L.multilabel_bce(np.zeros(3), np.zeros(3)), "logits"),
    (lambda: L.multilabel_bce(np.zeros((2, 3)), np.zeros((2, 3)), np.ones((3,))), "label_mask"),
    (lambda: L.cross_entropy(np.zeros((2, 3)), np.zeros((2, 3), int)), "labels"),
    (lambda: L.cross_entropy(np.zeros((2, 3)), np.zeros(2, int), np.ones((2, 3))), "label_mask"),
    (lambda: L.distillation_loss(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros(2, int), 0.5, 1.0),
     "teacher_logits"),
    (lambda: L.distillation_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(3, int), 0.5, 1.0),
     "labels"),
    (lambda: L.distillation_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(2), 0.5, 1.0),
     "labels"),
    (lambda: L.distillation_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(2), 0.5, 1.0, True),
     "labels"),
    (lambda: L.distillation_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)), 0.5, 1.0,
                                 True, np.ones((2, 2))), "label_mask"),
    (lambda: L.distillation_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros(2, int), np.ones(2),
                                 1.0), "lam"),
])
def test_shape_errors_name_the_argument(call, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    call()


def test_shape_errors_fire_at_trace_time():
  f = jax.jit(L.clip_loss)
  with pytest.raises(ValueError, match=r"\(4, 8\).*\(3, 8\)"):
    f(_E2, _E3, 0.1)
