"""Image–report alignment: CLIP/ConVIRT symmetric InfoNCE (``clip``) and its sigmoid variant (``siglip``)."""

from __future__ import annotations

from flax import nnx

from radjax.losses import clip_loss, contrastive_accuracy, siglip_loss
from radjax.methods import base
from radjax.models.heads import ProjectionHead, Temperature


class DualEncoder(nnx.Module):
  """V and T with projections into a shared space and a learnable temperature (and bias)."""

  def __init__(self, config, rngs: nnx.Rngs, *, bias: float | None = None):
    self.image_encoder = base.image_encoder(config, rngs)
    self.text_encoder = base.text_encoder(config, rngs)
    dim, dtype = config.model.embed_dim, config.model.dtype
    self.image_proj = ProjectionHead(self.image_encoder.embed_dim, dim, rngs=rngs, dtype=dtype)
    self.text_proj = ProjectionHead(self.text_encoder.embed_dim, dim, rngs=rngs, dtype=dtype)
    self.scale = Temperature(config.method.init_temperature, init_bias=bias)

  def embed_images(self, images):
    """[B, H, W, C] -> float32 [B, E] (not normalised; the losses normalise)."""
    return base.f32(self.image_proj(self.image_encoder(images, pooled_only=True)["pooled"]))

  def embed_texts(self, ids, mask):
    """int [B, L] x2 -> float32 [B, E]."""
    return base.f32(self.text_proj(self.text_encoder(ids, mask, pooled_only=True)["pooled"]))


def alignment_terms(model: DualEncoder, batch, sigmoid: bool):
  img = model.embed_images(batch["image"])
  txt = model.embed_texts(batch["text_ids"], batch["text_mask"])
  temperature = 1.0 / model.scale()
  if sigmoid:
    loss = siglip_loss(img, txt, temperature, model.scale.bias[...])
  else:
    loss = clip_loss(img, txt, temperature)
  metrics = {"align_loss": loss, "i2t_accuracy": contrastive_accuracy(img, txt),
             "t2i_accuracy": contrastive_accuracy(txt, img), "temperature": temperature}
  return loss, metrics


@base.register("clip")
class CLIP(base.Method):
  uses_text = True
  pooled_only = dual_encoder = True

  def build(self, config, rngs):
    return DualEncoder(config, rngs)

  def loss(self, model, batch, key, train):
    return alignment_terms(model, batch, sigmoid=False)


@base.register("siglip")
class SigLIP(base.Method):
  uses_text = True
  pooled_only = dual_encoder = True

  def build(self, config, rngs):
    return DualEncoder(config, rngs, bias=config.method.siglip_bias)

  def loss(self, model, batch, key, train):
    return alignment_terms(model, batch, sigmoid=True)
