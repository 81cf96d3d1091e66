"""Report tokenizers: a local Hugging Face tokenizer, or a WordPiece trained on the reports.

    tok = get_tokenizer(data_cfg)                      # data_cfg.tokenizer: local dir / tokenizer.json, or None
    ids, mask = tok.encode_batch(reports, max_len=64)  # int32 [B, L] each: [CLS] ... [SEP] [PAD]...

With ``data_cfg.tokenizer = None`` a BERT-style WordPiece tokenizer (BERT normaliser
with lower-casing, BERT pre-tokenizer, specials [PAD]=0, [UNK], [CLS], [SEP], [MASK])
is built from a deterministic sample of the dataset's reports (evenly spaced over the
pretrain split) with a deterministic vocabulary choice (see ``train_wordpiece``), so
every process and every run gets the same vocabulary. Pass
``cache_dir`` to keep it as ``tokenizer-<hash>.json`` and skip retraining.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from radjax.config import ConfigError

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_ROLE_NAMES = {  # role -> candidate token strings (BERT first, then RoBERTa/GPT-style)
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "cls": ("[CLS]", "<s>", "<cls>", "[BOS]"),
    "sep": ("[SEP]", "</s>", "<sep>", "[EOS]"),
    "mask": ("[MASK]", "<mask>"),
}
_TRAIN_SAMPLE = 5000


class Tokenizer:
  """A ``tokenizers.Tokenizer`` plus special-token ids; picklable (grain workers)."""

  def __init__(self, tok: tokenizers.Tokenizer, specials: dict[str, str] | None = None, name: str = ""):
    tok.no_truncation()
    tok.no_padding()
    self._tok = tok
    self.name = name
    specials = dict(specials or {})
    ids = {}
    for role, candidates in _ROLE_NAMES.items():
      token = specials.get(role)
      tid = tok.token_to_id(token) if token else None
      for cand in candidates:
        if tid is not None:
          break
        tid = tok.token_to_id(cand)
      if tid is None and role in ("pad", "cls", "sep"):
        raise ValueError(f"tokenizer {name!r} has no {role} token (tried {specials.get(role) or candidates})")
      ids[role] = tid
    self.pad_id: int = ids["pad"]
    self.cls_id: int = ids["cls"]
    self.sep_id: int = ids["sep"]
    self.unk_id: int | None = ids["unk"]
    # Tokenizers without a mask token (GPT-style) get [UNK] for masked language modelling.
    self.mask_id: int = ids["mask"] if ids["mask"] is not None else (ids["unk"] or 0)
    self._special_ids = {i for i in ids.values() if i is not None}

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def backend(self) -> tokenizers.Tokenizer:
    return self._tok

  def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """One text -> (ids int32 [max_len], mask int32 [max_len]); [CLS] ... [SEP], truncated, padded."""
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 (room for [CLS] and [SEP]), got {max_len}")
    body = self._tok.encode(text, add_special_tokens=False).ids[:max_len - 2]
    n = len(body) + 2
    ids = np.full((max_len,), self.pad_id, np.int32)
    ids[0] = self.cls_id
    ids[1:n - 1] = body
    ids[n - 1] = self.sep_id
    mask = np.zeros((max_len,), np.int32)
    mask[:n] = 1
    return ids, mask

  def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> (ids int32 [B, max_len], mask int32 [B, max_len])."""
    if max_len < 2:
      raise ValueError(f"max_len must be >= 2 (room for [CLS] and [SEP]), got {max_len}")
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    ids = np.full((len(encs), max_len), self.pad_id, np.int32)
    mask = np.zeros((len(encs), max_len), np.int32)
    for b, enc in enumerate(encs):
      body = enc.ids[:max_len - 2]
      n = len(body) + 2
      ids[b, 0] = self.cls_id
      ids[b, 1:n - 1] = body
      ids[b, n - 1] = self.sep_id
      mask[b, :n] = 1
    return ids, mask

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Token ids (one sequence) -> text, without special and padding tokens."""
    keep = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in self._special_ids]
    return self._tok.decode(keep, skip_special_tokens=True)

  def save(self, path: str) -> None:
    self._tok.save(path)

  def __getstate__(self):
    return {"json": self._tok.to_str(), "name": self.name,
            "specials": {"pad": self._tok.id_to_token(self.pad_id), "cls": self._tok.id_to_token(self.cls_id),
                         "sep": self._tok.id_to_token(self.sep_id),
                         "unk": None if self.unk_id is None else self._tok.id_to_token(self.unk_id),
                         "mask": self._tok.id_to_token(self.mask_id)}}

  def __setstate__(self, state):
    self.__init__(tokenizers.Tokenizer.from_str(state["json"]), state["specials"], state["name"])

  def __repr__(self) -> str:
    return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _bert_pipeline(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=None, lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  return tok


def train_wordpiece(texts: Iterable[str], vocab_size: int, subword_share: float = 0.25) -> tokenizers.Tokenizer:
  """A BERT-style WordPiece tokenizer whose vocabulary is a pure function of the texts.

  ``tokenizers``' own WordPieceTrainer is not deterministic (hash-map order decides ties
  between equally frequent merges: huggingface/tokenizers#1794), so the vocabulary is
  chosen here: specials, every character (as word start and as ``##`` continuation),
  then the most frequent words, with up to ``subword_share`` of the budget given to the
  most frequent word pieces (prefixes and ``##`` suffixes) of the words that did not fit,
  so rare words split into a few pieces rather than characters. Ties break
  alphabetically. Normalisation and pre-tokenisation are BERT's (lower-cased).
  """
  norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                    lowercase=True)
  pre = pre_tokenizers.BertPreTokenizer()
  counts: dict[str, int] = {}
  for text in texts:
    for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)):
      counts[w] = counts.get(w, 0) + 1
  char_counts: dict[str, int] = {}
  for w, c in counts.items():
    for ch in w:
      char_counts[ch] = char_counts.get(ch, 0) + c
  chars = sorted(char_counts, key=lambda ch: (-char_counts[ch], ch))
  budget = vocab_size - len(SPECIALS)
  chars = chars[:max(0, budget // 2)]
  vocab = list(SPECIALS) + chars + ["##" + ch for ch in chars]
  seen = set(vocab)
  words = [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if w not in seen]
  left = vocab_size - len(vocab)
  if len(words) > left:
    n_sub = int(left * subword_share)
    chosen, rare = words[:left - n_sub], words[left - n_sub:]
    pieces: dict[str, int] = {}
    for w in rare:
      c = counts[w]
      for k in range(2, min(6, len(w) - 1) + 1):
        pieces[w[:k]] = pieces.get(w[:k], 0) + c
        if len(w) - k <= 6:
          pieces["##" + w[k:]] = pieces.get("##" + w[k:], 0) + c
    chosen_set = seen | set(chosen)
    ranked = [p for p in sorted(pieces, key=lambda p: (-pieces[p], p)) if p not in chosen_set]
    words = chosen + ranked[:n_sub]
  vocab += words[:left]
  tok = tokenizers.Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                              max_input_chars_per_word=100))
  return _bert_pipeline(tok)


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _special_names(directory: str) -> dict[str, str]:
  """Special-token strings from special_tokens_map.json / tokenizer_config.json, by role."""
  out = {}
  for fname in ("tokenizer_config.json", "special_tokens_map.json"):
    cfg = _read_json(os.path.join(directory, fname))
    for role in _ROLE_NAMES:
      v = cfg.get(f"{role}_token")
      if isinstance(v, dict):
        v = v.get("content")
      if isinstance(v, str):
        out[role] = v
  return out


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a local Hugging Face tokenizer: a tokenizer.json file or a directory holding one
  (or a vocab.txt, or anything ``transformers.AutoTokenizer`` reads offline)."""
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    return Tokenizer(tokenizers.Tokenizer.from_file(path), _special_names(os.path.dirname(path)), path)
  if not os.path.isdir(path):
    raise ConfigError(f"data.tokenizer={path!r}: no such file or directory")
  tj = os.path.join(path, "tokenizer.json")
  specials = _special_names(path)
  if os.path.exists(tj):
    return Tokenizer(tokenizers.Tokenizer.from_file(tj), specials, path)
  vocab = os.path.join(path, "vocab.txt")
  if os.path.exists(vocab):
    lower = _read_json(os.path.join(path, "tokenizer_config.json")).get("do_lower_case", True)
    tok = _bert_pipeline(tokenizers.Tokenizer(models.WordPiece.from_file(vocab, unk_token=specials.get("unk", "[UNK]"))))
    tok.normalizer = normalizers.BertNormalizer(lowercase=bool(lower), strip_accents=None)
    return Tokenizer(tok, specials, path)
  try:
    import transformers  # pylint: disable=import-outside-toplevel
    hf = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"data.tokenizer={path!r}: no tokenizer.json or vocab.txt, and transformers "
                      f"could not load it offline ({type(e).__name__}: {e})") from e
  if not getattr(hf, "is_fast", False):
    raise ConfigError(f"data.tokenizer={path!r}: only fast (tokenizers-backed) tokenizers are supported")
  specials.update({r: getattr(hf, f"{r}_token") for r in _ROLE_NAMES if getattr(hf, f"{r}_token", None)})
  return Tokenizer(hf.backend_tokenizer, specials, path)


def _cache_key(data_cfg: Any, vocab_size: int, texts: Sequence[str] | None) -> str:
  if texts is not None:
    payload = {"texts": hashlib.sha1("\x00".join(texts).encode()).hexdigest()}
  else:
    synth = data_cfg.synth.to_dict() if hasattr(data_cfg.synth, "to_dict") else dict(data_cfg.synth)
    payload = {"dataset": data_cfg.dataset, "data_dir": data_cfg.data_dir, "synth": synth,
               "builder_config": str(data_cfg.get("builder_config", None))}
  payload.update(vocab_size=vocab_size, sample=_TRAIN_SAMPLE, version=1)
  return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def get_tokenizer(data_cfg: Any, texts_fn: Callable[[], Iterable[str]] | None = None,
                  cache_dir: str | None = None) -> Tokenizer:
  """The tokenizer of ``data_cfg`` (see module docstring).

  texts_fn: returns the training texts (default: up to 5000 reports of the pretrain split).
  cache_dir: where to keep/reuse the trained tokenizer.json (optional).
  """
  if data_cfg.tokenizer:
    return load_tokenizer(str(data_cfg.tokenizer))
  vocab_size = int(data_cfg.vocab_size)
  if vocab_size < len(SPECIALS) + 30:
    raise ConfigError(f"data.vocab_size={vocab_size} is too small to train a WordPiece tokenizer")
  texts = None
  if texts_fn is not None:
    texts = list(texts_fn())
  key = _cache_key(data_cfg, vocab_size, texts)
  path = None
  if cache_dir:
    path = os.path.join(os.path.expanduser(cache_dir), f"tokenizer-{key}.json")
    if os.path.exists(path):
      return Tokenizer(tokenizers.Tokenizer.from_file(path), name=path)
  if key in _MEMO and not path:
    return _MEMO[key]
  if texts is None:
    from radjax.data import sources  # pylint: disable=import-outside-toplevel
    texts = sources.sample_reports(data_cfg, _TRAIN_SAMPLE)
  if not texts:
    raise ValueError(f"no reports to train a tokenizer on (dataset {data_cfg.dataset!r})")
  tok = train_wordpiece(texts, vocab_size)
  if path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)
  out = Tokenizer(tok, name=path or f"wordpiece-{vocab_size}")
  _MEMO[key] = out
  return out


# In-process memo of built tokenizers (building one renders thousands of SynthCXR reports).
_MEMO: dict[str, Tokenizer] = {}
