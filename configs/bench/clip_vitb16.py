"""CLIP ViT-B/16 at 224 px, shaped like open_clip's ``ViT-B-16`` (for ``radjax bench``).

radjax bench step    --config configs/bench/clip_vitb16.py --batch 16 --dtype bfloat16
radjax bench compare --config configs/bench/clip_vitb16.py --peer open_clip --batch 16 --dtype bfloat16

open_clip ViT-B-16 (model_configs/ViT-B-16.json): embed_dim 512; vision width 768, 12 layers,
12 heads, patch 16, image 224, mlp 3072, GELU (erf), pre-LN, cls-token pooling after ln_post,
linear projection 768->512 without bias; text context 77, vocabulary 49408, width 512, 8 heads,
12 layers, mlp 2048, causal, argmax (EOT) pooling after ln_final, projection 512->512 without
bias; learnable logit scale initialised to 1/0.07 (capped at 100); AdamW.

Differences of radjax's ViT (all negligible in FLOPs, < 0.01% of parameters):
  * no ``ln_pre`` LayerNorm after the patch embedding (open_clip has one: 2 x 768 params,
    ~0.3 MFLOP per image of the ~35 GFLOP forward);
  * the patch embedding has a bias (open_clip's conv1 has none: 768 params);
  * the position embedding covers the 196 patches only; the cls token has its own learned
    vector instead of cls + posemb[0] (768 params fewer);
  * LayerNorm eps 1e-6 (ViT) vs PyTorch's 1e-5.
Parameters: radjax 149.62 M vs open_clip 149.62 M (ViT-B-16, see ``radjax bench compare``).
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
  m.image.update(dict(name="vit", variant="b", patch_size=16, pool="cls", posemb="learned",
                      width=0, depth=0, mlp_dim=0, num_heads=0))
  # vocab_size > 0: the model does not need a tokenizer (random ids in the benchmark).
  m.text.update(dict(name="clip_text", hidden_size=512, num_layers=12, num_heads=8,
                     intermediate_size=2048, vocab_size=49408, pool="argmax"))
  m.embed_dim = 512
  m.dtype = "float32"  # `radjax bench step --dtype bfloat16` switches the compute dtype

  # open_clip's training defaults (open_clip_train/params.py for ViT models).
  o = config.optim
  o.lr = 5e-4
  o.b1, o.b2, o.eps = 0.9, 0.98, 1e-6
  o.weight_decay = 0.2
  o.warmup_steps = 10_000
  o.clip_norm = 0.0  # open_clip: no gradient clipping unless --grad-clip-norm

  config.train.batch_size = 16
  config.train.progress = False
  if arg == "tiny":
    # Same code path at a size that compiles and runs in seconds (tests).
    d.image_size = d.synth.image_size = 32
    d.max_text_len = 16
    m.image.update(dict(variant="ti", patch_size=8, width=32, depth=1, mlp_dim=64, num_heads=2))
    m.text.update(dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                       vocab_size=512))
    m.embed_dim = 16
    config.train.batch_size = 4
  return config
