"""Masked image–text modelling (``mrm``, the MRM / M3AE family).

Image patches and report tokens are masked together. The pixel decoder
reconstructs the masked patches while cross-attending to the (masked) report, and
the masked tokens are predicted from text features that cross-attend to the
visible image patches: each modality must use the other to fill its gaps.
"""

from __future__ import annotations

import jax
from flax import nnx

from radjax.losses import masked_mean, masked_token_loss
from radjax.methods import base
from radjax.methods.ssl import MAE, mae_terms
from radjax.models.decoders import MLMHead
from radjax.models.transformer import Block


class MaskedImageText(MAE):
  def __init__(self, config, rngs):
    self.text_encoder = base.text_encoder(config, rngs)
    text_dim = self.text_encoder.embed_dim
    super().__init__(config, rngs, text_dim=text_dim)
    dtype = config.model.dtype
    heads = config.model.text.num_heads
    self.fusion = Block(text_dim, heads, 4 * text_dim, pre_ln=True,
                        cross_dim=self.image_encoder.embed_dim, rngs=rngs, dtype=dtype)
    tok = base.tokenizer(config)
    self.mlm_head = MLMHead(text_dim, tok.vocab_size, tied=False, rngs=rngs, dtype=dtype)
    self.special_ids = (tok.pad_id, tok.cls_id, tok.sep_id)
    self.mask_id = tok.mask_id
    self.vocab_size = tok.vocab_size
    self.text_mask_ratio = config.method.text_mask_ratio


def token_predictions(model: MaskedImageText, batch, key):
  """MRM's forward pass: masks the report and the image, predicts the masked tokens.

  Returns (image reconstruction loss, its metrics, token logits float32 [B, L, V], and the
  float mask [B, L] of the positions to predict). Shared by the loss and by evaluation
  (scripts/learning_checks.py), so both see exactly the same masking.
  """
  k_img, k_txt = jax.random.split(key)
  ids, predict = base.mask_tokens(k_txt, batch["text_ids"], batch["text_mask"],
                                  model.text_mask_ratio, mask_id=model.mask_id,
                                  vocab_size=model.vocab_size, special_ids=model.special_ids)
  text = model.text_encoder(ids, batch["text_mask"])["tokens"]
  image_loss, metrics, image_tokens = mae_terms(model, batch["image"], k_img, text_tokens=text,
                                                text_mask=batch["text_mask"])
  # Masked tokens are predicted from the report's features attending to the visible patches.
  fused = model.fusion(text, batch["text_mask"], context=image_tokens.astype(text.dtype))
  logits = base.f32(model.mlm_head(fused))
  return image_loss, metrics, logits, predict


@base.register("mrm")
class MRM(base.Method):
  uses_text = True

  def build(self, config, rngs):
    return MaskedImageText(config, rngs)

  def loss(self, model, batch, key, train):
    image_loss, metrics, logits, predict = token_predictions(model, batch, key)
    token_loss = masked_token_loss(logits, batch["text_ids"], predict)
    correct = (logits.argmax(-1) == batch["text_ids"]) * predict
    metrics.update(token_loss=token_loss, token_accuracy=masked_mean(correct, predict))
    return image_loss + token_loss, metrics
