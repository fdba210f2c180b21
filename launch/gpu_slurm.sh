#!/usr/bin/env bash
# Train on a SLURM GPU cluster, one process per GPU (8 per node here; change --ntasks-per-node with the GPUs).
#
#   sbatch --nodes=4 launch/gpu_slurm.sh configs/dit_xl.py:XL/2 /shared/runs/dit_xl_2 \
#       --config.data.latent_dir=/shared/latents --config.latent.vae=/shared/sd-vae-ft-ema
#
# jax.distributed.initialize() reads the SLURM environment: the coordinator is the first node, each task is one
# process and sees the GPU of its SLURM_LOCALID. Arguments after the workdir are --config overrides; rerunning
# the job resumes from the newest checkpoint. DRY_RUN=1 bash launch/gpu_slurm.sh ... prints the srun command.
# Install once per cluster into a shared venv:  python -m venv venv && venv/bin/pip install -e . 'jax[cuda12]'
#SBATCH --job-name=dyngen
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --exclusive
#SBATCH --output=dyngen-%j.log
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: sbatch [--nodes=N] launch/gpu_slurm.sh CONFIG WORKDIR [--config.<field>=<value> ...]" >&2
  exit 2
fi
CONFIG="$1"; WORKDIR="$2"; shift 2
PYTHON="${PYTHON:-venv/bin/python}"
command=(srun --kill-on-bad-exit=1 "$PYTHON" -m dyngen.main --config="$CONFIG" --workdir="$WORKDIR" --distributed
         --config.model.dtype=bfloat16 "$@")
if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "${command[@]}"; echo; else "${command[@]}"; fi
