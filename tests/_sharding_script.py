"""Run by tests/test_model_sharding.py in a subprocess with 8 fake CPU devices; prints JSON.

ViT-B and BERT-base at full width but 2 layers (8 fake devices on 2 cores are slow), small
image (64) and text length (32).
"""

from __future__ import annotations

import json
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from radjax.models import BertConfig, BertEncoder, ViT, ViTConfig
from radjax.parallel.rules import MIN_SHARD_SIZE, param_shardings, sharded_init


def mesh_of(data, fsdp, tensor):
  devs = np.asarray(jax.devices()).reshape(data, fsdp, tensor)
  return Mesh(devs, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def toy_loss(model, *inputs):
  out = model(*inputs)
  pooled = out["pooled"].astype(jnp.float32)
  tokens = out["tokens"].astype(jnp.float32)
  return jnp.mean(jnp.tanh(pooled) ** 2) + jnp.mean(tokens[:, 1:] * tokens[:, :-1])


def loss_and_grads(model, inputs, mesh=None):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # On the mesh, grads come back sharded like the params (what a train step does).
  out = None if mesh is None else (NamedSharding(mesh, P()), param_shardings(params, mesh))

  @partial(jax.jit, out_shardings=out)
  def f(params, rest, *inputs):
    return jax.value_and_grad(lambda p: toy_loss(nnx.merge(graphdef, p, rest), *inputs))(params)

  return f(params, rest, *inputs)


def flat(tree):
  return {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(tree)}


def check(name, build, inputs, mesh, n_fsdp):
  report = {}
  single = build()
  sharded = sharded_init(build, mesh)
  # Same values as an unsharded init (threefry is partitionable).
  sp, pp = flat(nnx.state(single, nnx.Param)), flat(nnx.state(sharded, nnx.Param))
  # (jit vs eager rounding of normal() differs in the last ulp)
  report["init_max_abs_diff"] = max(float(np.max(np.abs(np.asarray(sp[k][...]) -
                                                         np.asarray(pp[k][...])))) for k in sp)
  # Every large parameter is sharded over fsdp: per-device bytes <= total / n_fsdp.
  total = per_device = 0
  unsharded_large = []
  for k, v in pp.items():
    arr = v[...]
    shard = arr.addressable_shards[0].data
    total += arr.nbytes
    per_device += shard.nbytes
    if arr.ndim >= 2 and arr.size >= MIN_SHARD_SIZE and shard.nbytes * n_fsdp > arr.nbytes:
      unsharded_large.append(k)
  report["unsharded_large"] = unsharded_large
  report["bytes_ratio"] = per_device / total
  report["specs"] = {k: str(v[...].sharding.spec) for k, v in pp.items() if "layers/1" not in k}
  # The jitted init never holds a whole copy of the model on one device.
  abstract = nnx.eval_shape(build)
  graphdef, abstract_state = nnx.split(abstract)
  shardings = param_shardings(abstract_state, mesh)
  mem = jax.jit(lambda: nnx.split(build())[1], out_shardings=shardings).lower().compile() \
      .memory_analysis()
  if mem is not None:
    report["init_out_bytes_per_device"] = int(mem.output_size_in_bytes)
    report["init_temp_bytes_per_device"] = int(mem.temp_size_in_bytes)
  report["total_bytes"] = int(total)
  # Forward + backward on one device vs the mesh, batch split over (data, fsdp).
  loss1, g1 = loss_and_grads(single, inputs)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  loss8, g8 = loss_and_grads(sharded, [jax.device_put(x, batch) for x in inputs], mesh)
  g1, g8 = flat(g1), flat(g8)
  report["loss_single"], report["loss_mesh"] = float(loss1), float(loss8)
  report["grad_max_abs_diff"] = max(float(jnp.max(jnp.abs(g1[k][...] - np.asarray(g8[k][...]))))
                                    for k in g1)
  report["grad_max_abs"] = max(float(jnp.max(jnp.abs(g1[k][...]))) for k in g1)
  return report


def main():
  assert jax.device_count() == 8, jax.devices()
  which = sys.argv[1:] or ["vit", "bert", "vit_tp"]
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 64, 64, 1)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 30522, size=(8, 32)), jnp.int32)
  mask = jnp.asarray(np.arange(32)[None] < rng.integers(4, 33, size=(8, 1)), jnp.int32)
  vit = lambda: ViT(ViTConfig("b", image_size=64, patch_size=16, channels=1, depth=2),
                    rngs=nnx.Rngs(0))
  bert = lambda: BertEncoder(BertConfig(num_layers=2, pooler=True, pool="pooler"),
                             rngs=nnx.Rngs(1))
  out = {}
  if "vit" in which:
    out["vit"] = check("vit", vit, [images], mesh_of(2, 4, 1), 4)
  if "bert" in which:
    out["bert"] = check("bert", bert, [ids, mask], mesh_of(2, 4, 1), 4)
  if "vit_tp" in which:  # fsdp x tensor: MLP hidden / heads over "tensor"
    out["vit_tp"] = check("vit_tp", vit, [images], mesh_of(2, 2, 2), 2)
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
