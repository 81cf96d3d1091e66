"""Image-text contrastive losses: CLIP/ConVIRT InfoNCE, SigLIP, UniCL, retrieval accuracy.

Batch semantics under data parallelism: these functions are written for the
*global* batch. Called inside `jax.jit` on arrays sharded over a mesh batch axis
(NamedSharding), XLA inserts the collectives, so every example of the global
batch is a negative for every other one and the value equals the one-device
value. `siglip_loss_sharded` is the chunked variant (shard_map + ring ppermute)
that never materialises the [B, B] logits, for very large batches.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from radjax.losses import _common as C

# The similarity matmul is tiny next to the encoders; run it at full precision so
# TPU/GPU defaults (bf16 passes / TF32) do not blur small logit differences.
_PRECISION = jax.lax.Precision.HIGHEST


def _embeddings(fn: str, image_emb, text_emb):
  C.check_rank(fn, "image_emb", image_emb, 2, "[B, D]")
  C.check_rank(fn, "text_emb", text_emb, 2, "[B, D]")
  C.check_same_shape(fn, ("image_emb", "text_emb"), (image_emb, text_emb))
  dtype = C.compute_dtype(image_emb, text_emb)
  img = C.l2_normalize(jnp.asarray(image_emb, dtype))
  txt = C.l2_normalize(jnp.asarray(text_emb, dtype))
  return img, txt, dtype


def _similarity(img: jax.Array, txt: jax.Array) -> jax.Array:
  return jnp.matmul(img, txt.T, precision=_PRECISION)


def clip_loss(image_emb: jax.Array, text_emb: jax.Array,
              temperature: float | jax.Array) -> jax.Array:
  """Symmetric InfoNCE (CLIP / ConVIRT).

  Args:
    image_emb: [B, D] image embeddings (any float dtype; need not be normalised).
    text_emb: [B, D] text embeddings; row i is the report paired with image i.
    temperature: scalar > 0; logits = cos-sim / temperature.

  Returns:
    Scalar: 0.5 * (mean_i CE(row i, i) + mean_j CE(column j, j)), float32 (or
    float64 for float64 inputs).
  """
  fn = "clip_loss"
  img, txt, dtype = _embeddings(fn, image_emb, text_emb)
  t = C.scalar(fn, "temperature", temperature, dtype)
  logits = _similarity(img, txt) / t
  diag = jnp.diagonal(logits)
  i2t = jax.nn.logsumexp(logits, axis=1) - diag
  t2i = jax.nn.logsumexp(logits, axis=0) - diag
  return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))


def siglip_loss(image_emb: jax.Array, text_emb: jax.Array,
                temperature: float | jax.Array, bias: float | jax.Array) -> jax.Array:
  """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023).

  Args:
    image_emb: [B, D]; text_emb: [B, D], row-aligned pairs.
    temperature: scalar > 0 (logits divide by it; SigLIP's learnable scale is 1/temperature).
    bias: scalar added to every logit (SigLIP initialises it at -10).

  Returns:
    Scalar: -sum_ij log_sigmoid(z_ij * logit_ij) / B with z = +1 on the diagonal, -1 elsewhere.
  """
  fn = "siglip_loss"
  img, txt, dtype = _embeddings(fn, image_emb, text_emb)
  t = C.scalar(fn, "temperature", temperature, dtype)
  b = C.scalar(fn, "bias", bias, dtype)
  logits = _similarity(img, txt) / t + b
  n = logits.shape[0]
  signs = 2.0 * jnp.eye(n, dtype=dtype) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / n


def unicl_loss(image_emb: jax.Array, text_emb: jax.Array,
               temperature: float | jax.Array, positives: jax.Array) -> jax.Array:
  """Multi-positive symmetric InfoNCE (UniCL: labels and reports in one space).

  Args:
    image_emb: [B, D]; text_emb: [B, D] (report or class-name/label prompt embeddings).
    temperature: scalar > 0.
    positives: [B, B], positives[i, j] != 0 when text j is a positive for image i
      (e.g. same label). With positives = eye this is exactly `clip_loss`.

  Returns:
    Scalar: mean over the two directions of the cross-entropy against the
    row- (column-) normalised positive matrix; rows/columns without any positive
    are left out of the mean.
  """
  fn = "unicl_loss"
  img, txt, dtype = _embeddings(fn, image_emb, text_emb)
  n = img.shape[0]
  C.check_leading(fn, "positives", positives, (n, n), "image_emb")
  t = C.scalar(fn, "temperature", temperature, dtype)
  pos = (jnp.asarray(positives) != 0).astype(dtype)
  logits = _similarity(img, txt) / t

  def direction(lg: jax.Array, p: jax.Array) -> jax.Array:
    count = jnp.sum(p, axis=1)
    log_p = jax.nn.log_softmax(lg, axis=1)
    # where, not product: -inf * 0 cannot appear, but keep unselected entries out.
    per_row = -C.safe_div(jnp.sum(jnp.where(p > 0, p * log_p, 0), axis=1), count)
    return C.masked_mean(per_row, count > 0)

  return 0.5 * (direction(logits, pos) + direction(logits.T, pos.T))


def contrastive_accuracy(image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
  """Image->text top-1 retrieval accuracy within the batch (swap the arguments for text->image).

  Args:
    image_emb: [B, D]; text_emb: [B, D], row-aligned pairs.

  Returns:
    float32 scalar: fraction of images whose most similar text (cosine) is their own.
  """
  img, txt, _ = _embeddings("contrastive_accuracy", image_emb, text_emb)
  pred = jnp.argmax(_similarity(img, txt), axis=1)
  return jnp.mean((pred == jnp.arange(img.shape[0])).astype(jnp.float32))


def siglip_loss_sharded(image_emb: jax.Array, text_emb: jax.Array,
                        temperature: float | jax.Array, bias: float | jax.Array, *,
                        mesh: Mesh, axis_name: str | Sequence[str] = "data") -> jax.Array:
  """Chunked SigLIP over a batch sharded on `axis_name`; same value as `siglip_loss`.

  Each device keeps its image shard and passes its text shard around a ring
  (`ppermute`), so it only ever holds [B/n, B/n] logits and n-1 text shards move
  one hop each, instead of all-gathering the batch and building [B, B] logits.

  Args:
    image_emb, text_emb: [B, D] global arrays, B divisible by the size of `axis_name`.
    temperature, bias: scalars as in `siglip_loss`.
    mesh: the device mesh.
    axis_name: mesh axis (or tuple of axes, e.g. ("data", "fsdp")) the batch is sharded over.
  """
  fn = "siglip_loss_sharded"
  C.check_rank(fn, "image_emb", image_emb, 2, "[B, D]")
  C.check_rank(fn, "text_emb", text_emb, 2, "[B, D]")
  C.check_same_shape(fn, ("image_emb", "text_emb"), (image_emb, text_emb))
  axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  for a in axes:
    if a not in mesh.shape:
      raise ValueError(f"{fn}: `axis_name` {a!r} is not a mesh axis {tuple(mesh.axis_names)}")
  n_shards = int(np.prod([mesh.shape[a] for a in axes]))
  batch = image_emb.shape[0]
  if batch % n_shards:
    raise ValueError(f"{fn}: batch {batch} (image_emb shape {C.shape_of(image_emb)}) "
                     f"is not divisible by the {n_shards} shards of {axes}")
  dtype = C.compute_dtype(image_emb, text_emb)
  t = C.scalar(fn, "temperature", temperature, dtype)
  b = C.scalar(fn, "bias", bias, dtype)
  ring = [(i, (i + 1) % n_shards) for i in range(n_shards)]

  def local(img, txt, t, b):
    img = C.l2_normalize(img.astype(dtype))
    txt = C.l2_normalize(txt.astype(dtype))
    n_local = img.shape[0]

    def block(txt_blk, signs):
      logits = _similarity(img, txt_blk) / t + b
      return -jnp.sum(jax.nn.log_sigmoid(signs * logits))

    own = block(txt, 2.0 * jnp.eye(n_local, dtype=dtype) - 1.0)  # holds the positives

    def step(_, carry):
      txt_blk, acc = carry
      txt_blk = jax.lax.ppermute(txt_blk, axes, ring)
      return txt_blk, acc + block(txt_blk, -1.0)  # other shards' texts: negatives only

    _, total = jax.lax.fori_loop(1, n_shards, step, (txt, own))
    return jax.lax.psum(total, axes) / batch

  spec = P(axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, P(), P()),
                       out_specs=P())(image_emb, text_emb, t, b)
