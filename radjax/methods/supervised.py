"""Label supervision (``supervised``): multi-label BCE with the uncertainty policy for CheXpert's -1
applied by the input pipeline (``label_mask``).

On the pre-training split it is the unimodal baseline of "A Reality Check of Vision-Language
Pre-training in Radiology"; with ``method.init_from=WORKDIR`` and ``train.train_split="train"`` it
is full fine-tuning of that pre-trained encoder (configs/finetune_synth.py).

Batches that carry ``teacher_logits`` [B, K] (a report-seeing teacher's logits for these examples;
the study's ``full_distill`` cells attach them) train the student by generalized distillation,
:func:`radjax.losses.distillation_loss` with ``method.distill_lambda`` and
``method.distill_temperature``."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from flax import nnx

from radjax import defaults
from radjax.config import ConfigError
from radjax.losses import distillation_loss, multilabel_bce
from radjax.methods import base
from radjax.models.heads import ClassifierHead


def _image_model(config) -> dict:
  """config.model.image as saved: keys added since filled with their defaults (a run saved before
  them used those), tuples as the lists a saved config holds."""
  spec = defaults.model_config().image.to_dict()
  spec.update(config.model.image.to_dict())
  return json.loads(json.dumps(spec))


def load_encoder_into(encoder: nnx.Module, config, workdir: str) -> None:
  """Overwrites ``encoder``'s state with the image encoder of the run in ``workdir``."""
  from radjax.train.checkpoint import load_pretrained
  # The loop builds models inside jit (sharded init): read the checkpoint eagerly, as constants.
  with jax.ensure_compile_time_eval():
    pretrained, saved = load_pretrained(workdir)
  for key in ("image_size", "channels"):
    if saved.data[key] != config.data[key]:
      raise ConfigError(f"method.init_from={workdir}: it was trained with data.{key}={saved.data[key]}, "
                        f"this run has {config.data[key]}")
  saved_image, run_image = _image_model(saved), _image_model(config)
  if saved_image != run_image:
    raise ConfigError(f"method.init_from={workdir}: its model.image {saved_image} differs "
                      f"from this run's {run_image}")
  nnx.update(encoder, nnx.state(pretrained.image_encoder))


class Classifier(nnx.Module):
  def __init__(self, config, rngs):
    self.image_encoder = base.image_encoder(config, rngs)
    if config.method.get("init_from"):
      load_encoder_into(self.image_encoder, config, config.method.init_from)
    self.head = ClassifierHead(self.image_encoder.embed_dim, base.num_labels(config), rngs=rngs,
                               dtype=config.model.dtype)
    self.distill_lambda = float(config.method.distill_lambda)
    self.distill_temperature = float(config.method.distill_temperature)

  def __call__(self, images):
    """[B, H, W, C] -> float32 logits [B, K]."""
    return base.f32(self.head(self.image_encoder(images, pooled_only=True)["pooled"]))


@base.register("supervised")
class Supervised(base.Method):
  uses_labels = True
  pooled_only = True

  def build(self, config, rngs):
    return Classifier(config, rngs)

  def loss(self, model, batch, key, train):
    logits = model(batch["image"])
    bce = multilabel_bce(logits, batch["labels"], batch["label_mask"])
    hits = ((logits > 0) == (batch["labels"] > 0.5)) * batch["label_mask"]
    metrics = {"bce": bce, "accuracy": hits.sum() / jnp.maximum(batch["label_mask"].sum(), 1.0)}
    if "teacher_logits" not in batch:
      return bce, metrics
    loss = distillation_loss(logits, batch["teacher_logits"], batch["labels"], model.distill_lambda,
                             model.distill_temperature, multilabel=True,
                             label_mask=batch["label_mask"])
    return loss, {**metrics, "distillation": loss}


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
