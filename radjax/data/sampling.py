"""Label-fraction subsets for fine-tuning at small training-set sizes.

``label_fraction_indices(labels, n, seed)`` ranks all examples once for a seed (first a
greedy cover that gives every label a positive and a negative, rarest label first, then
a seeded random order) and returns the first ``n``: subsets are nested (the n=100
subset of a seed contains its n=50 subset) and every label has positives whenever ``n``
allows it.
"""

from __future__ import annotations

import numpy as np


def label_fraction_order(labels: np.ndarray, seed: int) -> np.ndarray:
  """All indices [N], in the order subsets take them. labels: [N, K] (1 pos, 0 neg, NaN/-1 unknown)."""
  y = np.asarray(labels, dtype=np.float64)
  if y.ndim == 1:
    y = y[:, None]
  if y.ndim != 2:
    raise ValueError(f"labels must be [N, K], got shape {y.shape}")
  n = y.shape[0]
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 0x5A3])))
  perm = rng.permutation(n)
  pos = np.nan_to_num(y) == 1  # NaN and -1 (uncertain) are not positives
  neg = np.nan_to_num(y, nan=-1.0) == 0
  rank = np.empty(n, np.int64)
  rank[perm] = np.arange(n)
  chosen: list[int] = []
  taken = np.zeros(n, bool)
  have_pos = np.zeros(y.shape[1], bool)
  have_neg = np.zeros(y.shape[1], bool)
  # Rarest labels first, so the cover stays small; ties by column index.
  order = sorted(range(y.shape[1]), key=lambda k: (pos[:, k].sum(), k))
  for want, have in ((pos, have_pos), (neg, have_neg)):
    for k in order:
      if have[k]:
        continue
      cand = np.flatnonzero(want[:, k] & ~taken)
      if cand.size == 0:
        continue
      i = int(cand[np.argmin(rank[cand])])  # the seed decides which positive
      chosen.append(i)
      taken[i] = True
      have_pos |= pos[i]
      have_neg |= neg[i]
  rest = perm[~taken[perm]]
  return np.concatenate([np.asarray(chosen, np.int64), rest.astype(np.int64)])


def label_fraction_indices(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
  """Sorted indices of an ``n``-example subset (all when n is None or >= N). labels: [N, K]."""
  y = np.asarray(labels)
  total = y.shape[0]
  if n is None or n >= total:
    return np.arange(total, dtype=np.int64)
  if n < 1:
    raise ValueError(f"n must be >= 1 or None, got {n}")
  return np.sort(label_fraction_order(y, seed)[:n])
