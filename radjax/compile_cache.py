"""Compiled programs kept on disk between radjax processes: JAX's persistent compilation cache.

A resumed run, a rerun study, ``evaluate`` and ``predict`` compile the programs an earlier process
compiled already (ViT-B/16's CLIP step: about 45 s on a GPU, minutes on two CPU cores). Every
``radjax`` command therefore points JAX's cache at

    $RADJAX_COMPILATION_CACHE, else $XDG_CACHE_HOME/radjax/xla (~/.cache/radjax/xla)
    / <instruction set key>

unless ``$JAX_COMPILATION_CACHE_DIR`` already names a cache (then that one is used as it is).
``RADJAX_COMPILATION_CACHE=off`` turns it off, and so does a folder that cannot be created or
written (with one message, where JAX would warn at every compile). The per-machine subfolder
(:func:`radjax.hostcpu.instruction_set_key`) keeps a home directory shared by machines of
different CPUs from handing one machine's programs to another, which XLA would refuse and
recompile, overwriting the other's.

Only programs that took at least a second to compile are kept (JAX's default threshold), and
JAX evicts the least recently used beyond :data:`MAX_BYTES`. JAX writes an entry in place, so a
process killed in that instant leaves it cut short: JAX then warns "Error reading persistent
compilation cache entry" and compiles that program each time; deleting the folder mends it.

A compiled program holds the model's computation and the constants traced into it; radjax passes
weights and data as arguments, never as constants, so the cache holds no images or reports. JAX
treats a cache as trusted code: do not point it at a folder others can write.
"""

from __future__ import annotations

import os
import sys

from radjax import hostcpu

ENV = "RADJAX_COMPILATION_CACHE"
MAX_BYTES = 8 << 30


def user_cache_dir(environ: dict[str, str] | None = None) -> str:
  """radjax's folder in the user's cache: $XDG_CACHE_HOME/radjax, else ~/.cache/radjax."""
  environ = os.environ if environ is None else environ
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "radjax")


def cache_dir(environ: dict[str, str] | None = None) -> str | None:
  """The folder this machine's compiled programs go to, or None when ``$RADJAX_COMPILATION_CACHE``
  is "off" (or "0", "false", "none")."""
  environ = os.environ if environ is None else environ
  chosen = environ.get(ENV, "").strip()
  if chosen.lower() in ("off", "0", "false", "none"):
    return None
  if not chosen:
    chosen = os.path.join(user_cache_dir(environ), "xla")
  return os.path.join(os.path.abspath(os.path.expanduser(chosen)), hostcpu.instruction_set_key())


def enable() -> str | None:
  """Points JAX's persistent compilation cache at :func:`cache_dir` (before jax is imported,
  through the environment, so child processes share it); returns the folder in use, or None."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  path = cache_dir()
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
      raise PermissionError(f"{path} is not writable")
  except OSError as e:
    # JAX would warn on every compile; say it once and compile without the cache.
    print(f"radjax: compilation cache off: cannot use {path} ({e}); set {ENV}=DIR or {ENV}=off",
          file=sys.stderr)
    return None
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  max_bytes = int(os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(MAX_BYTES)))
  if "jax" in sys.modules:  # imported already: its config has read the environment
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_compilation_cache_max_size", max_bytes)
  return path
