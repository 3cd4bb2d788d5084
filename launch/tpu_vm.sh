#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it, copy this repository to every host, run the same command on all
# hosts at once (--worker=all), delete it. The workdir must be a bucket path that every host can reach
# (gs://...): checkpoints, event files, config.json and samples go there.
#
#   export PROJECT=my-project ZONE=us-central2-b TPU_NAME=cm-jax ACCELERATOR=v4-32 \
#          CONFIG=configs/digits_ict.py WORKDIR=gs://my-bucket/runs/digits_ict
#   bash launch/tpu_vm.sh create            # SPOT=1 for a preemptible (spot) slice
#   bash launch/tpu_vm.sh copy              # this checkout -> ~/cm_jax on every host, then pip install
#   bash launch/tpu_vm.sh run [--config.key=value ...]
#   bash launch/tpu_vm.sh delete
#
# Every host runs `python -m cm_jax.main`; jax.distributed.initialize() reads the slice from the TPU VM
# (cm_jax/distributed.py; CM_JAX_DISTRIBUTED=auto makes that explicit). A maintenance event or preemption
# sends SIGTERM: all hosts save a checkpoint at the same step and exit 0. `run` again resumes from it (on a
# recreated slice: `create`, `copy`, `run`).
set -euo pipefail

: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${TPU_NAME:?set TPU_NAME}"
ACCELERATOR=${ACCELERATOR:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REPO=$(cd "$(dirname "$0")/.." && pwd)

tpu() { gcloud compute tpus tpu-vm "$@" --project="$PROJECT" --zone="$ZONE"; }

case "${1:?usage: tpu_vm.sh create|copy|run|delete [--config.key=value ...]}" in
  create)
    tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ${SPOT:+--spot}
    ;;
  copy)
    archive=$(mktemp --suffix=.tar.gz)
    tar -C "$REPO" --exclude=.git --exclude=runs --exclude='*.egg-info' -czf "$archive" .
    tpu scp "$archive" "$TPU_NAME":cm_jax.tar.gz --worker=all
    tpu ssh "$TPU_NAME" --worker=all --command='rm -rf ~/cm_jax && mkdir ~/cm_jax && tar -xzf ~/cm_jax.tar.gz -C ~/cm_jax && pip install -q "jax[tpu]" gcsfs google-cloud-storage -e ~/cm_jax'
    rm -f "$archive"
    ;;
  run)
    shift
    : "${CONFIG:?set CONFIG}" "${WORKDIR:?set WORKDIR (gs://...)}"
    tpu ssh "$TPU_NAME" --worker=all --command="cd ~/cm_jax && CM_JAX_DISTRIBUTED=auto python -m cm_jax.main --config=$CONFIG --workdir=$WORKDIR $*"
    ;;
  delete)
    tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    echo "unknown command $1; expected create, copy, run or delete" >&2
    exit 2
    ;;
esac
