"""radjax's commands keep compiled programs on disk (JAX's persistent compilation cache), one
folder per CPU instruction set."""

import json
import os
import subprocess
import sys

from radjax import compile_cache, hostcpu

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 fma

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 fma avx512f
"""


def test_instruction_set_key_follows_the_first_processors_flags_not_their_order():
  key = hostcpu.instruction_set_key(CPUINFO)
  assert key == hostcpu.instruction_set_key(CPUINFO.replace("sse2 avx2", "avx2 sse2"))
  assert key != hostcpu.instruction_set_key(CPUINFO.replace("fpu sse2 avx2 fma\n\n", "fpu sse2 avx2 fma avx512f\n\n"))
  assert key != hostcpu.instruction_set_key(CPUINFO.replace("AMD EPYC", "Intel Xeon", 1))
  assert key == hostcpu.instruction_set_key(CPUINFO.replace("avx512f", "amx_bf16"))  # a later processor


def test_cache_dir_defaults_to_the_user_cache_and_can_be_moved_or_turned_off(tmp_path):
  key = hostcpu.instruction_set_key()
  assert compile_cache.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == str(tmp_path / "radjax" / "xla" / key)
  assert compile_cache.cache_dir({compile_cache.ENV: str(tmp_path / "mine")}) == str(tmp_path / "mine" / key)
  for off in ("off", "0", "OFF", "none"):
    assert compile_cache.cache_dir({compile_cache.ENV: off}) is None


_SCRIPT = """
import json, sys
from radjax import cli
assert cli.main(["evaluate", "--workdir", "/no/such/run"]) == 2  # a command that runs (and fails)
import jax, jax.numpy as jnp
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64))).block_until_ready()
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir, "hits": len(hits)}))
"""


def _run(env):
  out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_reads_what_the_first_compiled(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update({compile_cache.ENV: str(tmp_path / "cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
  folder = tmp_path / "cache" / hostcpu.instruction_set_key()
  first = _run(env)
  assert first == {"dir": str(folder), "hits": 0}
  assert any(name.startswith("jit_") for name in os.listdir(folder))
  second = _run(env)
  assert second["dir"] == str(folder) and second["hits"] > 0
  # Turned off: no folder, so nothing is read or written.
  env[compile_cache.ENV] = "off"
  assert _run(env) == {"dir": None, "hits": 0}
  # A folder the user chose for JAX wins.
  env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "theirs")
  assert _run(env)["dir"] == str(tmp_path / "theirs")


def test_a_folder_that_cannot_be_made_turns_the_cache_off_with_one_message(tmp_path, monkeypatch, capsys):
  (tmp_path / "a_file").write_text("")
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "a_file" / "cache"))
  assert compile_cache.enable() is None
  assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
  err = capsys.readouterr().err
  assert "compilation cache off" in err and str(tmp_path / "a_file") in err


def test_help_and_a_mistyped_command_make_no_cache_folder(tmp_path):
  env = {**os.environ, compile_cache.ENV: str(tmp_path / "cache"), "RADJAX_MALLOC_DEFAULTS": "0"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  run = lambda *args: subprocess.run([sys.executable, "-m", "radjax.cli", *args], env=env, capture_output=True,
                                     text=True, timeout=120)
  assert run("evaluate", "--help").returncode == 0
  assert run("evaluate", "--wrokdir", "x").returncode == 2
  assert not (tmp_path / "cache").exists()
  done = run("evaluate", "--workdir", str(tmp_path / "no_run"))  # a command that runs, and fails
  assert done.returncode == 2 and "no checkpoint" in done.stderr
  assert (tmp_path / "cache" / hostcpu.instruction_set_key()).is_dir()
