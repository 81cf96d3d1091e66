"""Compiles radjax's native sources (``radjax/native``) into shared libraries, once per source and
toolchain: the file name carries a hash of the source and of everything that shapes the build, so
an edited source or another compiler gets a library of its own. No jax import here: ``host_malloc``
builds its library before any command imports jax."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Sequence


def shared_library(source: str, compiler: str, flags: Sequence[str], out_dir: str,
                   identity: Sequence[str] = ()) -> str:
  """The path of ``source`` compiled by ``compiler flags source -o PATH`` into ``out_dir``, built
  there unless it is already; ``identity`` adds what else the library depends on to its name.
  Raises RuntimeError, with the compiler's message, when it cannot be built."""
  with open(source, "rb") as f:
    text = f.read()
  key = hashlib.sha256(text + "\n".join((compiler, *flags, *identity)).encode()).hexdigest()[:16]
  stem = os.path.splitext(os.path.basename(source))[0]
  path = os.path.join(out_dir, f"{stem}-{key}.so")
  if os.path.exists(path):
    return path
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no compiler {compiler!r} on PATH (set $CXX, or $CC for C)")
  os.makedirs(out_dir, exist_ok=True)
  # Built under a temporary name and renamed: processes building at once each get a whole file.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  cmd = [compiler, *flags, source, "-o", tmp]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()[-2000:]}")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path
