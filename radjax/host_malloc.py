"""glibc malloc settings for radjax's own processes: every ``radjax`` command re-executes itself
once with them in ``$GLIBC_TUNABLES`` (glibc reads tunables only when a process starts).

Why: XLA:CPU allocates every buffer of a step afresh and frees it when done. glibc serves blocks
above its mmap threshold (at most 32 MiB) with a new ``mmap`` and returns them with ``munmap``, so
each step faults in, and the kernel zeroes, gigabytes of new 4 KiB pages: ≈ 0.73 M minor faults
(≈ 2.9 GB) per ViT-B/16 CLIP bfloat16 step at batch 16. With these settings big blocks come from the
heap, which keeps what it has between steps, and the heap asks for transparent huge pages (2 MiB,
where the kernel's THP mode is ``madvise``). Measured on the 2-core Intel Xeon (AMX) box
(BUILD_NOTES.md, "Host memory"): minor faults 729 k -> 1.8 k per step, 2-15 % more examples/s
(the gain varied with the box's state), peak RSS +0.1 GiB. What they do not catch: a block above
64 MiB allocated on one of XLA's worker threads comes from that thread's glibc arena, which maps it
directly whatever ``mmap_max`` says; on a Zen 3 box the step's 2.9 GB temporary buffer is such a
block, so it is still faulted in (as 2 MiB pages) and zeroed each step (BUILD_NOTES.md, "A fifth
machine"). ``glibc.malloc.arena_max=1`` would keep it but made that step slower.

Appended to ``$GLIBC_TUNABLES`` for the names it does not already set; ``RADJAX_MALLOC_DEFAULTS=0``
disables them. Linux with glibc >= 2.35 only (``glibc.malloc.hugetlb``); elsewhere nothing happens.
The cost: freed memory stays with the process, so its resident size stays at its peak.
"""

from __future__ import annotations

import os
import platform
import sys

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


def reexec_with_malloc_defaults() -> None:
  """Replaces this process by the same command with :data:`MALLOC_DEFAULTS` in
  ``$GLIBC_TUNABLES``, unless it already has them (then it returns, so it runs at most once)."""
  if os.environ.get("RADJAX_MALLOC_DEFAULTS", "1") == "0" or not _glibc_supports_hugetlb():
    return
  current = os.environ.get("GLIBC_TUNABLES", "")
  wanted = merged_tunables(current, MALLOC_DEFAULTS)
  if wanted == current:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), {**os.environ, "GLIBC_TUNABLES": wanted})
