"""Run by tests/test_losses_sharded.py in a subprocess with 8 fake CPU devices.

Prints one JSON line with the losses computed (a) with the batch sharded over a
mesh axis under jit, (b) on one device, (c) shard by shard (local negatives only).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from radjax.losses import clip_loss, siglip_loss, siglip_loss_sharded

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def main() -> None:
  devices = jax.devices()
  assert len(devices) == 8, devices
  mesh = Mesh(np.array(devices), ("data",))
  batch_sh = NamedSharding(mesh, P("data"))
  rep = NamedSharding(mesh, P())
  rng = np.random.RandomState(0)
  img = rng.randn(16, 32).astype(np.float32)
  txt = (img + 1.5 * rng.randn(16, 32)).astype(np.float32)
  temp = np.float32(0.1)
  bias = np.float32(-2.0)
  out: dict = {"n_devices": len(devices)}

  def put(x, sh):
    return jax.device_put(x, sh)

  img_s, txt_s = put(img, batch_sh), put(txt, batch_sh)
  out["shard_shapes"] = sorted({tuple(s.data.shape) for s in img_s.addressable_shards})
  one = devices[0]
  img_1, txt_1 = jax.device_put(img, one), jax.device_put(txt, one)

  # clip: loss and gradient, sharded vs one device vs local shards.
  clip_sharded = jax.jit(clip_loss, in_shardings=(batch_sh, batch_sh, rep))
  out["clip_sharded"] = float(clip_sharded(img_s, txt_s, temp))
  out["clip_hlo_collectives"] = [c for c in COLLECTIVES
                                 if c in clip_sharded.lower(img_s, txt_s, temp).compile().as_text()]
  out["clip_single"] = float(jax.jit(clip_loss)(img_1, txt_1, temp))
  out["clip_local_mean"] = float(np.mean([clip_loss(img[k:k + 2], txt[k:k + 2], temp)
                                          for k in range(0, 16, 2)]))
  grad_sh = jax.jit(jax.grad(clip_loss, argnums=(0, 1)),
                    in_shardings=(batch_sh, batch_sh, rep))(img_s, txt_s, temp)
  grad_1 = jax.jit(jax.grad(clip_loss, argnums=(0, 1)))(img_1, txt_1, temp)
  out["clip_grad_maxdiff"] = float(max(np.abs(np.asarray(a) - np.asarray(b)).max()
                                       for a, b in zip(grad_sh, grad_1)))

  # siglip: global formulation under jit, chunked shard_map variant, single, local.
  sig_sharded = jax.jit(siglip_loss, in_shardings=(batch_sh, batch_sh, rep, rep))
  out["siglip_sharded"] = float(sig_sharded(img_s, txt_s, temp, bias))
  out["siglip_single"] = float(jax.jit(siglip_loss)(img_1, txt_1, temp, bias))
  # Per-shard SigLIP normalised like the global one (sum / global B), summed over shards.
  out["siglip_local_sum"] = float(np.sum([siglip_loss(img[k:k + 2], txt[k:k + 2], temp, bias) * 2
                                          for k in range(0, 16, 2)]) / 16)

  def chunked(i, t, tp, b):
    return siglip_loss_sharded(i, t, tp, b, mesh=mesh, axis_name="data")

  out["siglip_chunked"] = float(jax.jit(chunked)(img_s, txt_s, temp, bias))
  g_chunk = jax.jit(jax.grad(chunked, argnums=(0, 1, 2, 3)))(img_s, txt_s, temp, bias)
  g_one = jax.jit(jax.grad(siglip_loss, argnums=(0, 1, 2, 3)))(img_1, txt_1, temp, bias)
  out["siglip_chunked_grad_maxdiff"] = float(max(np.abs(np.asarray(a) - np.asarray(b)).max()
                                                 for a, b in zip(g_chunk, g_one)))

  # Two-axis mesh: batch over ("data", "fsdp"), as radjax.parallel.batch_sharding does;
  # and batch over "data" only with a replicated "tensor" axis.
  mesh2 = Mesh(np.array(devices).reshape(4, 2), ("data", "fsdp"))
  sh2 = NamedSharding(mesh2, P(("data", "fsdp")))
  i2, t2 = put(img, sh2), put(txt, sh2)
  out["clip_sharded_2axes"] = float(jax.jit(clip_loss)(i2, t2, temp))
  out["siglip_chunked_2axes"] = float(jax.jit(
      lambda i, t: siglip_loss_sharded(i, t, temp, bias, mesh=mesh2,
                                       axis_name=("data", "fsdp")))(i2, t2))
  mesh3 = Mesh(np.array(devices).reshape(4, 2), ("data", "tensor"))
  sh3 = NamedSharding(mesh3, P("data"))
  out["siglip_chunked_data_only"] = float(jax.jit(
      lambda i, t: siglip_loss_sharded(i, t, temp, bias, mesh=mesh3, axis_name="data"))(
          put(img, sh3), put(txt, sh3)))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
