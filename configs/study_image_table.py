"""The study on your own films and reports (`radjax data build --dataset image_table`), on accelerators.

radjax data build --dataset image_table --manual_dir ~/my_films --data_dir ~/tfds \
    --builder_config prognostic=mortality_1y
radjax study --config configs/study_image_table.py:vitb16 --workdir runs/mine --config.data.data_dir=~/tfds
(`:resnet50` for the CNN backbone.) The tasks are the build's label groups: "diagnostic" (the labels
not named prognostic), "prognostic", or single labels (--config.study.tasks=diagnostic,mortality_1y).
"""

import os

from radjax.config import load_config_file


def get_config(arg="vitb16"):
  # MIMIC-CXR's study (models, optimiser, schedule) on another build of films and reports.
  config = load_config_file(os.path.join(os.path.dirname(__file__), "study_mimic.py") + ":" + arg)
  config.data.dataset = "image_table"
  config.data.labels = "diagnostic"
  config.study.tasks = ("diagnostic",)
  config.study.n_train = (100, 1000, -1)
  return config
