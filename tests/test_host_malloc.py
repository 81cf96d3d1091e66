"""radjax's glibc malloc settings: merged into $GLIBC_TUNABLES without overriding the user's, applied
by re-executing the process once, and honoured by glibc (freed big blocks are reused, not unmapped)."""

import os
import subprocess
import sys

import pytest

from radjax import host_malloc
from radjax.host_malloc import MALLOC_DEFAULTS, merged_tunables


def test_merged_tunables_appends_only_names_not_set():
  ours = ":".join(f"{k}={v}" for k, v in MALLOC_DEFAULTS.items())
  assert merged_tunables("", MALLOC_DEFAULTS) == ours
  mine = "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"
  merged = merged_tunables(mine, MALLOC_DEFAULTS)
  assert merged.startswith(mine + ":") and merged.count("glibc.malloc.hugetlb") == 1
  assert merged_tunables(merged, MALLOC_DEFAULTS) == merged  # applying twice changes nothing


# The child touches a 64 MiB block, frees it, allocates and touches one again, and prints the minor
# page faults of the second round: a block served by a fresh mmap faults in again, a reused heap
# block does not.
_CHILD = """
import ctypes, os, resource, sys
from radjax import host_malloc
host_malloc.reexec_with_malloc_defaults()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20
p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
print(os.environ.get("GLIBC_TUNABLES", ""), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not host_malloc._glibc_supports_hugetlb(), reason="needs Linux with glibc >= 2.35")
def test_reexec_applies_the_settings_once_and_glibc_reuses_big_blocks():
  clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "RADJAX_MALLOC_DEFAULTS")}

  def run(**env):
    out = subprocess.run([sys.executable, "-c", _CHILD], env={**clean, **env}, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert len(out) == 1, out  # re-executed once, not in a loop
    tunables, faults = out[0].rsplit(" ", 1)
    return tunables, int(faults)

  tunables, tuned = run()
  assert tunables == merged_tunables("", MALLOC_DEFAULTS)
  off_tunables, untuned = run(RADJAX_MALLOC_DEFAULTS="0")
  assert off_tunables == ""
  # 64 MiB faults in as >= 32 huge pages (or 16384 small ones) when mapped afresh; reused, ~none.
  assert tuned < 8 and untuned >= 32, (tuned, untuned)
  # The user's own value of a setting wins.
  kept, _ = run(GLIBC_TUNABLES="glibc.malloc.mmap_max=65536")
  assert kept.split(":")[0] == "glibc.malloc.mmap_max=65536" and kept.count("mmap_max") == 1
