"""The paper's grid on INSPECT (CT pulmonary angiography + impressions + outcomes).

radjax data build --dataset inspect --manual_dir ~/inspect --data_dir ~/tfds
radjax study --config configs/study_inspect.py:vitb16 --workdir runs/inspect --config.data.data_dir=~/tfds

The model input is the three-window (lung / PE / mediastinal) coronal projection that the
INSPECT builder stores as `image` (see radjax/data/ct.py); channels = 3.
"""

import os

from radjax.config import load_config_file


def get_config(arg="vitb16"):
  config = load_config_file(os.path.join(os.path.dirname(__file__), f"study_mimic.py:{arg}"))
  config.data.dataset = "inspect"
  config.data.channels = 3
  config.study.pretrain = ("none", "ssl", "clip", "mrm", "clip_ssl")
  config.study.tasks = ("pe_positive_nlp", "12_month_mortality", "12_month_readmission", "12_month_PH")
  config.study.n_train = (100, 1000, -1)
  return config
