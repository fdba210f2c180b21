#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice, one process per worker (host), obtained as a queued resource.
#
#   REPO=<git URL of your dyngen> TPU_NAME=dyngen ZONE=us-central2-b ACCELERATOR=v4-64 BUCKET=gs://my-bucket \
#   CONFIG=configs/dit_xl.py:XL/2 bash launch/tpu_pod.sh \
#       --config.data.latent_dir=gs://my-bucket/latents --config.latent.vae=gs://my-bucket/sd-vae-ft-ema
#
# Requests the slice (gcloud compute tpus queued-resources create) unless it exists, waits until it is ACTIVE,
# installs dyngen on every worker and starts `python3 -m dyngen.main --distributed` on all of them at once; the
# run writes to $BUCKET/$RUN_NAME and rerunning this script resumes it. Arguments are --config overrides.
# DRY_RUN=1 prints every command instead of running it (nothing is created or started).
set -euo pipefail
: "${TPU_NAME:?}" "${ZONE:?}" "${ACCELERATOR:?}" "${BUCKET:?}" "${CONFIG:?}"
: "${REPO:?set REPO to the git URL of your dyngen repository}"
RUN_NAME="${RUN_NAME:-$(basename "${CONFIG%%:*}" .py)}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-$TPU_NAME}"

run() {  # The command, or with DRY_RUN=1 its exact text.
  if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

if [[ -n "${DRY_RUN:-}" ]] || ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" >/dev/null 2>&1; then
  run gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id="$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME"
  if [[ -z "${DRY_RUN:-}" ]]; then
    until [[ "$(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" --zone="$ZONE" \
                --format='value(state.state)')" == ACTIVE ]]; do
      echo "Waiting for the queued resource $QUEUED_RESOURCE to become ACTIVE..."; sleep 60
    done
  fi
fi

ssh_all "set -e; [ -d dyngen ] || git clone $REPO dyngen; cd dyngen && git pull --ff-only && \
python3 -m pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"

# Every worker runs the same command; jax.distributed.initialize() finds the others on a TPU VM by itself.
overrides=""
for flag in "$@"; do overrides+=" $(printf '%q' "$flag")"; done
ssh_all "cd dyngen && nohup python3 -m dyngen.main --config=$CONFIG --workdir=$BUCKET/$RUN_NAME --distributed\
$overrides > run.log 2>&1 &"
if [[ -z "${DRY_RUN:-}" ]]; then
  echo "Started. Logs: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 \
--command='tail -f dyngen/run.log'"
  echo "TensorBoard: tensorboard --logdir=$BUCKET/$RUN_NAME"
fi
