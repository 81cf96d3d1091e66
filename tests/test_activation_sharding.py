"""Activation sharding under FSDP (issue 9): the models pin activations to the batch axes with
``radjax.parallel.rules.constrain_batch``, and embedding tables are gathered over fsdp before their
lookup (``rules.gather_fsdp``), so the compiled train step of a ViT and a ResNet (supervised) and of
CLIP with a BERT or an open_clip text tower on a (data=2, fsdp=4) mesh of 8 fake CPU devices
all-gathers parameters only (and, for CLIP, the loss's embeddings), never a batch activation, and
XLA reports no "Involuntary full rematerialization"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from radjax.parallel.rules import constrain_batch, gather_fsdp

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VIT = os.path.join(REPO, "configs", "bench", "clip_vitb16.py") + ":tiny"
RESNET = os.path.join(REPO, "configs", "bench", "clip_rn50.py") + ":tiny"

# Widths such that the large kernels are FSDP-sharded (>= rules.MIN_SHARD_SIZE elements). Image
# towers: the label-supervised method, whose loss gathers nothing. Text towers: CLIP (tiny ViT)
# with FSDP-sharded embedding tables (vocabulary 256 x width 512, BERT's 40 x 512 positions); its
# loss gathers the batch's embeddings on purpose (see _LOSS_DIMS). The training loop's own step
# and state shardings, compiled from abstract values (no init, no run).
_SCRIPT = textwrap.dedent("""
    import json
    import jax
    import numpy as np
    from radjax import methods
    from radjax.bench import step
    from radjax.config import load_config
    from radjax.parallel import mesh as mesh_lib
    from radjax.train import loop, optim, state as state_lib
    common = [("mesh.data", "2"), ("mesh.fsdp", "4"), ("train.batch_size", "16")]
    clip = [("method.name", "clip"), ("model.embed_dim", "24"), ("data.max_text_len", "40"),
            ("model.text.vocab_size", "256"), ("model.text.hidden_size", "512"),
            ("model.text.intermediate_size", "512"), ("model.text.num_heads", "4")]
    cases = {
        "vit": (%(vit)r, [("method.name", "supervised"), ("model.image.width", "128"),
                          ("model.image.mlp_dim", "512"), ("model.image.num_heads", "4")]),
        "resnet": (%(resnet)r, [("method.name", "supervised"), ("model.image.width", "16")]),
        "clip_bert": (%(vit)r, clip + [("model.text.name", "bert"), ("model.text.pool", "cls")]),
        "clip_text": (%(vit)r, clip + [("model.text.name", "clip_text")]),
    }
    out = {}
    for name, (cfg, extra) in cases.items():
      config = load_config(cfg, common + extra)
      mesh = mesh_lib.make_mesh(config.mesh)
      method = methods.get_method(config.method.name)
      tx, schedule = optim.make_optimizer(config.optim, 10)
      graphdef, abstract, shardings, _ = state_lib.setup(method, config, mesh, tx, ema=False)
      batch_sh = mesh_lib.batch_sharding(mesh)
      host = step.random_batch(config, 16, np.random.default_rng(0), 2)
      batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in host.items()}
      fn = jax.jit(loop.make_train_step(method, graphdef, tx, schedule, mesh, accum_steps=1,
                                        ema_decay=0.0),
                   in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, mesh_lib.replicated(mesh)))
      hlo = fn.lower(abstract, batch).compile().as_text()
      params = {tuple(x.shape) for x in jax.tree.leaves(abstract["params"])}
      # A 1x1 convolution's kernel [1, 1, I, O] is gathered as the [I, O] of its dot.
      params |= {tuple(d for d in p if d != 1) for p in params}
      gathers = [s for op, s in step.collective_shapes(hlo) if op == "all-gather"]
      out[name] = {"mesh": {k: int(v) for k, v in mesh.shape.items()}, "all_gathers": gathers,
                   "param_gathers": [s for s in gathers if all(tuple(t) in params for t in s)]}
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def compiled():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, "-c", _SCRIPT % {"vit": VIT, "resnet": RESNET}], env=env,
                        capture_output=True, text=True, timeout=300, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):]), proc.stderr


