#!/usr/bin/env bash
# Usage: sbatch [sbatch options] slurm/pretrain.sh [hydra overrides...]
#   e.g. sbatch -N 4 --time=48:00:00 slurm/pretrain.sh experiment=llama_1b_h100x8
#
# One srun task per node; each runs slurm/launch_node.sh: a torchrun that starts one process
# per GPU and joins a c10d rendezvous on the first node. No ssh, no hostfile. Any #SBATCH
# line below can be overridden on the sbatch command line. Submit from the repository root
# with the project's environment active (sbatch passes the environment on): the log goes to
# logs/<job name>-<job id>.out there.
#
# The run is named <job name>-<job id> (run dir runs/<that>, W&B run id the same), so a
# requeued job resumes its own run from its newest checkpoint and continues its W&B run.
# Pass run_name=... (or run_dir=..., logger.wandb.id=...) to choose them yourself.
#
# Preemption: Slurm sends SIGUSR1 to the training processes 120 s before the time limit
# (--signal), or when asked (scancel -s USR1 --full JOBID). They finish the step, save a
# checkpoint and exit 75; this script then requeues the job (scontrol requeue), which
# starts again from that checkpoint. `scontrol requeue JOBID` (SIGTERM, then a restart)
# and a preempting partition work too: the SIGTERM also saves, within Slurm's KillWait.
# A hang (a rank with no progress for trainer.hang_timeout_s: exit 5) is requeued the same
# way, resuming from the newest checkpoint; MAX_REQUEUES bounds both.
#
# Environment: NPROC_PER_NODE (processes per node; default the GPUs on the node, else 1),
# RDZV_PORT (rendezvous port on the first node; default derived from the job id),
# RDZV_TIMEOUT (seconds for all nodes to join; default 600), MAX_REQUEUES (default 20).
#SBATCH --job-name=pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -uo pipefail
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "error: slurm/pretrain.sh is a batch script: sbatch [options] slurm/pretrain.sh" \
    "[overrides]. Without Slurm use slurm/launch_node.sh on each node (docs/cluster.md)." >&2
  exit 2
fi

# sbatch runs a copy of this file; launch_node.sh sits beside the original.
script=$(scontrol show job "$SLURM_JOB_ID" | grep -oP '^\s*Command=\K\S+' | head -n 1)
here=$(dirname "${script:-$SLURM_SUBMIT_DIR/slurm/pretrain.sh}")
if [[ ! -f "$here/launch_node.sh" ]]; then
  echo "error: $here/launch_node.sh not found: submit slurm/pretrain.sh from the repository" >&2
  exit 2
fi

# The rendezvous lives on the first node, at the address Slurm reaches it by.
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
head_addr=$(scontrol show node "$head_node" | grep -oP 'NodeAddr=\K\S+' || echo "$head_node")
# A port per job, so jobs sharing a node do not collide, below Linux's ephemeral range
# (32768-60999), where any outgoing connection may hold it; RDZV_PORT picks it by hand.
export RDZV_ENDPOINT="$head_addr:${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 12000))}"
export RDZV_ID="$SLURM_JOB_ID"

# Array tasks (slurm/sweep.sh) are named like their log files: <name>-<array job>_<task>.
job=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
run_name=$(tr -c 'A-Za-z0-9_.\n-' '_' <<<"${SLURM_JOB_NAME:-pretrain}-${job:-$SLURM_JOB_ID}")
restarts=${SLURM_RESTART_COUNT:-0}

# The batch shell itself gets SIGUSR1 from `scancel -s USR1 --full`: note it, don't die.
trap 'echo "SIGUSR1: the training processes save a checkpoint and stop"' USR1
# SIGTERM comes with `scontrol requeue`, scancel and preemption: Slurm requeues (or ends) the
# job itself. Waiting for srun keeps the job alive while the processes save.
trap 'terminated=1' TERM
terminated=0

echo "job $SLURM_JOB_ID (start $((restarts + 1))): $SLURM_NNODES node(s), run $run_name," \
  "rendezvous $RDZV_ENDPOINT, $(date -u +%FT%TZ)"
# Node-local: the first node's task, the one beside this shell, reports a stop here.
export PRETRAIN_STATUS_DIR=$(mktemp -d)
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash "$here/launch_node.sh" \
  run_name="$run_name" logger.wandb.id="$run_name" "$@"
rc=$?
if ((rc == 0)) && grep -qx 75 "$PRETRAIN_STATUS_DIR"/* 2>/dev/null; then
  rc=75
fi
rm -rf "$PRETRAIN_STATUS_DIR"

if ((terminated)); then
  # srun stops relaying output once Slurm tears the step down, so the save is not logged.
  echo "job $SLURM_JOB_ID: SIGTERM (requeue, preemption or cancel): the training processes" \
    "saved a checkpoint if they had time (KillWait); Slurm requeues or ends the job"
elif ((rc == 75 || rc == 5)); then
  if ((restarts < ${MAX_REQUEUES:-20})); then
    why="stopped by a signal, checkpoint saved"
    ((rc == 5)) && why="a rank hung (trainer.hang_timeout_s): resuming from the newest checkpoint"
    echo "job $SLURM_JOB_ID: $why; requeueing"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "error: scontrol requeue $SLURM_JOB_ID failed; submit the same command to resume" >&2
  else
    echo "job $SLURM_JOB_ID: requeued $restarts times already (MAX_REQUEUES); not again" >&2
  fi
fi
echo "job $SLURM_JOB_ID: exit $rc, $(date -u +%FT%TZ)"
exit "$rc"
