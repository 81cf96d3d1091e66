"""Pre-training on SynthCXR with any method: ``get_config("METHOD[,VARIANT...]")``.

radjax train --config configs/pretrain_synth.py:clip --workdir runs/clip            # CPU, minutes
radjax train --config configs/pretrain_synth.py:mrm --workdir runs/mrm              # CPU, ~50 min
radjax train --config configs/pretrain_synth.py:ssl,resnet18 --workdir runs/simclr  # SimCLR, CPU
radjax train --config configs/pretrain_synth.py:clip,vitb16 --workdir /mnt/runs/clip_b16     # accelerators
radjax train --config configs/pretrain_synth.py:ssl,resnet50 --workdir /mnt/runs/simclr50

On several hosts the workdir is a folder every host sees (a shared filesystem, or a bucket mounted
with gcsfuse); URLs such as gs:// are refused (radjax/paths.py).

METHOD is one of ``radjax.methods.method_names()`` except ``none`` (nothing trains):
supervised, ssl (MAE for a ViT, SimCLR for a ResNet), clip, siglip, mrm, clip_ssl, caption, unicl.

The CPU default is the study's small ViT (width 128, depth 4, 16 px patches: a 4 x 4 grid) on
64 px films with reports of up to 128 tokens, 400 steps, as configs/study_synthetic.py pre-trains
it, so a run here and a study's pre-training are interchangeable. Two methods differ, because they
need longer to read the film: caption (1500 steps; not in the study) and mrm (4000 steps, ~50 min,
with masking set for SynthCXR's reports; the study's mrm keeps 400 steps and the method defaults).
16 px patches, not 8: from scratch, the coarser grid learns within a CPU budget
(BUILD_NOTES.md, "Making encoders learn on a CPU"). Variants, applied left to right:
  vitb16    ViT-B/16 at 224 px, BERT-base-sized text encoder, bfloat16, batch 256
  resnet50  ResNet-50 at 224 px (GroupNorm), otherwise as vitb16
  resnet18  ResNet-18 (width 64) at 64 px: several seconds a step on 2 CPU cores (the ViT: ~0.3 s)
  tiny      a seconds-per-step model for tests and smoke runs (32 px, 1-2 layers, vocab 512)
"""

from __future__ import annotations

import ml_collections

from radjax import defaults

_VARIANTS = ("vitb16", "resnet50", "resnet18", "tiny")


def _accelerator(config: ml_collections.ConfigDict) -> None:
  """224 px, BERT-base-sized text tower, bfloat16, a larger SynthCXR and a longer schedule."""
  config.data.image_size = 224
  config.data.synth.image_size = 224
  config.data.synth.n_pretrain = 50_000
  config.data.vocab_size = 8192
  config.data.num_workers = 8  # SynthCXR renders films on the host: keep the accelerator fed
  config.model.text.update(dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072))
  config.model.embed_dim = 512
  config.model.dtype = "bfloat16"
  config.method.decoder_dim = 512
  config.method.decoder_layers = 4
  config.optim.lr = 5e-4
  config.optim.warmup_steps = 500
  config.train.batch_size = 256
  config.train.steps = 10_000
  config.train.log_every = 50
  config.train.checkpoint_every = 1000


def _apply_variant(config: ml_collections.ConfigDict, variant: str) -> None:
  image = config.model.image
  if variant == "vitb16":
    _accelerator(config)
    # width/depth/mlp_dim/num_heads 0: the "b" variant's sizes.
    image.update(dict(name="vit", variant="b", patch_size=16, width=0, depth=0, mlp_dim=0, num_heads=0))
  elif variant == "resnet50":
    _accelerator(config)
    image.update(dict(name="resnet", variant="50", width=64, norm="group"))
  elif variant == "resnet18":
    image.update(dict(name="resnet", variant="18", width=64, norm="group"))
  elif variant == "tiny":
    config.data.image_size = 32
    config.data.synth.image_size = 32
    config.data.max_text_len = 48
    config.data.vocab_size = 512
    config.data.synth.n_pretrain = 128
    config.data.synth.n_validation = 64
    if image.name == "vit":
      image.update(dict(patch_size=8, width=48, depth=1, mlp_dim=96, num_heads=2))
    else:
      image.update(dict(width=16))
    config.model.text.update(dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    config.model.embed_dim = 32
    config.method.decoder_dim = 32
    config.method.decoder_layers = 1
    config.optim.warmup_steps = 2
    config.train.batch_size = 16
    config.train.steps = 10
    config.train.log_every = 1
    config.train.checkpoint_every = 0
    config.train.progress = False
  else:
    raise ValueError(f"configs/pretrain_synth.py: unknown variant {variant!r}; known: {', '.join(_VARIANTS)}")


def get_config(arg=None):
  parts = [p.strip() for p in str(arg or "").split(",") if p.strip()]
  if not parts:
    raise ValueError("configs/pretrain_synth.py needs a method: configs/pretrain_synth.py:METHOD[,VARIANT]"
                     " (e.g. :clip, :mrm, :clip,vitb16, :ssl,resnet50)")
  method, variants = parts[0], parts[1:]
  from radjax.methods import method_names  # pylint: disable=import-outside-toplevel
  trainable = [m for m in method_names() if m != "none"]
  if method not in trainable:
    hint = " ('none' is the untrained control: there is nothing to pre-train)" if method == "none" else ""
    raise ValueError(f"configs/pretrain_synth.py: unknown method {method!r}{hint}; known: {', '.join(trainable)}")

  config = defaults.pretrain_config()
  config.method.name = method
  # The study's small ViT (configs/study_synthetic.py): five pre-trainings in minutes on 2 CPU cores.
  config.model.image.update(dict(name="vit", patch_size=16, width=128, depth=4, mlp_dim=512, num_heads=4))
  config.data.image_size = 64
  config.data.synth.image_size = 64
  config.data.max_text_len = 128
  config.train.steps = 400
  # A captioner first learns the reports' language; it starts reading the film later (at 400 steps
  # it writes the same impression for every film, at 1500 it names their findings: BUILD_NOTES.md).
  if method == "caption":
    config.train.steps = 1500
  # SynthCXR's reports name each finding more than once, so a masked finding word is told by its
  # other mentions: mask every occurrence, and half the report and half the film so that the film
  # is worth reading. MRM then predicts side and grade words from the film by 4000 steps, not at
  # 1500 (BUILD_NOTES.md, "Making encoders learn on a CPU").
  if method == "mrm":
    config.method.update(dict(text_mask_every_occurrence=True, text_mask_ratio=0.5, mask_ratio=0.5))
    config.train.steps = 4000
  config.train.batch_size = 64
  config.train.checkpoint_every = 100
  for variant in variants:
    _apply_variant(config, variant)
  return config
