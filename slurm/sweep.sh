#!/usr/bin/env bash
# Usage: sbatch --array=0-N [sbatch options] slurm/sweep.sh SWEEP_FILE [shared overrides...]
#   e.g. sbatch --array=0-3%2 -N 1 slurm/sweep.sh sweeps/lr.txt model=llama_125m
#
# A job array, one training run per line of SWEEP_FILE: array task i takes the i-th line that
# is neither blank nor a '#' comment (counting from 0), and trains with the shared overrides
# followed by that line's overrides. Each task is a full slurm/pretrain.sh run: its own run
# dir and W&B run (<job name>-<array job>_<task>), preemption and requeue included. Give
# --array=0-(lines - 1); '%K' runs at most K at a time. Group the runs in W&B with
# logger.wandb.group=NAME among the shared overrides.
#
# Example SWEEP_FILE:
#   # learning rate x warmup
#   optim.lr=3e-4 optim.warmup_steps=500
#   optim.lr=1e-3 optim.warmup_steps=500
#   optim.lr=3e-3 optim.warmup_steps=2000
#SBATCH --job-name=sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out

set -uo pipefail
sweep_file=${1:?usage: sbatch --array=0-N slurm/sweep.sh SWEEP_FILE [overrides...]}
shift
if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  echo "error: slurm/sweep.sh runs as a job array: sbatch --array=0-N slurm/sweep.sh ..." >&2
  exit 2
fi
mapfile -t lines < <(grep -vE '^[[:space:]]*(#|$)' "$sweep_file")
if ((SLURM_ARRAY_TASK_ID >= ${#lines[@]})); then
  echo "error: array task $SLURM_ARRAY_TASK_ID, but $sweep_file has ${#lines[@]} runs:" \
    "use --array=0-$((${#lines[@]} - 1))" >&2
  exit 2
fi
read -r -a overrides <<<"${lines[$SLURM_ARRAY_TASK_ID]}"
echo "sweep task $SLURM_ARRAY_TASK_ID: ${overrides[*]}"

# pretrain.sh sits beside the original of this copy; it reads the job from the environment.
script=$(scontrol show job "$SLURM_JOB_ID" | grep -oP '^\s*Command=\K\S+' | head -n 1)
exec bash "$(dirname "${script:-$SLURM_SUBMIT_DIR/slurm/sweep.sh}")/pretrain.sh" \
  "$@" "${overrides[@]}"
