#!/usr/bin/env bash
# Usage: sbatch [sbatch options] slurm/pretrain.sh [hydra overrides...]
#
# One srun task per node; each task is a torchrun that starts one process per GPU and joins
# a c10d rendezvous on the first node. No ssh, no hostfile. The run dir and name derive
# from the job, so a requeued job lands in the same run dir.
#SBATCH --job-name=pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

# Processes per node: GPUs on the node unless NPROC_PER_NODE says otherwise (CPU clusters).
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=1
fi
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${RDZV_PORT:-29500}

# One OpenMP thread per process unless told otherwise: torchrun's processes share the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Fail fast with a Python traceback instead of hanging when a collective breaks.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

echo "job $SLURM_JOB_ID: $SLURM_NNODES node(s) x $NPROC_PER_NODE process(es), rendezvous $HEAD_NODE:$RDZV_PORT"

srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_NNODES" \
  --nproc-per-node="$NPROC_PER_NODE" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" \
  --rdzv-id="$SLURM_JOB_ID" \
  -m pretrain \
  run_name="${SLURM_JOB_NAME:-pretrain}-${SLURM_JOB_ID}" \
  "$@"
