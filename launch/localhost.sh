#!/usr/bin/env bash
# Several processes on this machine, the way a pod runs: NUM_PROCESSES processes of DEVICES CPU devices each,
# one jax.distributed job whose coordinator (process 0) listens on localhost:$PORT.
#
#   bash launch/localhost.sh 2 4 --config=configs/quickstart.py:runlocal --workdir=/tmp/dyngen_two_processes
#
# The arguments after the two counts go to every `python -m dyngen.main`. Process i logs to
# $LOG_DIR/process_<i>.log (default: the current directory); the script waits for all of them and, when one
# fails, stops the others and exits 1. DRY_RUN=1 prints the commands instead (tests/test_multiprocess.py
# starts exactly these). docs/multihost.md.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: bash launch/localhost.sh NUM_PROCESSES DEVICES_PER_PROCESS --config=... --workdir=... [flags]" >&2
  exit 2
fi
NUM_PROCESSES="$1"; DEVICES="$2"; shift 2
PORT="${PORT:-12355}"; PYTHON="${PYTHON:-python}"; LOG_DIR="${LOG_DIR:-.}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"

pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  command=("$PYTHON" -m dyngen.main "$@" --jax_num_cpu_devices="$DEVICES" --distributed
           --coordinator_address="localhost:$PORT" --num_processes="$NUM_PROCESSES" --process_id="$i")
  if [[ -n "${DRY_RUN:-}" ]]; then
    printf '%q ' "${command[@]}"; echo
  else
    "${command[@]}" > "$LOG_DIR/process_$i.log" 2>&1 &
    pids+=("$!")
  fi
done
for _ in "${pids[@]}"; do
  if ! wait -n; then
    kill "${pids[@]}" 2>/dev/null || true
    echo "a process failed: see $LOG_DIR/process_*.log" >&2
    exit 1
  fi
done
