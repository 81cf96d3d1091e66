"""A toy method and data source for the train-loop tests (no radjax.models/data needed).

ToyMethod: a tiny CLIP-like model, two nnx.Linear towers + symmetric InfoNCE written
inline. It uses the step key (embedding noise), has non-Param state (a BatchStat counter
of examples seen, an nnx.Rngs dropout stream) and a kernel annotated with mesh axes, so
the tests exercise every part of the train state (and real sharding on a 2x2x2 mesh).

make_loader: the radjax.data.pipeline.make_loader signature over random numpy data,
as a grain MapDataset -> checkpointable DatasetIterator. Global batch b is the same set
of examples whatever the process count: process i gets the i-th contiguous slice.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from radjax import defaults

SPLIT_SIZES = {"pretrain": 512, "train": 512, "validation": 64, "test": 64}


def toy_config(**overrides: Any) -> ml_collections.ConfigDict:
  """defaults.pretrain_config() shrunk for the toy (16x16 images, 8 tokens, batch 16)."""
  c = defaults.pretrain_config()
  c.method.name = "toy"
  c.data.image_size = 16
  c.data.max_text_len = 8
  c.data.vocab_size = 32
  c.model.embed_dim = 64
  c.method.init_temperature = 0.2
  c.train.batch_size = 16
  c.train.steps = 12
  c.train.log_every = 1
  c.train.checkpoint_every = 4
  c.train.keep_checkpoints = 3
  c.train.progress = False
  c.optim.warmup_steps = 2
  c.optim.lr = 3e-3
  for k, v in overrides.items():
    node = c
    parts = k.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = v
  return c


class ToyImageEncoder(nnx.Module):

  def __init__(self, in_dim: int, dim: int, *, rngs: nnx.Rngs):
    # Logical names as the real models use; radjax.parallel.rules puts "mlp" on "tensor"
    # and (256 x 64 >= its size threshold) the other dim on "fsdp".
    self.proj = nnx.Linear(in_dim, dim, rngs=rngs, kernel_init=nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ("embed", "mlp")))
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.embed_dim = dim

  def __call__(self, images: jax.Array, keep_ids=None) -> dict:
    """images [B, H, W, C] -> {"tokens": [B, 1, D], "pooled": [B, D]}."""
    x = self.norm(self.proj(images.reshape(images.shape[0], -1)))
    return {"tokens": x[:, None], "pooled": x}


class ToyModel(nnx.Module):

  def __init__(self, config: Any, *, rngs: nnx.Rngs):
    size, chans, dim = config.data.image_size, config.data.channels, config.model.embed_dim
    self.image_encoder = ToyImageEncoder(size * size * chans, dim, rngs=rngs)
    self.text_encoder = nnx.Linear(config.data.vocab_size, dim, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.log(1.0 / config.method.init_temperature) * jnp.ones(()))
    self.seen = nnx.BatchStat(jnp.zeros((), jnp.float32))


def _normalize(x: jax.Array) -> jax.Array:
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)


class ToyMethod:
  name = "toy"
  uses_text = True

  def build(self, config: Any, rngs: nnx.Rngs) -> nnx.Module:
    return ToyModel(config, rngs=rngs)

  def loss(self, model: ToyModel, batch: dict, key: jax.Array, train: bool):
    img = model.image_encoder(batch["image"])["pooled"]
    vocab = model.text_encoder.in_features
    bow = jnp.sum(jax.nn.one_hot(batch["text_ids"], vocab) * batch["text_mask"][..., None], axis=1)
    txt = model.text_encoder(bow / jnp.maximum(jnp.sum(batch["text_mask"], 1, keepdims=True), 1))
    if train:
      img = img + 0.01 * jax.random.normal(key, img.shape)
      txt = model.dropout(txt, deterministic=False)
      model.seen[...] = model.seen[...] + img.shape[0]
    logits = _normalize(img) @ _normalize(txt).T * jnp.exp(model.logit_scale[...])
    labels = jnp.arange(logits.shape[0])
    lse_i = jax.nn.logsumexp(logits, axis=1)
    lse_t = jax.nn.logsumexp(logits, axis=0)
    diag = logits[labels, labels]
    loss = 0.5 * (jnp.mean(lse_i - diag) + jnp.mean(lse_t - diag))
    acc = jnp.mean(jnp.argmax(logits, axis=1) == labels)
    # index_sum lets the tests check the data order without logging any batch content.
    return loss, {"accuracy": acc, "index_sum": jnp.sum(batch["index"]).astype(jnp.float32)}


def _example_arrays(data_cfg: Any, split: str) -> dict[str, np.ndarray]:
  n = SPLIT_SIZES[split]
  rng = np.random.default_rng([int(data_cfg.synth.seed), sorted(SPLIT_SIZES).index(split)])
  size, chans, length = data_cfg.image_size, data_cfg.channels, data_cfg.max_text_len
  images = rng.normal(size=(n, size, size, chans)).astype(np.float32)
  ids = rng.integers(4, data_cfg.vocab_size, size=(n, length)).astype(np.int32)
  lengths = rng.integers(2, length + 1, size=n)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  labels = (rng.random((n, 3)) < 0.3).astype(np.float32)
  return dict(image=images, text_ids=ids * mask, text_mask=mask, labels=labels,
              label_mask=np.ones_like(labels), index=np.arange(n, dtype=np.int32))


def make_loader(data_cfg: Any, split: str, *, batch_size: int, seed: int, train: bool,
                tokenizer: Any = None, shard_index: int = 0, shard_count: int = 1,
                num_epochs: int | None = None, indices: Any = None):
  """Iterator of per-process batches (dict of numpy, leading dim ``batch_size``)."""
  del tokenizer
  arrays = _example_arrays(data_cfg, split)
  n = len(arrays["index"]) if indices is None else len(indices)
  base = np.arange(len(arrays["index"])) if indices is None else np.asarray(indices)
  global_batch = batch_size * shard_count
  per_epoch = n // global_batch
  if per_epoch == 0:
    raise ValueError(f"toy split {split!r} has {n} examples < global batch {global_batch}")

  def get(b: int) -> dict[str, np.ndarray]:
    epoch, pos = divmod(int(b), per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n) if train else np.arange(n)
    rows = order[pos * global_batch:(pos + 1) * global_batch]
    rows = base[rows[shard_index * batch_size:(shard_index + 1) * batch_size]]
    return {k: v[rows] for k, v in arrays.items()}

  length = per_epoch * (num_epochs if num_epochs is not None else (1 << 30))
  return iter(grain.MapDataset.range(length).map(get).to_iter_dataset())
