"""The study repeated while SynthCXR's text-label association and text leak are swept.

The experiment the paper could not run on real data: where does image-report alignment
start to hurt a prognostic label, and where does distillation stop helping?

radjax study --config configs/study_text_association.py --workdir runs/text_association
"""

import os

from radjax.config import load_config_file


def get_config(arg=None):
  spec = os.path.join(os.path.dirname(__file__), "study_synthetic.py") + (f":{arg}" if arg else "")
  config = load_config_file(spec)
  config.study.pretrain = ("ssl", "clip", "clip_ssl")
  config.study.tasks = ("mortality_12m",)
  config.study.n_train = (100, -1)
  config.study.sweep = "text_label_association=0,0.5,1;text_leak=0,0.9"
  return config
