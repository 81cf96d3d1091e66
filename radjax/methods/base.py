"""What every method shares: the Method protocol, the registry, and encoder construction.

A method wires models to a loss. ``build(config, rngs)`` returns one NNX module
holding everything that trains (its image encoder is ``model.image_encoder``, the
part that transfers); ``loss(model, batch, key, train)`` returns a float32 scalar
and a dict of scalar metrics. Both run inside the shared training loop's jitted
step, so they must be pure apart from reading the model.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from radjax import models
from radjax.config import ConfigError

_REGISTRY: dict[str, Callable[[], "Method"]] = {}


class Method:
  name: str = ""
  uses_text: bool = False
  uses_labels: bool = False
  # What the FLOP counter (``radjax bench``) needs to count what runs: the loss reads the encoders
  # through their pooled outputs only (``pooled_only=True``), and a dual encoder projects both.
  pooled_only: bool = False
  dual_encoder: bool = False

  def build(self, config, rngs: nnx.Rngs) -> nnx.Module:
    raise NotImplementedError

  def loss(self, model, batch: dict[str, jax.Array], key: jax.Array,
           train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    raise NotImplementedError


def register(name: str):
  def wrap(cls):
    cls.name = name
    _REGISTRY[name] = cls
    return cls
  return wrap


def get_method(name: str) -> Method:
  from radjax import methods  # noqa: F401  (imports every method module, filling the registry)
  if name not in _REGISTRY:
    raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name]()


def method_names() -> list[str]:
  from radjax import methods  # noqa: F401
  return sorted(_REGISTRY)


def tokenizer(config):
  """The data config's tokenizer (trained on the dataset's reports when none is given; memoised)."""
  from radjax.data.tokenizer import get_tokenizer
  return get_tokenizer(config.data)


def image_encoder(config, rngs: nnx.Rngs) -> nnx.Module:
  return models.build_image_encoder(config.model.image, rngs, image_size=config.data.image_size,
                                    channels=config.data.channels, dtype=config.model.dtype)


def text_vocab_size(config) -> int:
  return int(config.model.text.get("vocab_size", 0)) or tokenizer(config).vocab_size


def text_encoder(config, rngs: nnx.Rngs) -> nnx.Module:
  return models.build_text_encoder(config.model.text, rngs, vocab_size=text_vocab_size(config),
                                   max_len=config.data.max_text_len, dtype=config.model.dtype)


def num_labels(config) -> int:
  from radjax.data.pipeline import label_names
  return len(label_names(config.data))


def f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32)


def mask_tokens(key: jax.Array, ids: jax.Array, attention_mask: jax.Array, ratio: float, *,
                mask_id: int, vocab_size: int, special_ids: tuple[int, ...],
                every_occurrence: bool = False) -> tuple[jax.Array, jax.Array]:
  """BERT-style masking of report tokens, on device.

  ids, attention_mask: int [B, L]. Returns (masked ids [B, L], float mask [B, L] with 1 at the
  positions to predict). Of the selected positions 80% become [MASK], 10% a random vocabulary
  token, 10% stay. At least one real token per report is selected, so the loss is defined.

  every_occurrence: a selected token is selected wherever it occurs in its report, and all its
  occurrences get the same treatment. Reports restate their findings (FINDINGS, then IMPRESSION),
  so with per-position masking a masked finding word is usually copied from its other mention;
  masking every mention leaves the image as the only source.
  """
  k_select, k_kind, k_swap = jax.random.split(key, 3)
  maskable = attention_mask.astype(bool)
  for special in special_ids:
    maskable &= ids != special
  noise = jax.random.uniform(k_select, ids.shape)
  noise = jnp.where(maskable, noise, 2.0)
  # Guarantee one selected token per row: the lowest-noise maskable position.
  first = jnp.argmin(noise, axis=1)
  selected = (noise < ratio) | (jnp.arange(ids.shape[1])[None] == first[:, None])
  selected &= maskable
  kind = jax.random.uniform(k_kind, ids.shape)
  swapped = jax.random.randint(k_swap, ids.shape, 0, vocab_size, dtype=ids.dtype)
  if every_occurrence:
    same = ids[:, :, None] == ids[:, None, :]  # [B, L, L]
    selected = (same & selected[:, None, :]).any(-1) & maskable
    # Each position takes the draws of its token's first occurrence in the report.
    first_seen = jnp.argmax(same, axis=-1)
    kind = jnp.take_along_axis(kind, first_seen, axis=1)
    swapped = jnp.take_along_axis(swapped, first_seen, axis=1)
  new = jnp.where(kind < 0.8, mask_id, jnp.where(kind < 0.9, swapped, ids))
  return jnp.where(selected, new, ids), selected.astype(jnp.float32)
