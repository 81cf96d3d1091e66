"""CLIP/ConVIRT alignment pre-training on SynthCXR: configs/pretrain_synth.py's ``clip``.

radjax train --config configs/clip_synth.py --workdir /tmp/clip
radjax train --config configs/clip_synth.py:vitb16 --workdir /mnt/runs/clip_b16   (accelerators)

The argument is a comma-separated list of pretrain_synth variants (vitb16, resnet50, resnet18, tiny).
"""

import os

from radjax.config import load_config_file


def get_config(arg=None):
  variants = f",{arg}" if arg else ""
  return load_config_file(os.path.join(os.path.dirname(__file__), f"pretrain_synth.py:clip{variants}"))
