"""Image-only self-supervision: MAE for ViT encoders, SimCLR for ResNets (``ssl``).

MAE: mask most patches, encode the visible ones only, reconstruct the normalised
pixels of the masked ones with a light decoder. SimCLR (for CNNs, which cannot drop
patches): two augmented views of each radiograph, symmetric InfoNCE between their
projections. The views are made on device from the batch (crop-and-resize,
contrast and brightness jitter, noise; no flip: laterality matters in a chest film).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from radjax.config import ConfigError
from radjax.losses import clip_loss, contrastive_accuracy, masked_reconstruction_loss
from radjax.methods import base
from radjax.models.decoders import MAEDecoder
from radjax.models.heads import ProjectionHead
from radjax.models.masking import patchify, random_masking
from radjax.models.vit import ViT


class MAE(nnx.Module):
  def __init__(self, config, rngs, *, text_dim: int | None = None):
    self.image_encoder = base.image_encoder(config, rngs)
    enc = self.image_encoder
    if not isinstance(enc, ViT):
      raise ConfigError(f"MAE needs a ViT image encoder, got config.model.image.name="
                        f"{config.model.image.name!r}")
    self.decoder = MAEDecoder(
        enc.embed_dim, enc.patch_size ** 2 * config.data.channels, enc.grid_size,
        dim=config.method.decoder_dim, depth=config.method.decoder_layers,
        num_prefix_tokens=enc.num_prefix_tokens, text_dim=text_dim, rngs=rngs,
        dtype=config.model.dtype)
    self.mask_ratio = config.method.mask_ratio


def mae_encode(model: MAE, images, key):
  """Masks patches and encodes the visible ones -> (tokens [B, P+N_keep, D], mask [B, N], restore [B, N])."""
  enc = model.image_encoder
  keep, mask, restore = random_masking(key, images.shape[0], enc.num_patches, model.mask_ratio)
  return enc(images, keep_ids=keep)["tokens"], mask, restore


def mae_reconstruction_loss(model: MAE, images, tokens, mask, restore, text_tokens=None, text_mask=None):
  """MAE's loss on the masked patches, decoded from the visible ``tokens`` (optionally reading the report)."""
  pred = base.f32(model.decoder(tokens, restore, text_tokens=text_tokens, text_mask=text_mask))
  target = patchify(images.astype(jnp.float32), model.image_encoder.patch_size)
  return masked_reconstruction_loss(pred, target, mask, normalize_target=True)


def mae_terms(model: MAE, images, key):
  """Returns (loss, metrics, tokens the encoder produced for the visible patches [B, P+N_keep, D])."""
  tokens, mask, restore = mae_encode(model, images, key)
  loss = mae_reconstruction_loss(model, images, tokens, mask, restore)
  return loss, {"reconstruction_loss": loss}, tokens


class SimCLR(nnx.Module):
  def __init__(self, config, rngs):
    self.image_encoder = base.image_encoder(config, rngs)
    dim = self.image_encoder.embed_dim
    self.proj = ProjectionHead(dim, config.model.embed_dim, hidden_dim=dim, rngs=rngs,
                               dtype=config.model.dtype)
    self.temperature = config.method.init_temperature


def random_view(key: jax.Array, images: jax.Array) -> jax.Array:
  """One augmented view per image: random crop (50-100% of the side) resized back, jitter, noise."""
  b, h, w, c = images.shape
  k_scale, k_x, k_y, k_con, k_bri, k_noise = jax.random.split(key, 6)
  scale = jax.random.uniform(k_scale, (b,), minval=0.5, maxval=1.0)
  off_x = jax.random.uniform(k_x, (b,)) * (1 - scale) * w
  off_y = jax.random.uniform(k_y, (b,)) * (1 - scale) * h

  def crop(img, s, ox, oy):
    return jax.image.scale_and_translate(img, (h, w, c), (0, 1), jnp.stack([1 / s, 1 / s]),
                                         jnp.stack([-oy / s, -ox / s]), "linear")

  views = jax.vmap(crop)(images.astype(jnp.float32), scale, off_x, off_y)
  contrast = jax.random.uniform(k_con, (b, 1, 1, 1), minval=0.7, maxval=1.3)
  brightness = jax.random.uniform(k_bri, (b, 1, 1, 1), minval=-0.3, maxval=0.3)
  views = views * contrast + brightness + 0.05 * jax.random.normal(k_noise, views.shape)
  return views.astype(images.dtype)


def simclr_terms(model: SimCLR, images, key):
  k1, k2 = jax.random.split(key)
  views = jnp.concatenate([random_view(k1, images), random_view(k2, images)])
  z = base.f32(model.proj(model.image_encoder(views, pooled_only=True)["pooled"]))
  z1, z2 = jnp.split(z, 2)
  loss = clip_loss(z1, z2, model.temperature)
  return loss, {"ssl_loss": loss, "view_accuracy": contrastive_accuracy(z1, z2)}


def is_vit(config) -> bool:
  return config.model.image.name == "vit"


@base.register("ssl")
class SSL(base.Method):
  def build(self, config, rngs):
    return MAE(config, rngs) if is_vit(config) else SimCLR(config, rngs)

  def loss(self, model, batch, key, train):
    if isinstance(model, MAE):
      return mae_terms(model, batch["image"], key)[:2]
    return simclr_terms(model, batch["image"], key)
