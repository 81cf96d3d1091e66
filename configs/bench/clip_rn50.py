"""CLIP with a ResNet-50 image tower at 224 px, the radjax counterpart of open_clip's ``RN50``.

radjax bench step    --config configs/bench/clip_rn50.py --batch 16 --dtype bfloat16
radjax bench compare --config configs/bench/clip_rn50.py --peer open_clip --batch 16

open_clip RN50 (model_configs/RN50.json): embed_dim 1024; vision ``ModifiedResNet`` layers
(3, 4, 6, 3), width 64, image 224; text as ViT-B-16's (context 77, vocabulary 49408, width 512,
8 heads, 12 layers).

radjax mirrors it with ``ResNet(style="clip", norm="batch")``: the 3-convolution stem,
anti-aliased downsampling, BatchNorm with batch statistics in training, and attention pooling
with 32 heads (radjax/models/resnet.py; tests/test_models.py checks it against open_clip's own
ModifiedResNet, weights ported). One difference: open_clip's attention-pool output projection
``c_proj`` (2048 -> 1024, with a bias) is radjax's CLIP image projection (no bias), so radjax has
1024 parameters fewer. radjax computes the attention pool's query for the mean token only, the
one whose output is used; open_clip computes all 50 (0.4 GFLOP more per forward).
"""

from radjax import defaults


def get_config(arg=None):
  config = defaults.pretrain_config()
  config.method.name = "clip"
  config.method.init_temperature = 0.07

  d = config.data
  d.image_size = 224
  d.synth.image_size = 224
  d.channels = 3
  d.max_text_len = 77

  m = config.model
  # width is shared with the ViT fields of model.image (0 there means "from the variant").
  m.image.update(dict(name="resnet", variant="50", style="clip", norm="batch", width=64))
  m.text.update(dict(name="clip_text", hidden_size=512, num_layers=12, num_heads=8,
                     intermediate_size=2048, vocab_size=49408, pool="argmax"))
  m.embed_dim = 1024
  m.dtype = "float32"

  # open_clip's training defaults for ResNet models (open_clip_train/params.py).
  o = config.optim
  o.lr = 5e-4
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
  o.weight_decay = 0.2
  o.warmup_steps = 10_000
  o.clip_norm = 0.0

  config.train.batch_size = 16
  config.train.progress = False
  if arg == "tiny":
    d.image_size = d.synth.image_size = 32
    d.max_text_len = 16
    m.image.update(dict(blocks=(1, 1, 1, 1), width=8))
    m.text.update(dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                       vocab_size=512))
    m.embed_dim = 16
    config.train.batch_size = 4
  return config
