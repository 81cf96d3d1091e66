"""Masked image–text modelling (``mrm``, the MRM / M3AE family).

Image patches and report tokens are masked together. The pixel decoder
reconstructs the masked patches while cross-attending to the (masked) report. The
masked tokens are predicted from a text encoder whose input embeddings carry the
visible image's global representation (as MRM adds it to the masked report's
embeddings), followed by a block that cross-attends to the visible patches: each
modality must use the other to fill its gaps.
"""

from __future__ import annotations

import jax
from flax import nnx

from radjax.losses import masked_mean, masked_token_loss
from radjax.methods import base
from radjax.methods.ssl import MAE, mae_encode, mae_reconstruction_loss
from radjax.models.decoders import MLMHead
from radjax.models.layers import linear
from radjax.models.transformer import Block


class MaskedImageText(MAE):
  def __init__(self, config, rngs):
    self.text_encoder = base.text_encoder(config, rngs)
    text_dim = self.text_encoder.embed_dim
    super().__init__(config, rngs, text_dim=text_dim)
    dtype = config.model.dtype
    heads = config.model.text.num_heads
    self.image_to_text = linear(self.image_encoder.embed_dim, text_dim, ("embed", "mlp"), rngs=rngs,
                                dtype=dtype)
    self.fusion = Block(text_dim, heads, 4 * text_dim, pre_ln=True,
                        cross_dim=self.image_encoder.embed_dim, rngs=rngs, dtype=dtype)
    tok = base.tokenizer(config)
    self.mlm_head = MLMHead(text_dim, tok.vocab_size, tied=False, rngs=rngs, dtype=dtype)
    self.special_ids = (tok.pad_id, tok.cls_id, tok.sep_id)
    self.mask_id = tok.mask_id
    self.vocab_size = tok.vocab_size
    self.text_mask_ratio = config.method.text_mask_ratio
    self.mask_every_occurrence = config.method.text_mask_every_occurrence


def token_predictions(model: MaskedImageText, batch, key):
  """MRM's forward pass: masks the report and the image, predicts the masked tokens.

  Returns (image reconstruction loss, its metrics, token logits float32 [B, L, V], and the
  float mask [B, L] of the positions to predict). Shared by the loss and by evaluation
  (scripts/learning_checks.py), so both see exactly the same masking.
  """
  k_img, k_txt = jax.random.split(key)
  ids, predict = base.mask_tokens(k_txt, batch["text_ids"], batch["text_mask"],
                                  model.text_mask_ratio, mask_id=model.mask_id,
                                  vocab_size=model.vocab_size, special_ids=model.special_ids,
                                  every_occurrence=model.mask_every_occurrence)
  image_tokens, patch_mask, restore = mae_encode(model, batch["image"], k_img)
  image_global = model.image_to_text(image_tokens.mean(axis=1, keepdims=True))
  text = model.text_encoder(ids, batch["text_mask"], input_bias=image_global)["tokens"]
  image_loss = mae_reconstruction_loss(model, batch["image"], image_tokens, patch_mask, restore,
                                       text_tokens=text, text_mask=batch["text_mask"])
  metrics = {"reconstruction_loss": image_loss}
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
