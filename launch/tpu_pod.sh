#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: queued resource, env setup on every worker, one process per host.
#
#   PROJECT=my-proj ZONE=us-east5-a BUCKET=gs://my-bucket launch/tpu_pod.sh create
#   PROJECT=my-proj ZONE=us-east5-a BUCKET=gs://my-bucket launch/tpu_pod.sh setup
#   PROJECT=my-proj ZONE=us-east5-a BUCKET=gs://my-bucket launch/tpu_pod.sh train [--config.x=y ...]
#   PROJECT=my-proj ZONE=us-east5-a launch/tpu_pod.sh delete
#
# Every host runs the same command; JAX finds the other hosts itself (jax.distributed.initialize()
# without arguments on Cloud TPU). Checkpoints and TensorBoard logs go to $BUCKET/$RUN (orbax writes
# GCS paths directly); the weights and data are read from $BUCKET too (or a mounted disk).
set -euo pipefail

: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}"
NAME="${NAME:-videonsa}"
ACCELERATOR="${ACCELERATOR:-v5p-128}"             # 64 chips: configs/long128k.py:v5p
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"
CONFIG="${CONFIG:-configs/long128k.py:v5p}"
RUN="${RUN:-long128k}"
REPO="${REPO:-https://github.com/videonsa-jax/videonsa-jax.git}"  # or your fork

tpu_ssh() {
  gcloud compute tpus tpu-vm ssh "$NAME" --project="$PROJECT" --zone="$ZONE" --worker=all \
    --command="$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus queued-resources create "$NAME" --project="$PROJECT" --zone="$ZONE" \
      --node-id="$NAME" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" \
      ${SPOT:+--spot}
    echo "waiting for $NAME (gcloud compute tpus queued-resources describe $NAME shows the state)"
    until gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT" \
        --zone="$ZONE" --format='value(state.state)' | grep -q ACTIVE; do sleep 30; done
    ;;
  setup)
    tpu_ssh "set -e; python3 -m pip install -q --upgrade pip; \
      [ -d videonsa-jax ] || git clone -q $REPO videonsa-jax; \
      cd videonsa-jax && git pull -q && python3 -m pip install -q -e . 'jax[tpu]>=0.10.2,<0.12'"
    ;;
  train)
    : "${BUCKET:?set BUCKET (gs://...)}"
    shift
    tpu_ssh "cd videonsa-jax && python3 -m videonsa_jax.train --config=$CONFIG \
      --workdir=$BUCKET/$RUN --config.model.init_from=$BUCKET/Qwen2.5-VL-7B-Instruct \
      --config.data.train_jsonl=$BUCKET/data/train.jsonl --config.data.media_root=$BUCKET/data $* \
      2>&1 | tee -a ~/train.log"
    ;;
  dry_run)
    shift
    tpu_ssh "cd videonsa-jax && python3 -m videonsa_jax.train --config=$CONFIG \
      --workdir=/tmp/dry_run --dry_run=auto $*"
    ;;
  delete)
    gcloud compute tpus queued-resources delete "$NAME" --project="$PROJECT" --zone="$ZONE" \
      --force --quiet
    ;;
  *)
    echo "usage: $0 create | setup | train [flags] | dry_run [flags] | delete" >&2
    exit 2
    ;;
esac
