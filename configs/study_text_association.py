"""The study repeated while SynthCXR's text-label association and text leak are swept.

The experiment the paper could not run on real data: where does image-report alignment
start to hurt a prognostic label, and where does distillation stop helping?

radjax study --config configs/study_text_association.py --workdir runs/text_association
"""

import importlib.util
import os


def _study_synthetic():
  path = os.path.join(os.path.dirname(__file__), "study_synthetic.py")
  spec = importlib.util.spec_from_file_location("radjax_study_synthetic", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  config = _study_synthetic().get_config(arg)
  config.study.pretrain = ("ssl", "clip", "clip_ssl")
  config.study.tasks = ("mortality_12m",)
  config.study.n_train = (100, -1)
  config.study.sweep = "text_label_association=0,0.5,1;text_leak=0,0.9"
  return config
