"""Full fine-tuning on SynthCXR's labelled train split, from a pre-training workdir or from scratch.

radjax train --config configs/finetune_synth.py --workdir runs/ft_clip --config.method.init_from=runs/clip
radjax train --config configs/finetune_synth.py:prognostic --workdir runs/ft_mortality

The study fine-tunes on frozen features (linear, distill); this is the `full` counterpart.
"""

from radjax import defaults


def get_config(arg="diagnostic"):
  config = defaults.pretrain_config()
  config.method.name = "supervised"
  config.data.labels = arg or "diagnostic"
  config.train.train_split = "train"
  config.train.eval_split = "validation"
  config.train.eval_every = 100
  config.train.best_metric = "eval/bce"
  config.optim.lr = 3e-4
  return config
