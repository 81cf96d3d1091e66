"""Label pre-training (``supervised``): multi-label BCE on the pre-training split's labels, the
unimodal baseline of "A Reality Check of Vision-Language Pre-training in Radiology". The
uncertainty policy for CheXpert's -1 is applied by the input pipeline (``label_mask``)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from radjax.losses import multilabel_bce
from radjax.methods import base
from radjax.models.heads import ClassifierHead


class Classifier(nnx.Module):
  def __init__(self, config, rngs):
    self.image_encoder = base.image_encoder(config, rngs)
    self.head = ClassifierHead(self.image_encoder.embed_dim, base.num_labels(config), rngs=rngs,
                               dtype=config.model.dtype)

  def __call__(self, images):
    """[B, H, W, C] -> float32 logits [B, K]."""
    return base.f32(self.head(self.image_encoder(images)["pooled"]))


@base.register("supervised")
class Supervised(base.Method):
  uses_labels = True

  def build(self, config, rngs):
    return Classifier(config, rngs)

  def loss(self, model, batch, key, train):
    logits = model(batch["image"])
    loss = multilabel_bce(logits, batch["labels"], batch["label_mask"])
    hits = ((logits > 0) == (batch["labels"] > 0.5)) * batch["label_mask"]
    return loss, {"bce": loss, "accuracy": hits.sum() / jnp.maximum(batch["label_mask"].sum(), 1.0)}


class ImageOnly(nnx.Module):
  def __init__(self, config, rngs):
    self.image_encoder = base.image_encoder(config, rngs)


@base.register("none")
class NoPretraining(base.Method):
  """The control: the image encoder at its random initialisation. Nothing trains."""

  def build(self, config, rngs):
    return ImageOnly(config, rngs)

  def loss(self, model, batch, key, train):
    raise ValueError("method 'none' has no objective: its encoder is the random initialisation "
                     "(the study builds it directly; there is nothing to train)")
