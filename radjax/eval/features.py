"""Frozen features: image features from a (pre-)trained encoder and report features for the teacher.

Image features are ``[pooled ; mean of patch tokens ; mean of each 2 x 2 quadrant]``:
the pooled token is what alignment trains, the token mean is what MAE-style
objectives make informative, and the quadrants (a two-level spatial pyramid) keep
the layout a global mean discards: laterality, heart and body width. On SynthCXR
they raise the untrained encoder's diagnostic probe from 0.73 to 0.80 AUROC and the
MAE encoder's mortality probe from 0.63 to 0.66 (BUILD_NOTES.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def encode_images(encoder: nnx.Module, loader, *, num_prefix_tokens: int | None = None) -> dict[str, np.ndarray]:
  """Runs ``encoder`` in inference mode (BatchNorm on its running averages, as the deployed
  encoder runs) over every batch of ``loader`` (one pass, no augmentation).

  Returns feats float32 [N, 6D], labels [N, K], label_mask [N, K] and index [N], sorted by index.
  """
  graphdef, state = nnx.split(encoder)
  prefix = getattr(encoder, "num_prefix_tokens", 0) if num_prefix_tokens is None else num_prefix_tokens

  @jax.jit
  def features(state, images):
    model = nnx.merge(graphdef, state)
    model.eval()
    out = model(images)
    pyramid = spatial_pyramid(out["tokens"][:, prefix:], images.shape[1] / images.shape[2])
    return jnp.concatenate([out["pooled"], pyramid], axis=-1).astype(jnp.float32)

  feats, labels, masks, index = [], [], [], []
  for batch in loader:
    feats.append(np.asarray(features(state, jnp.asarray(batch["image"]))))
    labels.append(np.asarray(batch["labels"]))
    masks.append(np.asarray(batch["label_mask"]))
    index.append(np.asarray(batch["index"]))
  index = np.concatenate(index)
  order = np.argsort(index, kind="stable")
  return {"feats": np.concatenate(feats)[order], "labels": np.concatenate(labels)[order],
          "label_mask": np.concatenate(masks)[order], "index": index[order]}


def spatial_pyramid(tokens: jax.Array, aspect: float = 1.0) -> jax.Array:
  """[mean of all tokens ; mean of each quadrant (top-left, top-right, bottom-left, bottom-right)].

  tokens: [B, N, D], a row-major h x w grid with h / w = ``aspect``. Returns [B, 5D]. An odd side
  splits unevenly (7 -> 3 + 4); a side of 1 gives both halves the whole side.
  """
  b, n, d = tokens.shape
  h = max(1, round((n * aspect) ** 0.5))
  w = n // h
  if h * w != n:
    raise ValueError(f"spatial_pyramid: {n} tokens are not a grid of aspect {aspect:g}")
  grid = tokens.reshape(b, h, w, d)
  halves = lambda size: ((0, max(size // 2, 1)), (size // 2, size))
  quadrants = [grid[:, r0:r1, c0:c1].mean(axis=(1, 2)) for r0, r1 in halves(h) for c0, c1 in halves(w)]
  return jnp.concatenate([tokens.mean(axis=1)] + quadrants, axis=-1)


def report_features(train_reports: list[str], other_reports: dict[str, list[str]], max_features: int = 2000
                    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """TF-IDF (uni- and bi-grams) fitted on the training reports, dense float32.

  The report representation of the distillation teacher when the pre-training has no text
  encoder, and of ``radjax advise``'s text-only probe. Only the numeric matrix leaves this
  function: the vocabulary (report words) is dropped with the vectoriser.
  """
  from sklearn.feature_extraction.text import TfidfVectorizer
  # Terms of one report only are dropped, except in a handful of reports (a smoke run), where
  # that could leave no term at all.
  min_df = 2 if len(train_reports) >= 20 else 1
  vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=min_df, max_features=max_features,
                               sublinear_tf=True)
  train = vectorizer.fit_transform(train_reports).astype(np.float32).toarray()
  others = {k: vectorizer.transform(v).astype(np.float32).toarray() for k, v in other_reports.items()}
  return train, others


def split_reports(source) -> list[str]:
  """Every report of a random-access source, in index order (kept in memory only)."""
  if hasattr(source, "report"):
    return [source.report(i) for i in range(len(source))]
  return [source[i]["report"] for i in range(len(source))]
