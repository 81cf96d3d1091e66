"""Analytic model FLOPs per example (a multiply-add = 2 FLOPs; norms, softmax and activations
are ignored, they are a few percent). Forward+backward = 3 x forward.
"""

from __future__ import annotations

from typing import Any, Mapping

from radjax.models.bert import BertConfig
from radjax.models.clip_text import CLIPTextConfig
from radjax.models.resnet import ResNetConfig, stage_specs
from radjax.models.vit import ViTConfig


def attention_layer_flops(t: int, d: int, s: int | None = None, kv_dim: int | None = None) -> int:
  """One attention sub-layer: T queries of width D over S keys of width kv_dim (self if None)."""
  s = t if s is None else s
  kv_dim = d if kv_dim is None else kv_dim
  proj = 2 * t * d * d * 2 + 2 * s * kv_dim * d * 2   # q, out ; k, v
  return proj + 4 * t * s * d                         # logits + weighted sum


def transformer_flops(tokens: int, width: int, depth: int, mlp_dim: int, *,
                      context: int = 0, context_dim: int | None = None,
                      rows: int | None = None) -> int:
  """``depth`` blocks over ``tokens`` tokens (+ cross-attention to ``context`` tokens); with
  ``rows``, the last block computes the outputs of that many rows only (Transformer's ``rows``:
  keys and values at every token, the rest at those rows)."""
  def layer(queries: int) -> int:
    flops = attention_layer_flops(queries, width, tokens) + 4 * queries * width * mlp_dim
    if context:
      flops += attention_layer_flops(queries, width, context, context_dim)
    return flops

  if depth == 0:
    return 0
  return (depth - 1) * layer(tokens) + layer(tokens if rows is None else rows)


def vit_flops(config: ViTConfig | Mapping[str, Any], *, num_kept: int | None = None,
              pooled_only: bool = False) -> int:
  """Forward FLOPs of one image; ``num_kept`` visible patches when patches are dropped (MAE);
  ``pooled_only`` as ``ViT(..., pooled_only=True)`` computes it."""
  c = (config if isinstance(config, ViTConfig) else ViTConfig.from_mapping(config)).resolved()
  n = (c.image_size // c.patch_size) ** 2
  patch = 2 * n * c.patch_size ** 2 * c.channels * c.width
  t = (n if num_kept is None else num_kept) + (1 if c.pool == "cls" else 0)
  rows = 1 if pooled_only and c.pool == "cls" else None
  return patch + transformer_flops(t, c.width, c.depth, c.mlp_dim, rows=rows)


def _conv(h: int, cin: int, cout: int, k: int, stride: int) -> tuple[int, int]:
  ho = -(-h // stride)  # every conv / pool here pads k//2, so out = ceil(in / stride)
  return 2 * ho * ho * k * k * cin * cout, ho


def resnet_flops(config: ResNetConfig | Mapping[str, Any]) -> int:
  """Forward FLOPs of one (square) image: the convolutions (and style "clip"'s attention pool)."""
  c = config if isinstance(config, ResNetConfig) else ResNetConfig.from_mapping(config)
  clip = c.style == "clip"
  if clip:  # three 3x3 convs, the first strided, then a 2x2 average pool
    total, h = _conv(c.image_size, c.channels, c.width // 2, 3, 2)
    total += _conv(h, c.width // 2, c.width // 2, 3, 1)[0] + _conv(h, c.width // 2, c.width, 3, 1)[0]
    h //= 2
  else:  # 7x7 s2, then a 3x3 s2 max pool
    total, h = _conv(c.image_size, c.channels, c.width, 7, 2)
    h = -(-h // 2)
  for kind, cin, width, stride in stage_specs(c):
    if kind == "bottleneck":
      cout = 4 * width
      f1, _ = _conv(h, cin, width, 1, 1)
      if clip:  # stride-1 3x3, then an average pool
        f2, ho = _conv(h, width, width, 3, 1)[0], h // stride
      else:
        f2, ho = _conv(h, width, width, 3, stride)
      f3, _ = _conv(ho, width, cout, 1, 1)
      total += f1 + f2 + f3
    else:
      cout = width
      f1, ho = _conv(h, cin, width, 3, stride)
      f2, _ = _conv(ho, width, width, 3, 1)
      total += f1 + f2
    if stride != 1 or cin != cout:
      total += _conv(ho if clip else h, cin, cout, 1, 1 if clip else stride)[0]
    h = ho
  if clip:  # attention pool: k, v of the mean + h*w tokens, q of the mean, one query's attention
    tokens, d = h * h + 1, cout
    total += 2 * 2 * tokens * d * d + 2 * d * d + 4 * tokens * d
  return total


def bert_flops(config: BertConfig | Mapping[str, Any], seq_len: int, *,
               pooled_only: bool = False) -> int:
  """Forward FLOPs of one sequence of ``seq_len`` tokens (embedding lookups are free);
  ``pooled_only`` as ``BertEncoder(..., pooled_only=True)`` computes it."""
  c = config if isinstance(config, BertConfig) else BertConfig.from_mapping(config)
  rows = 1 if pooled_only and c.pool != "mean" else None
  total = transformer_flops(seq_len, c.hidden_size, c.num_layers, c.intermediate_size, rows=rows)
  return total + (2 * c.hidden_size ** 2 if c.pooler else 0)


def clip_text_flops(config: CLIPTextConfig | Mapping[str, Any], seq_len: int | None = None, *,
                    pooled_only: bool = False) -> int:
  c = config if isinstance(config, CLIPTextConfig) else CLIPTextConfig.from_mapping(config)
  seq_len = c.context_length if seq_len is None else seq_len
  total = transformer_flops(seq_len, c.width, c.num_layers, c.mlp_dim or 4 * c.width,
                            rows=1 if pooled_only else None)
  return total + (2 * c.width * c.proj_dim if c.proj_dim else 0)


def train_flops(forward: int) -> int:
  """Forward + backward: the backward pass costs two forwards (grads w.r.t. inputs and weights)."""
  return 3 * forward


def model_flops(model_cfg, *, image_size: int, channels: int, text_len: int,
                vocab_size: int = 30522, pooled_only: bool = False) -> dict[str, int]:
  """Forward FLOPs per example of the image and text encoders described by a model ConfigDict
  (``defaults.model_config()``): {"image": ..., "text": ...}; x3 for training. ``pooled_only``:
  the encoders called for their pooled output only (CLIP, classifiers)."""
  from radjax.models import image_encoder_config, text_encoder_config
  img = image_encoder_config(model_cfg, image_size=image_size, channels=channels)
  out = {"image": (vit_flops(img, pooled_only=pooled_only) if isinstance(img, ViTConfig)
                   else resnet_flops(img))}
  txt = text_encoder_config(model_cfg, vocab_size=vocab_size, max_len=text_len)
  out["text"] = (bert_flops(txt, text_len, pooled_only=pooled_only) if isinstance(txt, BertConfig)
                 else clip_text_flops(txt, text_len, pooled_only=pooled_only))
  return out
