"""glibc malloc settings for radjax's own processes: every ``radjax`` command re-executes itself
once with them in ``$GLIBC_TUNABLES`` (glibc reads tunables only when a process starts) and a thin
malloc layer for big blocks in ``$LD_PRELOAD``.

Why: XLA:CPU allocates every buffer of a step afresh and frees it when done. glibc serves blocks
above its mmap threshold (at most 32 MiB) with a new ``mmap`` and returns them with ``munmap``, so
each step faults in, and the kernel zeroes, gigabytes of new 4 KiB pages: ≈ 0.73 M minor faults
(≈ 2.9 GB) per ViT-B/16 CLIP bfloat16 step at batch 16. With these settings big blocks come from the
heap, which keeps what it has between steps, and the heap asks for transparent huge pages (2 MiB,
where the kernel's THP mode is ``madvise``). Measured on the 2-core Intel Xeon (AMX) box
(BUILD_NOTES.md, "Host memory"): minor faults 729 k -> 1.8 k per step, 2-15 % more examples/s
(the gain varied with the box's state), peak RSS +0.1 GiB. What they do not catch: a block above
64 MiB allocated on one of XLA's worker threads comes from that thread's glibc arena, which maps it
directly whatever ``mmap_max`` says, and XLA:CPU allocates a step's temporary buffer there (1.3 GB
for ViT-B/16 CLIP bf16 at batch 16), so it is faulted in and zeroed again each step.
``glibc.malloc.arena_max=1`` would keep it but made that step slower and larger. For those blocks
the re-executed process also preloads ``native/big_blocks.c`` (``$LD_PRELOAD``, compiled with the
C compiler on first use into ~/.cache/radjax/native), which maps each block of 64 MiB or more once
and keeps it for the next request of about its size (that file says how it bounds what it keeps):
ViT-B/16 CLIP bf16 step 953 -> 2 faults, +0-11 %; RN50 +5-10 % (BUILD_NOTES.md, stop 51). No
compiler, no preload; the tunables still apply.

Appended to ``$GLIBC_TUNABLES`` for the names it does not already set, the library put in
``$LD_PRELOAD`` unless the user set one; ``RADJAX_MALLOC_DEFAULTS=0`` disables both. Linux with
glibc >= 2.35 only (``glibc.malloc.hugetlb``); elsewhere nothing happens. The cost: freed memory
stays with the process, so its resident size stays at its peak. Child processes inherit both
variables (``bench compare`` runs open_clip with the same settings).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Callable

MALLOC_DEFAULTS: dict[str, str] = {
    "glibc.malloc.hugetlb": "1",  # madvise(MADV_HUGEPAGE) on what malloc maps
    "glibc.malloc.mmap_max": "0",  # no mmap per block: big blocks come from the heap ...
    "glibc.malloc.trim_threshold": str(64 << 30),  # ... which is not trimmed between steps
    "glibc.malloc.top_pad": str(256 << 20),  # and grows in steps of 256 MiB
}


def merged_tunables(current: str, defaults: dict[str, str]) -> str:
  """``current`` (a ``$GLIBC_TUNABLES`` value, ``name=value`` joined by ``:``) with each of
  ``defaults`` appended whose name it does not set."""
  items = [item for item in current.split(":") if item]
  named = {item.split("=", 1)[0] for item in items}
  return ":".join(items + [f"{k}={v}" for k, v in defaults.items() if k not in named])


def _glibc_supports_hugetlb() -> bool:
  if sys.platform != "linux":
    return False
  lib, version = platform.libc_ver()
  try:
    return lib == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= (2, 35)
  except ValueError:
    return False


_BIG_BLOCKS_SOURCE = os.path.join(os.path.dirname(__file__), "native", "big_blocks.c")
_C_FLAGS = ("-O2", "-shared", "-fPIC", "-std=gnu11", "-pthread", "-w")


def big_blocks_library(out_dir: str | None = None) -> str | None:
  """The path of ``native/big_blocks.c`` compiled into a shared library (built once:
  :func:`radjax.native_build.shared_library`), or None where there is no C compiler or it fails."""
  from radjax import compile_cache, native_build  # pylint: disable=import-outside-toplevel
  try:
    return native_build.shared_library(
        _BIG_BLOCKS_SOURCE, os.environ.get("CC", "cc"), _C_FLAGS,
        out_dir or os.path.join(compile_cache.user_cache_dir(), "native"))
  except (RuntimeError, OSError):
    return None


def big_blocks_loaded() -> bool:
  """Whether this process runs with ``native/big_blocks.c`` preloaded."""
  import ctypes  # pylint: disable=import-outside-toplevel
  return hasattr(ctypes.CDLL(None), "radjax_big_blocks_loaded")


def merged_preload(current: str, library: Callable[[], str | None]) -> str:
  """The ``$LD_PRELOAD`` to run with: ``current`` (the user's, or the one an earlier re-execution
  set) as it is where set, without building anything (an allocator preloaded there would shadow
  the layer's malloc anyway); else ``library()``, or "" where it gives none."""
  return current or library() or ""


def reexec_with_malloc_defaults() -> None:
  """Replaces this process by the same command with :data:`MALLOC_DEFAULTS` in
  ``$GLIBC_TUNABLES`` and :func:`big_blocks_library` in ``$LD_PRELOAD``, unless it already has
  them (then it returns, so it runs at most once)."""
  if os.environ.get("RADJAX_MALLOC_DEFAULTS", "1") == "0" or not _glibc_supports_hugetlb():
    return
  env = {"GLIBC_TUNABLES": merged_tunables(os.environ.get("GLIBC_TUNABLES", ""), MALLOC_DEFAULTS),
         "LD_PRELOAD": merged_preload(os.environ.get("LD_PRELOAD", ""), big_blocks_library)}
  if all(os.environ.get(k, "") == v for k, v in env.items()):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), {**os.environ, **{k: v for k, v in env.items() if v}})
