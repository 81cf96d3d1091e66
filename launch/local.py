#!/usr/bin/env python
"""Run one command as N cooperating JAX processes on this machine (jax.distributed).

    python launch/local.py --num_processes 2 --devices_per_process 4 -- \
        radjax train --config configs/clip_synth.py --workdir /tmp/clip2p

Every process gets the same command plus this environment, which
radjax.parallel.distributed.initialize reads (before any JAX backend is touched):
    JAX_COORDINATOR_ADDRESS = 127.0.0.1:<free port>   (process 0 hosts the coordinator)
    JAX_NUM_PROCESSES       = N
    JAX_PROCESS_ID          = 0 .. N-1
and, per platform:
    cpu: JAX_PLATFORMS=cpu, XLA_FLAGS += --xla_force_host_platform_device_count=<devices_per_process>
         (cross-process CPU collectives use gloo)
    gpu: JAX_LOCAL_DEVICE_IDS = this process's block of <devices_per_process> GPU ids
Output lines are prefixed with [pI]. If a process fails, the others are stopped and the
launcher exits with its status. SIGTERM/SIGINT sent to the launcher are forwarded to every
process (radjax checkpoints at the next step and exits 0).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(rank: int, args: argparse.Namespace, address: str) -> dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(args.num_processes),
             JAX_PROCESS_ID=str(rank))
  if args.platform == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={args.devices_per_process}")
    env["XLA_FLAGS"] = " ".join(flags)
  else:
    first = rank * args.devices_per_process
    env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(first + i) for i in range(args.devices_per_process))
  return env


def _pump(rank: int, stream, out) -> None:
  for line in iter(stream.readline, b""):
    out.write(f"[p{rank}] ".encode() + line)
    out.flush()
  stream.close()


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    print(__doc__, file=sys.stderr)
    print("error: put the command after `--`", file=sys.stderr)
    return 2
  split = argv.index("--")
  parser = argparse.ArgumentParser(description="N local jax.distributed processes")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (0 = pick a free one)")
  args = parser.parse_args(argv[:split])
  command = argv[split + 1:]
  if not command:
    parser.error("no command after `--`")
  address = f"127.0.0.1:{args.port or free_port()}"

  procs = []
  pumps = []
  for rank in range(args.num_processes):
    p = subprocess.Popen(command, env=child_env(rank, args, address),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    procs.append(p)
    t = threading.Thread(target=_pump, args=(rank, p.stdout, sys.stdout.buffer), daemon=True)
    t.start()
    pumps.append(t)

  def forward(signum, frame):  # pylint: disable=unused-argument
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)
  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)

  status = 0
  while any(p.poll() is None for p in procs):
    failed = [p for p in procs if p.poll() not in (None, 0)]
    if failed:
      status = failed[0].returncode
      for p in procs:  # a lone survivor would wait on its peers forever
        if p.poll() is None:
          p.terminate()
      deadline = time.time() + 10
      while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
      for p in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.1)
  for p in procs:
    p.wait()
  for t in pumps:
    t.join(timeout=5)
  if status == 0:
    status = next((p.returncode for p in procs if p.returncode != 0), 0)
  return 128 - status if status < 0 else status  # killed by signal N -> 128+N, like a shell


if __name__ == "__main__":
  sys.exit(main())
