"""Port a local Hugging Face BERT checkpoint (config.json + weights + tokenizer) into radjax.

Never touches the network: the directory must hold ``config.json`` and ``model.safetensors``
(or ``pytorch_model.bin``, read with torch when it is installed).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from radjax.models.bert import BertConfig, BertEncoder, bert_config_from_hf

_LN_OLD_NAMES = {"gamma": "weight", "beta": "bias"}


def _normalise_key(key: str) -> str:
  # Old TF-converted checkpoints call LayerNorm weight/bias gamma/beta.
  head, _, last = key.rpartition(".")
  if "LayerNorm" in head and last in _LN_OLD_NAMES:
    return f"{head}.{_LN_OLD_NAMES[last]}"
  return key


def read_hf_checkpoint(path: str) -> tuple[dict[str, np.ndarray], str]:
  """Tensors of ``path/model.safetensors`` (or ``pytorch_model.bin``) as float32 numpy, with the
  model prefix ("bert.", ...) stripped so keys start at "embeddings." / "encoder." / "pooler."."""
  path = os.path.expanduser(path)
  st = os.path.join(path, "model.safetensors")
  pt = os.path.join(path, "pytorch_model.bin")
  if os.path.exists(st):
    source = st
    try:
      from safetensors.numpy import load_file
      raw = load_file(st)
    except (TypeError, ValueError):  # bfloat16 has no numpy dtype: go through torch if present
      from safetensors.torch import load_file as load_torch
      raw = {k: v.float().numpy() for k, v in load_torch(st).items()}
  elif os.path.exists(pt):
    source = pt
    try:
      import torch
    except ImportError as e:
      raise ValueError(f"{pt}: reading pytorch_model.bin needs torch; convert it to "
                       "model.safetensors or install torch") from e
    raw = {k: v.float().numpy() for k, v in
           torch.load(pt, map_location="cpu", weights_only=True).items()
           if hasattr(v, "numpy")}
  else:
    raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin")
  anchor = "embeddings.word_embeddings.weight"
  prefixes = [k[: -len(anchor)] for k in raw if k.endswith(anchor)]
  if not prefixes:
    raise ValueError(f"{source}: not a BERT checkpoint (no '*{anchor}')")
  prefix = min(prefixes, key=len)
  tensors = {_normalise_key(k[len(prefix):]): np.asarray(v, dtype=np.float32)
             for k, v in raw.items() if k.startswith(prefix)}
  return tensors, source


def bert_param_map(num_layers: int, pooler: bool) -> dict[str, tuple[str, bool]]:
  """radjax param path ("a.b.c") -> (HF key, transpose)."""
  m = {
      "embeddings.word.embedding": ("embeddings.word_embeddings.weight", False),
      "embeddings.position.embedding": ("embeddings.position_embeddings.weight", False),
      "embeddings.token_type.embedding": ("embeddings.token_type_embeddings.weight", False),
      "embeddings.norm.scale": ("embeddings.LayerNorm.weight", False),
      "embeddings.norm.bias": ("embeddings.LayerNorm.bias", False),
  }
  dense = {"attn.query": "attention.self.query", "attn.key": "attention.self.key",
           "attn.value": "attention.self.value", "attn.out": "attention.output.dense",
           "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
  norms = {"ln1": "attention.output.LayerNorm", "ln2": "output.LayerNorm"}
  for i in range(num_layers):
    ours, theirs = f"encoder.layers.{i}", f"encoder.layer.{i}"
    for a, b in dense.items():
      m[f"{ours}.{a}.kernel"] = (f"{theirs}.{b}.weight", True)
      m[f"{ours}.{a}.bias"] = (f"{theirs}.{b}.bias", False)
    for a, b in norms.items():
      m[f"{ours}.{a}.scale"] = (f"{theirs}.{b}.weight", False)
      m[f"{ours}.{a}.bias"] = (f"{theirs}.{b}.bias", False)
  if pooler:
    m["pooler.kernel"] = ("pooler.dense.weight", True)
    m["pooler.bias"] = ("pooler.dense.bias", False)
  return m


def port_bert_weights(model: BertEncoder, tensors: Mapping[str, np.ndarray],
                      source: str = "checkpoint") -> None:
  """Copies HF tensors into ``model`` in place; keeps each parameter's sharding.

  Raises ValueError naming the parameter when a tensor is missing or has the wrong shape.
  """
  c = model.config
  mapping = bert_param_map(c.num_layers, model.pooler is not None)
  params = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(params))
  for path, var in flat.items():
    name = ".".join(str(p) for p in path)
    if name not in mapping:
      raise ValueError(f"{source}: no HF mapping for radjax parameter {name}")
    key, transpose = mapping[name]
    if key not in tensors:
      raise ValueError(f"{source}: missing parameter {key} (for {name})")
    value = tensors[key].T if transpose else tensors[key]
    old = var.get_value()
    if tuple(value.shape) != tuple(old.shape):
      raise ValueError(f"{source}: parameter {key} has shape {tuple(tensors[key].shape)} but "
                       f"the config expects {tuple(old.shape[::-1] if transpose else old.shape)}"
                       f" (radjax {name} {tuple(old.shape)})")
    if isinstance(old, jax.core.Tracer):
      new = jnp.asarray(value, old.dtype)
    else:
      new = jax.device_put(value.astype(old.dtype), old.sharding)
    var.set_value(new)
  nnx.update(model, params)


def load_hf_config(path: str) -> dict[str, Any]:
  cfg_file = os.path.join(os.path.expanduser(path), "config.json")
  if not os.path.exists(cfg_file):
    raise ValueError(f"{path}: no config.json (expected a local Hugging Face model directory)")
  with open(cfg_file) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{cfg_file}: invalid JSON: {e}") from e


def load_hf_tokenizer(path: str):
  """The directory's tokenizer via transformers.AutoTokenizer, offline."""
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(os.path.expanduser(path), local_files_only=True)


def load_hf_bert_encoder(path: str, *, rngs: nnx.Rngs | None = None, **overrides) -> BertEncoder:
  """A :class:`BertEncoder` shaped by ``path/config.json`` with the checkpoint's weights.

  ``overrides`` are BertConfig fields (pool, dtype, dropout, ...). The pooler exists iff the
  checkpoint has one.
  """
  hf = load_hf_config(path)
  tensors, source = read_hf_checkpoint(path)
  overrides.setdefault("pooler", "pooler.dense.weight" in tensors)
  cfg: BertConfig = bert_config_from_hf(hf, **overrides)
  model = BertEncoder(cfg, rngs=rngs if rngs is not None else nnx.Rngs(0))
  port_bert_weights(model, tensors, source)
  return model


def load_hf_bert(path: str, *, rngs: nnx.Rngs | None = None, **overrides):
  """-> (BertEncoder with the ported weights, the directory's HF tokenizer). No network."""
  return load_hf_bert_encoder(path, rngs=rngs, **overrides), load_hf_tokenizer(path)
