"""radjax's glibc malloc settings: merged into $GLIBC_TUNABLES without overriding the user's, applied
by re-executing the process once, and honoured by glibc (freed big blocks are reused, not unmapped);
and native/big_blocks.c, preloaded with them, which keeps the big blocks glibc would unmap."""

import json
import os
import subprocess
import sys

import pytest

from radjax import host_malloc
from radjax.host_malloc import MALLOC_DEFAULTS, merged_preload, merged_tunables

needs_glibc = pytest.mark.skipif(not host_malloc._glibc_supports_hugetlb(),
                                 reason="needs Linux with glibc >= 2.35")


def test_merged_tunables_appends_only_names_not_set():
  ours = ":".join(f"{k}={v}" for k, v in MALLOC_DEFAULTS.items())
  assert merged_tunables("", MALLOC_DEFAULTS) == ours
  mine = "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"
  merged = merged_tunables(mine, MALLOC_DEFAULTS)
  assert merged.startswith(mine + ":") and merged.count("glibc.malloc.hugetlb") == 1
  assert merged_tunables(merged, MALLOC_DEFAULTS) == merged  # applying twice changes nothing


def test_merged_preload_leaves_the_users_own_alone():
  ours = lambda: "/c/big.so"
  unbuilt = lambda: pytest.fail("the layer was built although a preload was set already")
  assert merged_preload("", ours) == "/c/big.so"
  assert merged_preload("/c/big.so", unbuilt) == "/c/big.so"
  assert merged_preload("/x/tcmalloc.so", unbuilt) == "/x/tcmalloc.so"
  assert merged_preload("", lambda: None) == ""  # no compiler: no preload


# The child touches a block, frees it, allocates and touches one again, and prints the minor page
# faults of the second round: a block served by a fresh mmap faults in again, a reused one does not.
# 48 MiB on the main thread comes from glibc's heap (the tunables); 96 MiB on a thread of its own,
# as XLA:CPU allocates a step's temporary buffer, comes from that thread's arena, which maps it
# afresh whatever the tunables say, unless big_blocks.c keeps it.
_CHILD = """
import ctypes, json, os, resource, sys, threading
from radjax import host_malloc
host_malloc.reexec_with_malloc_defaults()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = {}
def second_round_faults(name, n):
  p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
  faults[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
second_round_faults("heap", 48 << 20)
thread = threading.Thread(target=second_round_faults, args=("thread", 96 << 20))
thread.start(); thread.join()
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""),
                  "preload": os.environ.get("LD_PRELOAD", ""), **faults}))
"""


