"""Shared helpers for tests/test_train_*.py: run tests/_train_run.py in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
RUNNER = os.path.join(TESTS, "_train_run.py")
LAUNCHER = os.path.join(REPO, "launch", "local.py")


def env() -> dict[str, str]:
  e = dict(os.environ)
  for k in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    e.pop(k, None)
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
  return e


def runner_cmd(workdir: str, *args: str, devices: int = 0, dump: str = "", delay: float = 0.0) -> list[str]:
  cmd = [sys.executable, RUNNER, "--workdir", workdir]
  if devices:
    cmd += ["--devices", str(devices)]
  if dump:
    cmd += ["--dump", dump]
  if delay:
    cmd += ["--step_delay", str(delay)]
  return cmd + list(args)


def run(cmd: list[str], timeout: float = 240) -> tuple[int, str]:
  p = subprocess.run(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
  return p.returncode, p.stdout.decode("utf-8", "replace")


def result(out: str) -> dict:
  lines = [l for l in out.splitlines() if "RESULT " in l]
  assert lines, out[-4000:]
  return json.loads(lines[-1].split("RESULT ", 1)[1])


def finished_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def start_and_signal(cmd: list[str], workdir: str, sig: int, *, after_step: int,
                     timeout: float = 240) -> tuple[int, str]:
  """Starts ``cmd``; once checkpoint ``after_step`` is finalised, sends ``sig``; waits."""
  p = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + timeout
  try:
    while time.time() < deadline and p.poll() is None:
      if any(s >= after_step for s in finished_steps(workdir)):
        p.send_signal(sig)
        break
      time.sleep(0.05)
    out, _ = p.communicate(timeout=max(deadline - time.time(), 1))
  finally:
    if p.poll() is None:
      p.kill()
  return p.returncode, out.decode("utf-8", "replace")


def load_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def train_records(workdir: str) -> dict[int, dict]:
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "train/loss" in r:
        out[r["step"]] = r
  return out


SIGKILL = signal.SIGKILL
SIGTERM = signal.SIGTERM
