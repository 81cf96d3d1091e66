"""Pure, jit-able loss functions: arrays in, scalar out.

Every loss upcasts to float32 internally (so bfloat16 inputs give a float32
scalar), is numerically stable (log-sum-exp / log_sigmoid, safe L2 norm), returns
0 rather than NaN for an all-zero mask, and raises ValueError naming the argument
and its shape for a wrong rank or mismatched shapes (at trace time).

Modules:
  contrastive     clip_loss, siglip_loss, siglip_loss_sharded, unicl_loss, contrastive_accuracy
  reconstruction  masked_reconstruction_loss, masked_token_loss, normalize_patches
  classification  multilabel_bce, cross_entropy, soft_cross_entropy, bce_with_logits,
                  apply_uncertain_policy (CheXpert uncertain labels; policy documented there)
  distillation    distillation_loss (generalized distillation with a report-seeing teacher)
"""

from __future__ import annotations

from radjax.losses._common import l2_normalize, masked_mean
from radjax.losses.classification import (UNCERTAIN_POLICIES, apply_uncertain_policy,
                                          bce_with_logits, cross_entropy, multilabel_bce,
                                          soft_cross_entropy)
from radjax.losses.contrastive import (clip_loss, contrastive_accuracy, siglip_loss,
                                       siglip_loss_sharded, unicl_loss)
from radjax.losses.distillation import distillation_loss
from radjax.losses.reconstruction import (masked_reconstruction_loss, masked_token_loss,
                                          normalize_patches)

__all__ = [
    "UNCERTAIN_POLICIES",
    "apply_uncertain_policy",
    "bce_with_logits",
    "clip_loss",
    "contrastive_accuracy",
    "cross_entropy",
    "distillation_loss",
    "l2_normalize",
    "masked_mean",
    "masked_reconstruction_loss",
    "masked_token_loss",
    "multilabel_bce",
    "normalize_patches",
    "siglip_loss",
    "siglip_loss_sharded",
    "soft_cross_entropy",
    "unicl_loss",
]
