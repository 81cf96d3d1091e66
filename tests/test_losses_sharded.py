"""Contrastive losses over a batch sharded on 8 fake CPU devices use the whole global batch.

The check runs in a subprocess because the device count is fixed when JAX starts.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "_sharded_losses.py"


@pytest.fixture(scope="module")
def result() -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_batch_is_really_sharded(result):
  assert result["n_devices"] == 8
  assert result["shard_shapes"] == [[2, 32]]
  # The global loss needs data from other devices: XLA put collectives in.
  assert result["clip_hlo_collectives"], result


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_sharded_equals_single_device(result, loss):
  single = result[f"{loss}_single"]
  assert result[f"{loss}_sharded"] == pytest.approx(single, rel=1e-5, abs=1e-6)


def test_negatives_span_global_batch(result):
  # Shard-local losses (2 examples each, local negatives only) are far from the global one.
  assert abs(result["clip_local_mean"] - result["clip_single"]) > 0.1
  assert abs(result["siglip_local_sum"] - result["siglip_single"]) > 0.1


def test_clip_gradient_matches_single_device(result):
  assert result["clip_grad_maxdiff"] < 1e-5


def test_siglip_chunked_matches_global(result):
  single = result["siglip_single"]
  for key in ("siglip_chunked", "siglip_chunked_2axes", "siglip_chunked_data_only"):
    assert result[key] == pytest.approx(single, rel=1e-5, abs=1e-6), key
  assert result["siglip_chunked_grad_maxdiff"] < 1e-4
  assert result["clip_sharded_2axes"] == pytest.approx(result["clip_single"], rel=1e-5, abs=1e-6)
