"""Subprocess entry point for the train-loop tests: trains tests/toy.py's method.

    python tests/_train_run.py --workdir W [--devices 8] [--step_delay 0.05]
        [--dump params.npz] [--config.train.steps=12 ...]

Prints one line `RESULT <json>` (process 0) with train()'s return value; on a
NonFiniteError / ConfigMismatchError prints `ERROR <Type>: <message>` and exits 3.
--devices sets the CPU device count of this process (ignored under launch/local.py,
which sets it per process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--devices", type=int, default=0)
  parser.add_argument("--step_delay", type=float, default=0.0)
  parser.add_argument("--dump", default="")
  args, overrides = parser.parse_known_args()
  if args.devices and "JAX_PROCESS_ID" not in os.environ:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import toy  # pylint: disable=import-outside-toplevel
  from radjax import config as config_lib  # pylint: disable=import-outside-toplevel
  from radjax.train import loop  # pylint: disable=import-outside-toplevel

  config = toy.toy_config()
  for key, raw in config_lib.parse_overrides(overrides):
    config_lib.apply_override(config, key, raw)
  config.lock()

  make_loader = toy.make_loader
  if args.step_delay:
    def make_loader(*a, **kw):  # slow the data so a test can kill the run mid-way
      it = toy.make_loader(*a, **kw)
      class Slow:
        def __next__(self):
          time.sleep(args.step_delay)
          return next(it)
        def get_state(self):
          return it.get_state()
        def set_state(self, s):
          it.set_state(s)
      return Slow()

  try:
    result = loop.train(config, args.workdir, method=toy.ToyMethod(), make_loader=make_loader)
  except (loop.NonFiniteError, loop.ConfigMismatchError) as e:
    print(f"ERROR {type(e).__name__}: {e}", flush=True)
    return 3

  import jax  # pylint: disable=import-outside-toplevel
  if args.dump:
    from radjax.train import checkpoint  # pylint: disable=import-outside-toplevel
    model, _ = checkpoint.load_pretrained(args.workdir, method=toy.ToyMethod())
    if jax.process_index() == 0:
      import numpy as np  # pylint: disable=import-outside-toplevel
      from flax import nnx  # pylint: disable=import-outside-toplevel
      flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
      np.savez(args.dump, **{"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in flat})
  if jax.process_index() == 0:
    from radjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    from radjax.train import state as state_lib  # pylint: disable=import-outside-toplevel
    _, abs_params, _ = state_lib.abstract_model(toy.ToyMethod(), config)
    shardings = state_lib.variable_shardings(abs_params, mesh_lib.make_mesh(config.mesh))
    result["param_specs"] = {"/".join(str(getattr(k, "key", k)) for k in path): str(s.spec)
                             for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    print("RESULT " + json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
