"""Patch utilities and random patch masking for MAE / MRM.

Patch order is row-major over the (H/p, W/p) grid and pixels inside a patch are
ordered (row, col, channel), the same as the ViT patch embedding and the MAE target.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, N, p*p*C] with N = (H/p) * (W/p)."""
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, grid: tuple[int, int] | None = None,
               channels: int | None = None) -> jax.Array:
  """[B, N, p*p*C] -> [B, H, W, C]; ``grid`` = (H/p, W/p), square when None."""
  b, n, d = patches.shape
  p = patch_size
  c = channels if channels is not None else d // (p * p)
  if p * p * c != d:
    raise ValueError(f"patch dim {d} != patch_size^2 * channels = {p}^2 * {c}")
  if grid is None:
    side = int(round(n ** 0.5))
    if side * side != n:
      raise ValueError(f"{n} patches do not form a square grid; pass grid=(h, w)")
    grid = (side, side)
  gh, gw = grid
  x = patches.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, c)


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """Number of visible patches, as MAE: int(N * (1 - ratio)), at least 1."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
  return max(1, int(num_patches * (1.0 - mask_ratio)))


def random_masking(key: jax.Array, batch_size: int, num_patches: int, mask_ratio: float
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-example uniform random patch masking (MAE).

  Returns:
    keep_ids    int32 [B, N_keep]: indices of the visible patches (in shuffled order).
    mask        float32 [B, N]: 1 = masked (to reconstruct), 0 = visible; in patch order.
    restore_ids int32 [B, N]: argsort of the shuffle; ``take_along_axis(concat([visible, masked]),
                restore_ids)`` puts decoder tokens back into patch order.
  """
  n_keep = num_kept(num_patches, mask_ratio)
  noise = jax.random.uniform(key, (batch_size, num_patches))
  shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  restore = jnp.argsort(shuffle, axis=1).astype(jnp.int32)
  keep = shuffle[:, :n_keep]
  mask = (restore >= n_keep).astype(jnp.float32)
  return keep, mask, restore


def gather_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
  """x [B, N, D], ids int [B, K] -> [B, K, D]."""
  return jnp.take_along_axis(x, ids[:, :, None].astype(jnp.int32), axis=1)