@needs_glibc
def test_reexec_applies_the_settings_once_and_big_blocks_are_reused(tmp_path):
  clean = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "RADJAX_MALLOC_DEFAULTS")}

  def run(**env):
    out = subprocess.run([sys.executable, "-c", _CHILD], env={**clean, **env}, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert len(out) == 1, out  # re-executed once, not in a loop
    return json.loads(out[0])

  tuned = run()
  library = host_malloc.big_blocks_library()
  assert library is not None, "no C compiler: big_blocks.c was not built"
  assert tuned["tunables"] == merged_tunables("", MALLOC_DEFAULTS) and tuned["preload"] == library
  untuned = run(RADJAX_MALLOC_DEFAULTS="0")
  assert untuned["tunables"] == "" and untuned["preload"] == ""
  # A fresh mapping faults in as >= 24 huge pages (or thousands of small ones); a reused one, ~none.
  assert tuned["heap"] < 8 and untuned["heap"] >= 24, (tuned, untuned)
  assert tuned["thread"] < 8 and untuned["thread"] >= 48, (tuned, untuned)
  # Without the preload, only the thread's block is mapped afresh each time.
  tunables_only = run(CC=str(tmp_path / "no-cc"), XDG_CACHE_HOME=str(tmp_path))
  assert tunables_only["preload"] == "", tunables_only
  assert tunables_only["heap"] < 8 and tunables_only["thread"] >= 48, tunables_only
  # The user's own value of a setting wins.
  kept = run(GLIBC_TUNABLES="glibc.malloc.mmap_max=65536")
  assert kept["tunables"].split(":")[0] == "glibc.malloc.mmap_max=65536"
  assert kept["tunables"].count("mmap_max") == 1


# What the preloaded layer does with each entry point, in a child that loads it with LD_PRELOAD.
_LAYER_CHILD = """
import ctypes, json, threading, time
libc = ctypes.CDLL(None)
for name, restype, argtypes in (
    ("malloc", ctypes.c_void_p, [ctypes.c_size_t]), ("free", None, [ctypes.c_void_p]),
    ("calloc", ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]),
    ("realloc", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
    ("aligned_alloc", ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]),
    ("posix_memalign", ctypes.c_int, [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]),
    ("malloc_usable_size", ctypes.c_size_t, [ctypes.c_void_p])):
  getattr(libc, name).restype = restype
  getattr(libc, name).argtypes = argtypes
MiB = 1 << 20
def mapped(p):  # whether a mapping of this process starts at p
  with open("/proc/self/maps") as f:
    return any(int(line.split("-")[0], 16) == p for line in f)
out = {"loaded": hasattr(libc, "radjax_big_blocks_loaded")}
p = libc.malloc(100 * MiB); ctypes.memset(p, 7, 100 * MiB); libc.free(p)
q = libc.malloc(90 * MiB)  # fits the kept block (at most a quarter larger)
out["reused"] = q == p
out["usable"] = libc.malloc_usable_size(q)
libc.free(q)
r = libc.malloc(200 * MiB)  # fits nothing kept: the kept block is given back first
out["given_back"] = not mapped(p) and r != p
ctypes.memmove(r, b"radjax", 6)
s = libc.realloc(r, 300 * MiB)
t = libc.realloc(s, 10)  # shrunk below the threshold: back to glibc, contents kept
out["realloc"] = [ctypes.string_at(s, 6).decode(), ctypes.string_at(t, 6).decode()]
out["small_usable"] = libc.malloc_usable_size(t)
libc.free(t)
z = libc.calloc(1, 100 * MiB)
out["calloc_zero"] = ctypes.string_at(z + 50 * MiB, 64) == bytes(64)
libc.free(z)
a = libc.aligned_alloc(64, 80 * MiB)
holder = ctypes.c_void_p()
out["aligned"] = [a % 4096, libc.posix_memalign(ctypes.byref(holder), 4096, 70 * MiB),
                  holder.value % 4096, libc.posix_memalign(ctypes.byref(holder), 24, 10)]
libc.free(a)
# A request while its block is still held waits for it (freed 20 ms later by another thread) ...
held = libc.malloc(100 * MiB)
releaser = threading.Timer(0.02, libc.free, args=(held,))
releaser.start()
waited = libc.malloc(100 * MiB)
releaser.join()
out["waited_for_it"] = waited == held
# ... but not forever: held on, a second request maps a second block after at most 50 ms.
start = time.perf_counter()
second = libc.malloc(100 * MiB)
out["second"] = [second != waited, time.perf_counter() - start]
libc.free(second); libc.free(waited)
print(json.dumps(out))
"""


@needs_glibc
def test_big_blocks_layer_keeps_reuses_and_gives_back(tmp_path):
  library = host_malloc.big_blocks_library(out_dir=str(tmp_path))
  assert library is not None, "no C compiler: big_blocks.c was not built"
  env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
  done = subprocess.run([sys.executable, "-c", _LAYER_CHILD], env={**env, "LD_PRELOAD": library},
                        capture_output=True, text=True, check=True)
  out = json.loads(done.stdout)
  assert out["loaded"] and out["reused"] and out["given_back"], out
  assert out["usable"] == 100 << 20, out  # the block as mapped: 100 MiB in 2 MiB granules
  assert out["realloc"] == ["radjax", "radjax"] and out["small_usable"] < 1 << 20, out
  assert out["calloc_zero"], out
  assert out["aligned"] == [0, 0, 0, 22], out  # EINVAL for an alignment not a power of two
  assert out["waited_for_it"], out
  assert out["second"][0] and out["second"][1] < 1.0, out