# CLIP's loss gathers the batch (16) of embeddings (24) on purpose: [B, E] embeddings or a slice
# (backward), [B, B] logits, the diagonal's [B] values and [B, 2] index pairs. The text length (40)
# and widths (512, or 128 per fsdp shard) are none of these, so a gathered text activation fails.
_LOSS_DIMS = {16, 8, 4, 2, 1, 24}


def _loss_gather(shapes):
  return all(len(s) <= 2 and set(s) <= _LOSS_DIMS for s in shapes)


@pytest.mark.parametrize("name", ["vit", "resnet", "clip_bert", "clip_text"])
def test_fsdp_step_gathers_parameters_only(compiled, name):
  r = compiled[0][name]
  assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  # FSDP does gather the sharded kernels ...
  assert r["param_gathers"], r
  # ... and nothing else: a gathered [B, ...] activation means the batch left its axes.
  others = [s for s in r["all_gathers"] if s not in r["param_gathers"]]
  if name.startswith("clip"):
    others = [s for s in others if not _loss_gather(s)]
  assert not others, f"{name}: all-gathers of non-parameter (activation) shapes {others}"


def test_no_involuntary_rematerialization(compiled):
  warnings = [l for l in compiled[1].splitlines() if "Involuntary full rematerialization" in l]
  assert not warnings, warnings[:3]


def _constraints(fn, x):
  jaxpr = jax.make_jaxpr(fn)(x)
  return [e.params["sharding"] for e in jaxpr.eqns if e.primitive.name == "sharding_constraint"]


def test_constrain_batch_is_a_no_op_without_a_mesh():
  x = jnp.ones((8, 4, 6))
  assert _constraints(constrain_batch, x) == []
  # A mesh whose batch axes have size 1 splits nothing either.
  one = AbstractMesh((1, 1, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  with jax.sharding.use_abstract_mesh(one):
    assert _constraints(constrain_batch, x) == []


def test_constrain_batch_specs_on_a_mesh():
  mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  x = jnp.ones((8, 4, 6))
  with jax.sharding.use_abstract_mesh(mesh):
    (s,) = _constraints(constrain_batch, x)
    assert s.spec == P(("data", "fsdp"), None, None)
    (s,) = _constraints(lambda y: constrain_batch(y, (None, "mlp")), x)
    assert s.spec == P(("data", "fsdp"), None, "tensor")
    # A batch the batch axes do not divide is left alone (as are dims "tensor" does not divide).
    assert _constraints(constrain_batch, jnp.ones((6, 4))) == []
    (s,) = _constraints(lambda y: constrain_batch(y, ("mlp",)), jnp.ones((8, 3)))
    assert s.spec == P(("data", "fsdp"), None)


def test_gather_fsdp_specs():
  table = jnp.ones((64, 512))  # [vocab, embed]: 2^15 elements, FSDP-sharded
  assert _constraints(lambda t: gather_fsdp(t, ("vocab", "embed")), table) == []  # no mesh
  mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  with jax.sharding.use_abstract_mesh(mesh):
    # Placed as P("tensor", "fsdp") (vocab by rule, fsdp on the other dim): fsdp is dropped.
    (s,) = _constraints(lambda t: gather_fsdp(t, ("vocab", "embed")), table)
    assert s.spec == P("tensor", None)
    (s,) = _constraints(lambda t: gather_fsdp(t, ("pos", "embed")), table)
    assert s.spec == P(None, None)
  one = AbstractMesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  with jax.sharding.use_abstract_mesh(one):  # nothing is FSDP-sharded: nothing to gather
    assert _constraints(lambda t: gather_fsdp(t, ("vocab", "embed")), table) == []
