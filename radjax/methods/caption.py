"""Report generation pre-training (``caption``, RadTex): the image encoder feeds a causal decoder
trained with teacher forcing to write the report. The encoder is what transfers."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from radjax.losses import masked_token_loss
from radjax.methods import base
from radjax.models.decoders import ReportDecoder


class Captioner(nnx.Module):
  def __init__(self, config, rngs):
    self.image_encoder = base.image_encoder(config, rngs)
    tok = base.tokenizer(config)
    self.decoder = ReportDecoder(tok.vocab_size, config.data.max_text_len, self.image_encoder.embed_dim,
                                 dim=config.method.decoder_dim, depth=config.method.decoder_layers,
                                 rngs=rngs, dtype=config.model.dtype)
    self.bos_id, self.eos_id, self.pad_id = tok.cls_id, tok.sep_id, tok.pad_id

  def generate(self, images, max_len: int):
    """Greedy reports for images [B, H, W, C] -> int32 [B, max_len] token ids."""
    tokens = self.image_encoder(images)["tokens"]
    return self.decoder.generate(tokens, max_len, self.bos_id, self.eos_id, self.pad_id)


@base.register("caption")
class Caption(base.Method):
  uses_text = True

  def build(self, config, rngs):
    return Captioner(config, rngs)

  def loss(self, model, batch, key, train):
    ids, mask = batch["text_ids"], batch["text_mask"]
    image_tokens = model.image_encoder(batch["image"])["tokens"]
    logits = base.f32(model.decoder(ids[:, :-1], image_tokens))
    target_mask = mask[:, 1:].astype(jnp.float32)
    loss = masked_token_loss(logits, ids[:, 1:], target_mask)
    correct = (logits.argmax(-1) == ids[:, 1:]) * target_mask
    return loss, {"caption_loss": loss, "perplexity": jnp.exp(loss),
                  "token_accuracy": correct.sum() / jnp.maximum(target_mask.sum(), 1.0)}
