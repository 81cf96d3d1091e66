"""The paper's grid on MIMIC-CXR-JPG (+ MIMIC-IV outcomes), for users with access and accelerators.

radjax data build --dataset mimic_cxr --manual_dir ~/physionet/mimic-cxr-jpg/2.1.0 --data_dir ~/tfds \
    --builder_arg reports=~/physionet/mimic-cxr/2.1.0/mimic-cxr-reports.zip \
    --builder_arg mimic_iv_dir=~/physionet/mimiciv/3.1
radjax study --config configs/study_mimic.py:vitb16 --workdir runs/mimic --config.data.data_dir=~/tfds
(`:resnet50` for the CNN backbone.)
"""

import os

from radjax import defaults
from radjax.config import load_config_file


def get_config(arg="vitb16"):
  config = defaults.pretrain_config()
  # The study knobs are shared with the SynthCXR study beside this file.
  config.study = load_config_file(os.path.join(os.path.dirname(__file__), "study_synthetic.py")).study
  config.study.pretrain = ("none", "supervised", "ssl", "clip", "mrm", "clip_ssl", "caption")
  config.study.tasks = ("diagnostic", "readmission_12m", "mortality_12m")
  config.study.n_train = (100, 1000, 10000, -1)
  config.study.finetune = ("linear", "self_distill", "distill", "full", "full_distill")
  config.study.full_steps = 2000
  config.study.full_lr = 1e-4
  config.study.feature_batch_size = 512

  config.data.dataset = "mimic_cxr"
  config.data.image_size = 224
  config.data.channels = 1
  config.data.max_text_len = 128
  config.data.vocab_size = 30522
  config.data.uncertain_policy = "ignore"
  config.data.num_workers = 8
  # Pre-training reads the training split's images and reports, as the paper does: the builders
  # write train / validation / test only (SynthCXR's separate "pretrain" pool is its own).
  config.train.train_split = "train"
  if arg == "vitb16":
    config.model.image.update(dict(name="vit", variant="b", patch_size=16))
  elif arg == "resnet50":
    config.model.image.update(dict(name="resnet", variant="50", norm="group"))
  else:
    raise ValueError(f"configs/study_mimic.py: unknown argument {arg!r} (vitb16 or resnet50)")
  config.model.text.update(dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072))
  config.model.embed_dim = 512
  config.model.dtype = "bfloat16"
  config.optim.lr = 3e-4
  config.optim.warmup_steps = 2000
  config.train.batch_size = 256
  config.train.steps = 50_000
  config.train.checkpoint_every = 2000
  return config
