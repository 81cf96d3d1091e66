"""CLIP/ConVIRT alignment pre-training on SynthCXR.

radjax train --config configs/clip_synth.py --workdir /tmp/clip
radjax train --config configs/clip_synth.py:vitb16 --workdir gs://...   (accelerators)
"""

from radjax import defaults


def get_config(arg=None):
  config = defaults.pretrain_config()
  config.method.name = "clip"
  if arg == "vitb16":
    config.data.image_size = 224
    config.data.synth.image_size = 224
    config.model.image.update(dict(variant="b", patch_size=16))
    config.model.dtype = "bfloat16"
    config.train.batch_size = 256
  return config
