#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice. Usage:
#   REPO=<git URL of dyngen> TPU_NAME=dyngen ZONE=us-central2-b ACCELERATOR=v4-64 BUCKET=gs://my-bucket \
#   CONFIG=configs/dig_xl.py:XL/2 bash launch/tpu_pod.sh [--config.batch_size=512 ...]
# Creates the slice if it does not exist, installs dyngen on every worker and starts the run on all of them.
set -euo pipefail
: "${TPU_NAME:?}" "${ZONE:?}" "${ACCELERATOR:?}" "${BUCKET:?}" "${CONFIG:?}"
: "${REPO:?set REPO to the git URL of your dyngen repository}"
RUN_NAME="${RUN_NAME:-$(basename "${CONFIG%%:*}" .py)}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
      --version="$RUNTIME"
fi

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

ssh_all "set -e; [ -d dyngen ] || git clone $REPO dyngen; cd dyngen && git pull --ff-only && \
  python3 -m pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"

# Data: tfds reads ImageNet from TFDS_DATA_DIR (prepare it once with
#   tfds build imagenet2012 --file_format=array_record --data_dir=$BUCKET/tensorflow_datasets).
ssh_all "cd dyngen && TFDS_DATA_DIR=$BUCKET/tensorflow_datasets nohup python3 -m dyngen.main \
  --config=$CONFIG --workdir=$BUCKET/$RUN_NAME --distributed $* > run.log 2>&1 &"
echo "Started. Logs: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f dyngen/run.log'"
echo "TensorBoard: tensorboard --logdir=$BUCKET/$RUN_NAME"
