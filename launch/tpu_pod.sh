#!/bin/bash
# radjax on a Cloud TPU VM pod slice (v4-32, v5p-64, ...): one process per TPU VM host.
#
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b PROJECT=my-project
#   launch/tpu_pod.sh setup                         # copy this checkout to every worker, install
#   WORKDIR=/mnt/runs/clip_b16 CONFIG=configs/clip_synth.py:vitb16 \
#     launch/tpu_pod.sh train --config.train.steps=20000
#   launch/tpu_pod.sh stop                          # SIGTERM: checkpoint at the next step, exit 0
#
# Coordinator address and process ids: `gcloud compute tpus tpu-vm ssh --worker=all` runs the
# same command on every host of the slice. radjax is started with
# --config.distributed.mode=detect, so it calls jax.distributed.initialize() with no
# arguments and jax reads the slice topology from the TPU VM metadata server: worker 0's
# internal IP becomes the coordinator, the worker number (agent-worker-number) the process
# id, and the host count the number of processes. Nothing is passed by hand.
#
# WORKDIR must be visible to every worker: a Filestore/NFS mount or a gcsfuse-mounted bucket
# (checkpoints are written collectively by all hosts; metrics/TensorBoard by worker 0).
# Resuming after preemption or `stop`: run the same train command again.

set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then PROJECT_FLAG=(--project "$PROJECT"); fi
REMOTE_DIR="${REMOTE_DIR:-radjax}"  # relative to the remote home directory

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" \
    --worker=all --command "$1"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  setup)
    # Ship this checkout (tracked files at HEAD) to every worker and install it.
    tarball="$(mktemp -d)/radjax.tar.gz"
    git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$tarball" HEAD
    gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":radjax.tar.gz --zone "$ZONE" \
      "${PROJECT_FLAG[@]}" --worker=all
    on_all_workers "set -e; mkdir -p $REMOTE_DIR && tar -xzf radjax.tar.gz -C $REMOTE_DIR && \
      cd $REMOTE_DIR && python3 -m venv venv && . venv/bin/activate && pip install -U pip && \
      pip install -e . 'jax[tpu]'"
    ;;
  train)
    : "${WORKDIR:?set WORKDIR to a directory every worker sees}"
    CONFIG="${CONFIG:-configs/clip_synth.py:vitb16}"
    # Quote the overrides for the remote shell.
    extra=""
    for a in "$@"; do extra+=" $(printf '%q' "$a")"; done
    # nohup + log per worker so a dropped ssh session does not kill the run.
    on_all_workers "cd $REMOTE_DIR && . venv/bin/activate && \
      nohup radjax train --config $(printf '%q' "$CONFIG") --workdir $(printf '%q' "$WORKDIR") \
        --config.distributed.mode=detect $extra > \$HOME/radjax_train.log 2>&1 &
      echo \$! > \$HOME/radjax_train.pid; echo started on \$(hostname)"
    ;;
  logs)
    on_all_workers "tail -n ${LINES:-20} \$HOME/radjax_train.log"
    ;;
  stop)
    # SIGTERM to the process `train` started (its pid file), nothing else.
    on_all_workers "f=\$HOME/radjax_train.pid; if [ -f \$f ]; then kill -TERM \$(cat \$f) && \
      echo sent SIGTERM to \$(cat \$f) on \$(hostname); rm -f \$f; fi"
    ;;
  *)
    echo "usage: $0 setup|train|logs|stop [--config.key=value ...]" >&2
    exit 2
    ;;
esac
