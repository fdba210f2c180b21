#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one task per node, every GPU of the node visible to it.
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh configs/dit_xl.py:XL/2 /shared/runs/dit_xl_2 [overrides]
#SBATCH --job-name=dyngen
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=dyngen-%j.log
set -euo pipefail
CONFIG="$1"; WORKDIR="$2"; shift 2
# Install once per cluster into a shared venv:  python -m venv venv && venv/bin/pip install -e . 'jax[cuda12]'
# jax.distributed.initialize() reads the SLURM environment (coordinator = first node).
srun --kill-on-bad-exit=1 venv/bin/python -m dyngen.main --config="$CONFIG" --workdir="$WORKDIR" --distributed \
  --config.model.dtype=bfloat16 "$@"
