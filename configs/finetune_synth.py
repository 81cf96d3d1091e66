"""Full fine-tuning on SynthCXR's labelled train split, from a pre-training workdir or from scratch.

radjax train --config configs/finetune_synth.py --workdir runs/ft_clip --config.method.init_from=runs/clip
radjax train --config configs/finetune_synth.py:prognostic --workdir runs/ft_mortality
radjax evaluate --workdir runs/ft_clip                 # test-split AUROCs of the image-only classifier
radjax predict --workdir runs/ft_clip --out scores.csv films/

The model is configs/pretrain_synth.py's CPU ViT, so a pre-training run of that config (or of
configs/clip_synth.py) loads as it is. The study fine-tunes on frozen features (linear, distill);
this is the `full` counterpart (also a study fine-tuning: `study.finetune` "full").
"""

import os

from radjax.config import load_config_file


def get_config(arg="diagnostic"):
  config = load_config_file(os.path.join(os.path.dirname(__file__), "pretrain_synth.py:supervised"))
  config.data.labels = arg or "diagnostic"
  config.train.train_split = "train"
  config.train.eval_split = "validation"
  config.train.steps = 300
  config.train.eval_every = 100
  config.train.best_metric = "eval/bce"
  config.optim.lr = 3e-4
  return config
