"""Fast checks of the pieces inside the methods' objectives: each can fail on a plausible bug.

(The end-to-end "does it learn" runs are scripts/learning_checks.py; tests/test_methods.py runs
every method through the training loop.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from radjax.config import load_config
from radjax.methods import base, get_method
from radjax.methods import mrm as mrm_lib
from radjax.methods.ssl import random_view
from radjax.methods.unicl import texts_and_positives

PAD, CLS, SEP, MASK = 0, 2, 3, 4
VOCAB = 50


def tiny(method: str):
  return load_config(f"configs/pretrain_synth.py:{method},tiny", [])


def synth_batch(config, b: int = 4, seed: int = 0) -> dict:
  """A real SynthCXR batch of the tiny config (tokenised reports, labels)."""
  from radjax.data.pipeline import make_loader
  tok = base.tokenizer(config)
  loader = make_loader(config.data, "validation", batch_size=b, seed=seed, train=False, tokenizer=tok,
                       num_epochs=1)
  return {k: jnp.asarray(v) for k, v in next(iter(loader)).items()}


# ----------------------------------------------------------------------------- mask_tokens


def _reports(rng: np.random.Generator, b: int, lengths) -> tuple[jax.Array, jax.Array]:
  ids = np.full((b, 40), PAD, np.int32)
  mask = np.zeros((b, 40), np.int32)
  for i, n in enumerate(lengths):
    ids[i, 0], ids[i, n - 1] = CLS, SEP
    ids[i, 1:n - 1] = rng.integers(5, VOCAB, n - 2)
    mask[i, :n] = 1
  return jnp.asarray(ids), jnp.asarray(mask)


def test_mask_tokens_selects_real_non_special_tokens_at_the_ratio():
  rng = np.random.default_rng(0)
  b = 512
  lengths = rng.integers(3, 41, b)  # row with n = 3 has a single maskable token
  lengths[:4] = [3, 3, 40, 12]
  ids, mask = _reports(rng, b, lengths)
  new, predict = base.mask_tokens(jax.random.key(1), ids, mask, 0.15, mask_id=MASK, vocab_size=VOCAB,
                                  special_ids=(PAD, CLS, SEP))
  new, predict = np.asarray(new), np.asarray(predict)
  assert predict.dtype == np.float32 and predict.shape == ids.shape
  sel = predict > 0
  maskable = (np.asarray(mask) > 0) & ~np.isin(np.asarray(ids), (PAD, CLS, SEP))
  assert not (sel & ~maskable).any(), "selected a padding or special token"
  assert (sel.sum(1) >= 1).all(), "a report with no token to predict"
  assert sel[:2].sum() == 2  # the single maskable token of the 3-token reports
  # ~ratio of the maskable tokens (a little more: the guaranteed one per row).
  frac = sel.sum() / maskable.sum()
  assert 0.13 < frac < 0.19, frac
  # Unselected tokens are untouched; selected ones: ~80% [MASK], ~10% random, ~10% kept.
  np.testing.assert_array_equal(new[~sel], np.asarray(ids)[~sel])
  to_mask = (new[sel] == MASK).mean()
  kept = (new[sel] == np.asarray(ids)[sel]).mean()
  assert 0.75 < to_mask < 0.85 and 0.06 < kept < 0.15, (to_mask, kept)


def test_mask_tokens_leaves_a_report_without_maskable_tokens_alone():
  ids = jnp.asarray([[CLS, SEP, PAD, PAD], [CLS, 7, 8, SEP]], jnp.int32)
  mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1]], jnp.int32)
  new, predict = base.mask_tokens(jax.random.key(0), ids, mask, 0.0, mask_id=MASK, vocab_size=VOCAB,
                                  special_ids=(PAD, CLS, SEP))
  np.testing.assert_array_equal(np.asarray(predict[0]), 0)
  np.testing.assert_array_equal(np.asarray(new[0]), np.asarray(ids[0]))
  assert float(predict[1].sum()) == 1.0 and float(predict[1, 1:3].sum()) == 1.0  # ratio 0: exactly one


def test_mask_tokens_differs_per_key():
  ids, mask = _reports(np.random.default_rng(0), 8, [40] * 8)
  kw = dict(mask_id=MASK, vocab_size=VOCAB, special_ids=(PAD, CLS, SEP))
  _, p1 = base.mask_tokens(jax.random.key(0), ids, mask, 0.15, **kw)
  _, p2 = base.mask_tokens(jax.random.key(1), ids, mask, 0.15, **kw)
  assert not np.array_equal(np.asarray(p1), np.asarray(p2))


def test_mask_tokens_every_occurrence_masks_each_mention_of_a_selected_token_alike():
  rng = np.random.default_rng(0)
  b, n = 256, 40
  ids = np.full((b, n), PAD, np.int32)
  ids[:, 0], ids[:, n - 1] = CLS, SEP
  ids[:, 1:n - 1] = rng.integers(5, 15, (b, n - 2))  # ten words: each recurs within a report
  ids, mask = jnp.asarray(ids), jnp.ones((b, n), jnp.int32)
  kw = dict(mask_id=MASK, vocab_size=VOCAB, special_ids=(PAD, CLS, SEP))
  _, per_position = base.mask_tokens(jax.random.key(3), ids, mask, 0.05, **kw)
  new, predict = base.mask_tokens(jax.random.key(3), ids, mask, 0.05, every_occurrence=True, **kw)
  ids, new, sel, sel_pos = np.asarray(ids), np.asarray(new), np.asarray(predict) > 0, np.asarray(per_position) > 0
  assert (sel >= sel_pos).all(), "every_occurrence must extend the per-position selection"
  partial = 0
  for i in range(b):
    for word in range(5, 15):
      at = ids[i] == word
      partial += 0 < sel_pos[i][at].sum() < at.sum()
      if sel[i][at].any():
        assert sel[i][at].all(), (i, word)
        assert len(set(new[i][at].tolist())) == 1, "mentions of one word treated differently"
  assert partial > 0  # per-position masking does leave other mentions visible
  assert not (sel & ~np.isin(ids, range(5, 15))).any()
  np.testing.assert_array_equal(new[~sel], ids[~sel])
  assert 0.6 < (new[sel] == MASK).mean() < 0.95


# ----------------------------------------------------------------------------- UniCL


def test_unicl_positives():
  labels = jnp.asarray([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 1], [0, 0, 1], [0, 0, 0]], jnp.float32)
  b, k, l = labels.shape[0], labels.shape[1], 6
  text_ids = jnp.arange(b * l, dtype=jnp.int32).reshape(b, l) + 100  # distinct "reports"
  text_mask = jnp.ones((b, l), jnp.int32)
  prompt_ids = jnp.arange(k * l, dtype=jnp.int32).reshape(k, l) + 1000
  prompt_mask = jnp.ones((k, l), jnp.int32).at[:, -2:].set(0)
  seen_prompt = np.zeros(b, bool)
  for seed in range(40):
    ids, mask, pos, use = texts_and_positives(jax.random.key(seed), labels, text_ids, text_mask,
                                              prompt_ids, prompt_mask)
    ids, mask, pos, use = map(np.asarray, (ids, mask, pos, use))
    lab = np.asarray(labels) > 0
    assert pos.dtype == bool and pos.shape == (b, b)
    assert np.diagonal(pos).all()
    assert not use[~lab.any(1)].any(), "an image without findings got a class prompt"
    seen_prompt |= use
    picked = np.full(b, -1)
    for j in range(b):
      if use[j]:
        matches = [c for c in range(k) if np.array_equal(ids[j], np.asarray(prompt_ids[c]))]
        assert len(matches) == 1
        picked[j] = matches[0]
        assert lab[j, picked[j]], "prompt for a finding the image does not have"
        np.testing.assert_array_equal(mask[j], np.asarray(prompt_mask[picked[j]]))
      else:
        np.testing.assert_array_equal(ids[j], np.asarray(text_ids[j]))
    for i in range(b):
      for j in range(b):
        expect = i == j or (use[j] and lab[i, picked[j]])
        assert pos[i, j] == expect, (seed, i, j)
  assert seen_prompt[lab.any(1)].all()  # every image with a finding sometimes uses a prompt


# ----------------------------------------------------------------------------- SimCLR views


def test_simclr_views_differ_keep_shape_and_laterality():
  b, h, w = 6, 32, 32
  # Left half dark, right half bright: a flip would swap them.
  img = np.zeros((b, h, w, 1), np.float32)
  img[:, :, w // 2:] = 2.0
  img = jnp.asarray(img)
  v1 = random_view(jax.random.key(0), img)
  v2 = random_view(jax.random.key(1), img)
  assert v1.shape == img.shape and v1.dtype == img.dtype
  assert bool(jnp.all(jnp.isfinite(v1)))
  assert float(jnp.abs(v1 - v2).mean()) > 0.05
  assert float(jnp.abs(v1 - img).mean()) > 0.05
  # The crop keeps at least half the side, so the bright right half stays on the right.
  left, right = v1[:, :, : w // 4].mean(axis=(1, 2, 3)), v1[:, :, -w // 4:].mean(axis=(1, 2, 3))
  assert bool(jnp.all(right > left + 0.5))
  # bfloat16 in, bfloat16 out (the views feed the encoder in its compute dtype).
  assert random_view(jax.random.key(0), img.astype(jnp.bfloat16)).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- captioning


def test_caption_generate_and_causal_decoder():
  config = tiny("caption")
  model = get_method("caption").build(config, nnx.Rngs(0))
  tok = base.tokenizer(config)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32, 32, 1)), jnp.float32)
  out = nnx.jit(type(model).generate, static_argnums=2)(model, images, 12)
  assert out.shape == (3, 12) and out.dtype == jnp.int32
  out = np.asarray(out)
  assert (out[:, 0] == tok.cls_id).all()
  assert ((out >= 0) & (out < tok.vocab_size)).all()
  for row in out:  # after [SEP] only padding
    ends = np.flatnonzero(row == tok.sep_id)
    if ends.size:
      assert (row[ends[0] + 1:] == tok.pad_id).all()
  # Teacher forcing and greedy decoding rely on causality: position t ignores tokens after t.
  decode = nnx.jit(lambda m, ids, images: m.decoder(ids, m.image_encoder(images)["tokens"]))
  ids = jnp.asarray(np.random.default_rng(1).integers(5, tok.vocab_size, (3, 10)), jnp.int32)
  a = decode(model, ids, images)
  b = decode(model, ids.at[:, 6:].set(tok.pad_id), images)
  np.testing.assert_allclose(np.asarray(a[:, :6]), np.asarray(b[:, :6]), atol=1e-5)
  assert not np.allclose(np.asarray(a[:, 7:]), np.asarray(b[:, 7:]))
  # ... and it looks at the image.
  c = decode(model, ids, images[::-1])
  assert not np.allclose(np.asarray(a[0]), np.asarray(c[0]))


def test_caption_loss_ignores_padding():
  config = tiny("caption")
  method = get_method("caption")
  model = method.build(config, nnx.Rngs(0))
  batch = synth_batch(config)
  loss_fn = nnx.jit(lambda m, b: method.loss(m, b, jax.random.key(0), True))
  loss, metrics = loss_fn(model, batch)
  # Changing the padding ids (where text_mask = 0) must not change the loss.
  pad = batch["text_mask"] == 0
  assert bool(pad.any())
  junk = dict(batch, text_ids=jnp.where(pad, 7, batch["text_ids"]))
  loss2, _ = loss_fn(model, junk)
  # Causal decoder: junk after the report only feeds later (ignored) positions.
  np.testing.assert_allclose(float(loss), float(loss2), rtol=1e-5)
  assert np.isclose(float(metrics["perplexity"]), np.exp(float(loss)), rtol=1e-5)


# ----------------------------------------------------------------------------- MRM, clip_ssl, supervised


def test_mrm_uses_both_modalities():
  config = tiny("mrm")
  model = get_method("mrm").build(config, nnx.Rngs(0))
  batch = synth_batch(config)
  key = jax.random.key(3)
  forward = nnx.jit(mrm_lib.token_predictions)  # eager NNX is slow: compile once, call three times
  rec, _, logits, predict = forward(model, batch, key)
  assert logits.shape == batch["text_ids"].shape + (base.tokenizer(config).vocab_size,)
  assert float(predict.sum()) >= batch["text_ids"].shape[0]
  # Token predictions see the image...
  other = dict(batch, image=batch["image"][::-1])
  rec2, _, logits2, predict2 = forward(model, other, key)
  np.testing.assert_array_equal(np.asarray(predict), np.asarray(predict2))
  assert not np.allclose(np.asarray(logits[0]), np.asarray(logits2[0]))
  # ... and the image reconstruction sees the report.
  shuffled_text = dict(batch, text_ids=batch["text_ids"][::-1], text_mask=batch["text_mask"][::-1])
  rec3, _, _, _ = forward(model, shuffled_text, key)
  assert float(rec) != float(rec3)


def test_clip_ssl_is_alignment_plus_weighted_ssl():
  config = tiny("clip_ssl")
  config.unlock()
  config.method.ssl_weight = 0.3
  method = get_method("clip_ssl")
  model = method.build(config, nnx.Rngs(0))
  loss, m = nnx.jit(lambda m, b: method.loss(m, b, jax.random.key(0), True))(model, synth_batch(config))
  np.testing.assert_allclose(float(loss), float(m["align_loss"]) + 0.3 * float(m["reconstruction_loss"]),
                             rtol=1e-5)


def test_supervised_loss_respects_label_mask():
  config = tiny("supervised")
  method = get_method("supervised")
  model = method.build(config, nnx.Rngs(0))
  # The head starts at zero (p = 0.5 for every label, whatever the labels): make it say something.
  kernel = model.head.fc.kernel
  kernel[...] = jax.random.normal(jax.random.key(1), kernel.shape)
  batch = synth_batch(config)
  batch["label_mask"] = batch["label_mask"].at[:, 3:].set(0.0)
  loss_fn = nnx.jit(lambda m, b: method.loss(m, b, jax.random.key(0), True)[0])
  loss = float(loss_fn(model, batch))
  flipped = dict(batch, labels=batch["labels"].at[:, 3:].set(1.0 - batch["labels"][:, 3:]))
  np.testing.assert_allclose(float(loss_fn(model, flipped)), loss, rtol=1e-6)
  # ... while an observed label does change it.
  observed = dict(batch, labels=batch["labels"].at[:, 0].set(1.0 - batch["labels"][:, 0]))
  assert abs(float(loss_fn(model, observed)) - loss) > 1e-4
