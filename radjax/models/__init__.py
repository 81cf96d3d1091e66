"""radjax models: image encoders (ViT, ResNet), text encoders (BERT, CLIP text), heads, decoders.

Registry entry points take the model ConfigDict of ``radjax.defaults.model_config()`` (or its
``image`` / ``text`` sub-config) plus the data-dependent sizes.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from radjax.config import ConfigError
from radjax.models.bert import BertConfig, BertEncoder, bert_config_from_hf
from radjax.models.clip_text import CLIPTextConfig, CLIPTextEncoder
from radjax.models.decoders import MAEDecoder, MLMHead, ReportDecoder
from radjax.models.heads import ClassifierHead, ProjectionHead, Teacher, Temperature
from radjax.models.hf import (load_hf_bert, load_hf_bert_encoder, load_hf_config,
                              load_hf_tokenizer, port_bert_weights)
from radjax.models.masking import patchify, random_masking, unpatchify
from radjax.models.resnet import ResNet, ResNetConfig
from radjax.models.vit import ViT, ViTConfig

__all__ = [
    "BertConfig", "BertEncoder", "CLIPTextConfig", "CLIPTextEncoder", "ClassifierHead",
    "MAEDecoder", "MLMHead", "ProjectionHead", "ReportDecoder", "ResNet", "ResNetConfig",
    "Teacher", "Temperature", "ViT", "ViTConfig", "bert_config_from_hf", "build_image_encoder",
    "build_text_encoder", "image_encoder_config", "load_hf_bert", "load_hf_bert_encoder",
    "load_hf_config", "load_hf_tokenizer", "patchify", "port_bert_weights", "random_masking",
    "text_encoder_config", "unpatchify",
]


def _split(cfg, key: str, dtype: Any):
  """(sub-config, dtype) from a model config (with .image/.text) or the sub-config itself."""
  if key in cfg:
    sub = cfg[key]
    return sub, dtype if dtype is not None else cfg.get("dtype", "float32")
  return cfg, dtype if dtype is not None else cfg.get("dtype", "float32")


def image_encoder_config(cfg, *, image_size: int, channels: int, dtype: Any = None
                         ) -> ViTConfig | ResNetConfig:
  """ViTConfig / ResNetConfig from ``cfg.image`` (name "vit" | "resnet")."""
  sub, dtype = _split(cfg, "image", dtype)
  name = sub.get("name", "vit")
  if name == "vit":
    return ViTConfig.from_mapping(sub, image_size=image_size, channels=channels, dtype=dtype)
  if name == "resnet":
    return ResNetConfig.from_mapping(sub, image_size=image_size, channels=channels, dtype=dtype)
  raise ConfigError(f"model.image.name must be 'vit' or 'resnet', got {name!r}")


def build_image_encoder(cfg, rngs: nnx.Rngs, *, image_size: int, channels: int,
                        dtype: Any = None) -> ViT | ResNet:
  """The image encoder V(.) of ``cfg.image``; ``dtype`` (default ``cfg.dtype``) is compute dtype."""
  c = image_encoder_config(cfg, image_size=image_size, channels=channels, dtype=dtype)
  return ViT(c, rngs=rngs) if isinstance(c, ViTConfig) else ResNet(c, rngs=rngs)


def text_encoder_config(cfg, *, vocab_size: int, max_len: int, dtype: Any = None
                        ) -> BertConfig | CLIPTextConfig:
  """BertConfig / CLIPTextConfig from ``cfg.text`` (name "bert" | "clip_text").

  With ``text.hf_path`` the architecture comes from that directory's config.json, and
  ``vocab_size`` / ``max_len`` are only checked against it.
  """
  sub, dtype = _split(cfg, "text", dtype)
  name = sub.get("name", "bert")
  pool = sub.get("pool", "") or None
  hf_path = sub.get("hf_path", None)
  if name == "bert":
    kw = {"pool": pool} if pool else {}
    # Dropout comes from the radjax config (default 0), not the HF config's 0.1: a module left in
    # train mode by accident then still evaluates deterministically.
    kw["dropout"] = float(sub.get("dropout", 0.0))
    if hf_path:
      c = bert_config_from_hf(load_hf_config(hf_path), dtype=dtype, **kw)
      if max_len > c.max_position_embeddings:
        raise ValueError(f"{hf_path}: text length {max_len} exceeds max_position_embeddings "
                         f"{c.max_position_embeddings}")
      if vocab_size > c.vocab_size:
        raise ValueError(f"{hf_path}: tokenizer vocab_size {vocab_size} exceeds the model's "
                         f"{c.vocab_size} (use that directory's tokenizer)")
      return c
    return BertConfig(vocab_size=vocab_size, hidden_size=sub["hidden_size"],
                      num_layers=sub["num_layers"], num_heads=sub["num_heads"],
                      intermediate_size=sub["intermediate_size"], max_position_embeddings=max_len,
                      pooler=pool == "pooler", dtype=dtype, **kw)
  if name == "clip_text":
    if hf_path:
      raise ConfigError("model.text.hf_path is only supported for name='bert'")
    kw = {"pool": pool} if pool else {}
    return CLIPTextConfig(vocab_size=vocab_size, context_length=max_len, width=sub["hidden_size"],
                          num_heads=sub["num_heads"], num_layers=sub["num_layers"],
                          mlp_dim=sub["intermediate_size"], proj_dim=None, dtype=dtype, **kw)
  raise ConfigError(f"model.text.name must be 'bert' or 'clip_text', got {name!r}")


def build_text_encoder(cfg, rngs: nnx.Rngs, *, vocab_size: int, max_len: int,
                       dtype: Any = None) -> BertEncoder | CLIPTextEncoder:
  """The text encoder T(.) of ``cfg.text``; loads HF weights when ``text.hf_path`` is set."""
  c = text_encoder_config(cfg, vocab_size=vocab_size, max_len=max_len, dtype=dtype)
  sub, _ = _split(cfg, "text", dtype)
  if isinstance(c, BertConfig):
    if sub.get("hf_path", None):
      return load_hf_bert_encoder(sub["hf_path"], rngs=rngs, pool=c.pool, dtype=c.dtype,
                                  dropout=c.dropout)
    return BertEncoder(c, rngs=rngs)
  return CLIPTextEncoder(c, rngs=rngs)
