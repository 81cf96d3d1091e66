"""open_clip's CLIP training step, timed like ``radjax bench step`` (run by ``radjax bench compare``).

    python -m radjax.bench.peer_open_clip --model ViT-B-16 --batch 16 --dtype bfloat16 --json

What runs per step (open_clip_train/train.py ``train_one_epoch`` without the data loader):
``torch.autocast(bfloat16)`` (bfloat16 mode) around ``model(images, texts)`` and ``ClipLoss``,
``loss.backward()``, ``AdamW.step()`` (open_clip's param groups: no weight decay on gains,
biases, embeddings and the logit scale), and the logit-scale clamp to ln(100). Parameters and
optimizer state stay float32, as in radjax. Data: random images [B, 3, 224, 224] float32 and
token ids [B, 77] with SOT 49406, random tokens, EOT 49407 (argmax pooling), zero padding.

Imports only torch and open_clip (never jax), so it can run in a separate environment.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from typing import Any, Sequence

from radjax.hostcpu import host_cpus


def run(model_name: str, *, batch: int, dtype: str, steps: int, warmup: int, repeats: int,
        threads: int | None = None, seed: int = 0) -> dict[str, Any]:
  import numpy as np  # pylint: disable=import-outside-toplevel
  import open_clip  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  threads = threads or host_cpus()
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  t_start = time.perf_counter()
  model = open_clip.create_model(model_name, device="cpu")
  model.train()
  loss_fn = open_clip.ClipLoss()
  # open_clip_train/main.py's param groups.
  exclude = lambda n, p: (p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "embedding" in n
                          or "logit_scale" in n)
  named = list(model.named_parameters())
  decay = [p for n, p in named if not exclude(n, p) and p.requires_grad]
  no_decay = [p for n, p in named if exclude(n, p) and p.requires_grad]
  opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                           {"params": decay, "weight_decay": 0.2}],
                          lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
  image_size = model.visual.image_size
  image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
  context = int(model.context_length)
  vocab = int(model.vocab_size)
  rng = np.random.default_rng(seed)

  def make_batch():
    images = torch.from_numpy(rng.standard_normal((batch, 3, image_size, image_size),
                                                  dtype=np.float32))
    lengths = rng.integers(5, context + 1, size=batch)
    ids = rng.integers(1, vocab - 2, size=(batch, context))
    ids[:, 0] = vocab - 2
    ids[np.arange(batch), lengths - 1] = vocab - 1
    ids = ids * (np.arange(context)[None] < lengths[:, None])
    return images, torch.from_numpy(ids.astype(np.int64))

  autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16"
              else torch.autocast("cpu", enabled=False))

  def train_step(images, texts):
    with autocast:
      image_features, text_features, logit_scale = model(images, texts)
      loss = loss_fn(image_features, text_features, logit_scale)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, math.log(100))
    return loss

  n_params = sum(p.numel() for p in model.parameters())
  t_init = time.perf_counter()

  # FLOPs of one training step (forward + backward), counted by torch.
  flops_train = None
  try:
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
    counter = FlopCounterMode(display=False)
    images, texts = make_batch()
    with counter:
      train_step(images, texts)
    flops_train = counter.get_total_flops() / batch
  except Exception:  # pylint: disable=broad-except
    pass

  # Two batches drawn once and alternated, as radjax's bench step does.
  pool = [make_batch() for _ in range(2)]
  for i in range(warmup):
    train_step(*pool[i % len(pool)])
  per_repeat = []
  loss = None
  for _ in range(repeats):
    data_s = 0.0
    t0 = time.perf_counter()
    for i in range(steps):
      td = time.perf_counter()
      images, texts = pool[i % len(pool)]
      data_s += time.perf_counter() - td
      loss = train_step(images, texts)
    wall = time.perf_counter() - t0
    per_repeat.append({"wall_s": wall, "data_s": data_s, "examples_per_s": batch * steps / wall})
  eps = [r["examples_per_s"] for r in per_repeat]
  mid = sorted(per_repeat, key=lambda r: r["examples_per_s"])[len(per_repeat) // 2]
  med = statistics.median(eps)
  return {
      "peer": "open_clip", "model": model_name, "open_clip_version": open_clip.__version__,
      "torch_version": torch.__version__, "threads": threads, "dtype": dtype, "batch": batch,
      "steps": steps, "warmup": warmup, "repeats": repeats, "num_params": int(n_params),
      "examples_per_s": med, "examples_per_s_all": eps,
      "step_time_s": mid["wall_s"] / steps, "data_wait_s": mid["data_s"] / steps,
      "flops_per_example": flops_train,
      "achieved_flops_per_s": flops_train * med if flops_train else None,
      "host_peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
      "init_s": t_init - t_start, "final_loss": float(loss.detach()) if loss is not None else None,
  }


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="ViT-B-16")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = the CPUs this process may use")
  p.add_argument("--json", action="store_true")
  a = p.parse_args(argv)
  r = run(a.model, batch=a.batch, dtype=a.dtype, steps=a.steps, warmup=a.warmup,
          repeats=a.repeats, threads=a.threads or None)
  if a.json:
    print(json.dumps(r, sort_keys=True))
  else:
    print(f"open_clip {r['model']} {r['dtype']} batch {r['batch']} ({r['threads']} threads): "
          f"{r['examples_per_s']:.2f} examples/s, step {1e3 * r['step_time_s']:.0f} ms, "
          f"{(r['flops_per_example'] or 0) / 1e9:.1f} GFLOP/example (torch FlopCounterMode)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
