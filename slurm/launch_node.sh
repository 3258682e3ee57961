#!/usr/bin/env bash
# One node's share of a run: a torchrun agent that starts one training process per GPU and
# joins the other nodes at a c10d rendezvous. No ssh, no hostfile: every node dials the
# rendezvous endpoint on the first node. slurm/pretrain.sh runs this once per node (srun);
# without Slurm, run it yourself on each of N nodes:
#
#   NNODES=2 RDZV_ENDPOINT=node0:29500 RDZV_ID=myrun bash slurm/launch_node.sh [overrides...]
#
# Environment (all optional on one node):
#   NNODES          nodes in the run (torchrun --nnodes)                [SLURM_NNODES, else 1]
#   RDZV_ENDPOINT   host:port of the rendezvous, an open port on the first node
#                                                [required with NNODES > 1; else 127.0.0.1:29500]
#   RDZV_ID         the same on every node, unique per run              [SLURM_JOB_ID, else pretrain]
#   RDZV_TIMEOUT    seconds to wait for all nodes to join               [600]
#   NPROC_PER_NODE  training processes on this node    [Slurm's GPUs on the node, else nvidia-smi's
#                                                       count, else 1 (CPU)]
#
# Exit code: the training's own (0 done, 2 bad config, 3 diverged, 4 bad data, 5 hung: some rank
# made no progress for trainer.hang_timeout_s, 75 stopped by a signal after saving its checkpoint:
# run again to resume); 124 when not every node joined in time.
# Stopping: send SIGUSR1 (or SIGTERM) to the training processes, or SIGTERM to torchrun. This
# script and torchrun ignore SIGUSR1, so a signal sent to the whole job step (Slurm's
# --signal, scancel -s USR1) reaches the training processes without killing their parents.
set -uo pipefail

nnodes=${NNODES:-${SLURM_NNODES:-1}}
if [[ "$nnodes" != 1 && -z "${RDZV_ENDPOINT:-}" ]]; then
  echo "error: NNODES=$nnodes needs RDZV_ENDPOINT=<first node's address>:<free port>, the" \
    "same on every node (slurm/pretrain.sh sets it under Slurm)" >&2
  exit 2
fi
endpoint=${RDZV_ENDPOINT:-127.0.0.1:29500}
rdzv_id=${RDZV_ID:-${SLURM_JOB_ID:-pretrain}}
join_timeout=${RDZV_TIMEOUT:-600}
nproc=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
if [[ -z "$nproc" ]]; then
  nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || nproc=1
host=$(hostname)

# torchrun starts its processes with the environment below; each default can be overridden.
# Threads per process: the node's cores shared out, so processes do not oversubscribe them.
cores=${SLURM_CPUS_ON_NODE:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(((cores / nproc) > 0 ? cores / nproc : 1))}
# A broken collective fails with a Python traceback instead of hanging until the job's time
# limit (the watchdog aborts the process group after its timeout).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# On a hang, dump every rank's last collectives (flight recorder) before aborting.
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
# NCCL prints its init (interfaces, transports, topology) once; NCCL_DEBUG=INFO for more.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# No tokenizer thread pools forked into DataLoader workers.
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

echo "[$host] torchrun: node of $nnodes x $nproc process(es), rendezvous $endpoint" \
  "(id $rdzv_id, join timeout ${join_timeout}s)" >&2

trap '' USR1  # inherited by torchrun; the training processes install their own handler
report=$(mktemp)
# Each training process also writes its exit code here (2 bad config, 3 diverged, 4 data, 5 hung,
# 75 saved and stopped): torchrun's report of the codes is lost when the first node's torchrun, which
# holds the rendezvous store, exits while this node's processes are still exiting.
export PRETRAIN_EXIT_DIR=$(mktemp -d)
torchrun \
  --nnodes="$nnodes" \
  --nproc-per-node="$nproc" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="$endpoint" \
  --rdzv-id="$rdzv_id" \
  --rdzv-conf="join_timeout=$join_timeout" \
  --max-restarts=0 \
  -m pretrain "$@" 2> >(tee "$report" >&2)
rc=$?
wait  # for tee to flush the report
if ((rc != 0)); then
  # torchrun exits 1 whatever its processes returned; its report lists their codes.
  # One code shared by all (75: stopped by a signal, checkpoint saved) is passed on.
  codes=$(grep -oE 'exitcode *: *-?[0-9]+' "$report" | grep -oE -- '-?[0-9]+$')
  written=("$PRETRAIN_EXIT_DIR"/rank*)
  if [[ -e "${written[0]}" && ${#written[@]} -eq $nproc ]]; then
    codes+=$'\n'$(cat "${written[@]}")
  fi
  codes=$(grep -v '^$' <<<"$codes" | sort -u)
  if [[ -n "$codes" ]]; then
    if [[ $(wc -l <<<"$codes") -eq 1 ]]; then
      rc=$codes
      ((rc < 0)) && rc=$((128 - rc))  # killed by signal N: 128 + N, as a shell reports it
    elif grep -qx 5 <<<"$codes"; then
      rc=5  # a rank found the job hung: the others' codes are torchrun stopping them
    fi
    if ((rc == 75)); then
      echo "[$host] the training processes stopped on a signal after saving a checkpoint" \
        "(exit 75; torchrun reports that as FAILED above): run again to resume" >&2
    fi
  elif grep -q -e RendezvousTimeoutError -e RendezvousConnectionError "$report"; then
    # No process ever ran: the nodes did not meet. (A connection error after the processes
    # ran, when the first node has gone, is harmless: their codes are handled above.)
    cat >&2 <<EOF
[$host] error: rendezvous at $endpoint failed: not all $nnodes nodes joined within ${join_timeout}s.
  Check: every node's task started (squeue -s, the job log); '${endpoint%:*}' resolves from
  every node to the first node; port ${endpoint##*:} is open between the nodes and not taken
  by another job (set RDZV_PORT); nodes that start slowly need a larger RDZV_TIMEOUT.
EOF
    rc=124
  fi
fi
rm -rf "$report" "$PRETRAIN_EXIT_DIR"
# Under slurm/pretrain.sh, a stop after a saved checkpoint is reported through a file and a
# clean exit: srun --kill-on-bad-exit would otherwise kill the other nodes' tasks while they
# finish (W&B upload) and hide the 75 behind their kill signals.
if ((rc == 75)) && [[ -d "${PRETRAIN_STATUS_DIR:-}" ]]; then
  echo 75 >"$PRETRAIN_STATUS_DIR/$host.${SLURM_PROCID:-0}"
  rc=0
fi
exit "$rc"
