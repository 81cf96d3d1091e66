"""Writes tests/data/open_clip_modified_resnet.npz: a small open_clip ModifiedResNet's weights,
an input and its outputs, against which tests/test_models.py checks radjax's ResNet(style="clip").

Needs torch and open_clip (not radjax's dependencies), e.g. the bench peer's environment:
    /path/to/venv_with_open_clip/bin/python scripts/open_clip_resnet_fixture.py

The model is ModifiedResNet(layers=(2, 1, 1, 1), width=4, heads=2, image_size=64, output_dim=24):
every kind of block (a first block that widens, one that does not, three that downsample) at a
size that keeps the file small. BatchNorm running statistics are randomised so that eval mode
tests them; outputs are stored for eval mode (running statistics) and train mode (batch
statistics), each as the final feature map and the attention pool's output.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                   "open_clip_modified_resnet.npz")
CONFIG = dict(layers=(2, 1, 1, 1), width=4, heads=2, image_size=64, output_dim=24)


def main() -> int:
  torch.manual_seed(0)
  model = ModifiedResNet(**CONFIG)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bn3.weight"):  # zero-initialised by open_clip: give them values
        p.normal_(1.0, 0.2)
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0.0, 0.3)
        m.running_var.uniform_(0.5, 2.0)
  weights = {f"w/{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
  x = torch.randn(3, 3, 64, 64)

  def run():
    f = model.stem(x)
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
      f = layer(f)
    return f.permute(0, 2, 3, 1).detach().numpy(), model.attnpool(f).detach().numpy()

  with torch.no_grad():
    model.eval()
    features_eval, pooled_eval = run()
    model.train()
    features_train, pooled_train = run()
  np.savez_compressed(OUT, image=x.permute(0, 2, 3, 1).numpy(), features_eval=features_eval,
                      pooled_eval=pooled_eval, features_train=features_train,
                      pooled_train=pooled_train, **weights)
  print(f"wrote {OUT} (open_clip {open_clip.__version__}, torch {torch.__version__}): "
        f"{len(weights)} weights, {os.path.getsize(OUT) / 1024:.0f} KiB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
