"""Sharded init and FSDP / tensor-parallel forward+backward on 8 fake CPU devices (subprocess).

ViT-B and BERT-base are full width but 2 layers deep (8 fake devices on 2 cores), image 64,
text length 32; see tests/_sharding_script.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec as P
import numpy as np

from radjax.parallel.rules import DEFAULT_RULES, logical_to_mesh

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def result():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, os.path.join(HERE, "_sharding_script.py")], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("name", ["vit", "bert", "vit_tp"])
def test_mesh_matches_single_device(result, name):
  r = result[name]
  assert r["init_max_abs_diff"] < 1e-6
  assert abs(r["loss_single"] - r["loss_mesh"]) < 1e-5 * max(1.0, abs(r["loss_single"]))
  assert r["grad_max_abs_diff"] < 1e-4 * r["grad_max_abs"], r


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_large_params_sharded_over_fsdp(result, name):
  r = result[name]
  assert r["unsharded_large"] == []
  # Per-device parameter bytes ~ total / 4 (fsdp=4); only small params are replicated.
  assert 0.25 <= r["bytes_ratio"] < 0.26, r["bytes_ratio"]
  # The jitted init's outputs are the per-device shards, and it needs no whole copy of the model.
  if "init_out_bytes_per_device" in r:
    assert r["init_out_bytes_per_device"] < 0.26 * r["total_bytes"]
    assert r["init_temp_bytes_per_device"] < r["total_bytes"]


def test_tensor_parallel_specs(result):
  specs = result["vit_tp"]["specs"]
  assert specs["encoder/layers/0/mlp/fc1/kernel"] == "P('fsdp', 'tensor')"
  assert specs["encoder/layers/0/attn/out/kernel"] == "P('tensor', 'fsdp')"
  assert specs["encoder/layers/0/ln1/scale"] == "P()"
  bert = result["bert"]["specs"]
  assert bert["embeddings/word/embedding"] == "P(None, 'fsdp')"  # 30522 rows: fsdp takes 768


def test_logical_to_mesh_rules():
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"),
              axis_types=(AxisType.Auto,) * 3)
  # Size-1 mesh axes are dropped, so everything is replicated on one device.
  assert logical_to_mesh(("embed", "mlp"), mesh, shape=(768, 3072)) == P(None, None)
  assert logical_to_mesh(("unknown",), mesh) == P(None)
  abstract = jax.sharding.AbstractMesh((2, 4, 2), ("data", "fsdp", "tensor"))
  assert logical_to_mesh(("embed", "mlp"), abstract, shape=(768, 3072)) == P("fsdp", "tensor")
  assert logical_to_mesh(("embed", "mlp"), abstract) == P(None, "tensor")
  assert logical_to_mesh(("vocab", "embed"), abstract, shape=(30522, 768)) == P("tensor", "fsdp")
  # 30522 rows do not split 4 ways over "tensor": replicated there, and fsdp takes the largest dim.
  tp4 = jax.sharding.AbstractMesh((1, 2, 4), ("data", "fsdp", "tensor"))
  assert logical_to_mesh(("vocab", "embed"), tp4, shape=(30522, 768)) == P("fsdp", None)
  assert logical_to_mesh(("mystery", "embed"), abstract, shape=(4096, 768)) == P("fsdp", None)
  assert logical_to_mesh(("embed",), abstract, shape=(768,)) == P()          # bias: replicated
  assert logical_to_mesh(("embed", "mlp"), abstract, shape=(8, 16)) == P()  # small: replicated
  assert dict(DEFAULT_RULES)["heads"] == "tensor"
