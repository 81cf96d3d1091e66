"""Alignment plus self-supervision (``clip_ssl``): ``clip + ssl_weight * ssl`` on one image encoder.

The paper's mitigation for labels the report does not describe: the SSL term keeps
image information that alignment with the report would otherwise discard.
"""

from __future__ import annotations

import jax
from flax import nnx

from radjax.methods import base
from radjax.methods.clip import DualEncoder, alignment_terms
from radjax.methods.ssl import is_vit, mae_terms, simclr_terms
from radjax.models.decoders import MAEDecoder
from radjax.models.heads import ProjectionHead


class AlignedSSL(DualEncoder):
  def __init__(self, config, rngs):
    super().__init__(config, rngs)
    enc = self.image_encoder
    if is_vit(config):
      self.decoder = MAEDecoder(
          enc.embed_dim, enc.patch_size ** 2 * config.data.channels, enc.grid_size,
          dim=config.method.decoder_dim, depth=config.method.decoder_layers,
          num_prefix_tokens=enc.num_prefix_tokens, rngs=rngs, dtype=config.model.dtype)
      self.mask_ratio = config.method.mask_ratio
      self.proj = None
    else:
      self.decoder = None
      self.proj = ProjectionHead(enc.embed_dim, config.model.embed_dim, hidden_dim=enc.embed_dim,
                                 rngs=rngs, dtype=config.model.dtype)
      self.temperature = config.method.init_temperature
    self.ssl_weight = config.method.ssl_weight


@base.register("clip_ssl")
class CLIPSSL(base.Method):
  uses_text = True
  pooled_only = dual_encoder = True

  def build(self, config, rngs):
    return AlignedSSL(config, rngs)

  def loss(self, model, batch, key, train):
    align, metrics = alignment_terms(model, batch, sigmoid=False)
    # mae_terms / simclr_terms only read the attributes AlignedSSL shares with MAE / SimCLR.
    if model.decoder is not None:
      ssl, ssl_metrics, _ = mae_terms(model, batch["image"], key)
    else:
      ssl, ssl_metrics = simclr_terms(model, batch["image"], key)
    return align + model.ssl_weight * ssl, {**metrics, **ssl_metrics}
