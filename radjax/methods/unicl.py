"""Labels and reports in one contrastive space (``unicl``, UniCL-style; from the Reality Check
paper's proposals).

Each image's text is its report, or, with probability one half when the image has a
labelled finding, a class-name prompt for one of its findings. A text is a positive
for every image that shares it: the image's own report, and every prompt of a finding
the image has. The loss is UniCL's multi-positive symmetric InfoNCE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from radjax.losses import unicl_loss
from radjax.methods import base
from radjax.methods.clip import DualEncoder


def prompt(label: str) -> str:
  return f"findings consistent with {label.replace('_', ' ').lower()}."


class UniCLModel(DualEncoder):
  def __init__(self, config, rngs):
    super().__init__(config, rngs)
    from radjax.data.pipeline import label_names
    ids, mask = base.tokenizer(config).encode_batch([prompt(n) for n in label_names(config.data)],
                                                    config.data.max_text_len)
    # Static (hashable) so the prompts live in the graph definition, not among the parameters.
    self.prompt_ids = tuple(map(tuple, np.asarray(ids).tolist()))
    self.prompt_mask = tuple(map(tuple, np.asarray(mask).tolist()))


def texts_and_positives(key: jax.Array, labels: jax.Array, text_ids: jax.Array, text_mask: jax.Array,
                        prompt_ids: jax.Array, prompt_mask: jax.Array):
  """Chooses each image's text and the positive pairs (pure; the core of the UniCL loss).

  labels: float [B, K] (0/1, already multiplied by label_mask); text_ids/text_mask: int [B, L]
  (the reports); prompt_ids/prompt_mask: int [K, L] (one class-name prompt per label).
  Returns (ids [B, L], mask [B, L], positives bool [B, B], use_prompt bool [B]): text j is a
  prompt when use_prompt[j] (never for an image without a finding), for a finding image j has;
  positives[i, j] when text j is image i's own text or a prompt for a finding image i has.
  """
  b = labels.shape[0]
  k_use, k_pick = jax.random.split(key)
  has_finding = labels.sum(1) > 0
  use_prompt = jax.random.bernoulli(k_use, 0.5, (b,)) & has_finding
  # One of the image's findings, uniformly (an image without findings never uses its pick).
  # -1e9, not -inf: a row without findings stays a valid (uniform) distribution.
  pick = jax.random.categorical(k_pick, jnp.where(labels > 0, 0.0, -1e9))  # [B]
  ids = jnp.where(use_prompt[:, None], prompt_ids[pick], text_ids)
  mask = jnp.where(use_prompt[:, None], prompt_mask[pick], text_mask)
  prompt_hit = labels[:, pick] > 0  # [B, B]: image i has the finding text j's prompt names
  positives = jnp.eye(b, dtype=bool) | (use_prompt[None, :] & prompt_hit)
  return ids, mask, positives, use_prompt


@base.register("unicl")
class UniCL(base.Method):
  uses_text = True
  pooled_only = dual_encoder = True
  uses_labels = True

  def build(self, config, rngs):
    return UniCLModel(config, rngs)

  def loss(self, model, batch, key, train):
    labels = batch["labels"] * batch["label_mask"]  # [B, K]
    ids, mask, positives, use_prompt = texts_and_positives(
        key, labels, batch["text_ids"], batch["text_mask"], jnp.asarray(model.prompt_ids, jnp.int32),
        jnp.asarray(model.prompt_mask, jnp.int32))
    img = model.embed_images(batch["image"])
    txt = model.embed_texts(ids, mask)
    loss = unicl_loss(img, txt, 1.0 / model.scale(), positives)
    return loss, {"unicl_loss": loss, "prompt_fraction": use_prompt.mean()}
