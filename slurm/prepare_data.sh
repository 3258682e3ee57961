#!/usr/bin/env bash
# Usage: sbatch --array=0-(N-1) [sbatch options] slurm/prepare_data.sh \
#            --input PATH [PATH ...] --tokenizer tokenizer.json --output DIR [options]
#   e.g. sbatch --array=0-63 slurm/prepare_data.sh --input fineweb/ --tokenizer tok.json \
#            --output shards/
#
# tools/prepare_data.py as a job array: task I of N (Slurm's SLURM_ARRAY_TASK_ID and
# SLURM_ARRAY_TASK_COUNT) tokenizes its share of the input files into DIR/task-I-of-N/ with
# one worker process per CPU of the task (--cpus-per-task; --workers overrides). The
# array's first task submits the merge, a one-CPU job that starts once every task has ended
# (--dependency=afterany) and writes DIR/manifest.json with tools/prepare_data.py --merge.
# If a task failed, the merge's log names it: rerun only those, giving the array size, e.g.
#   sbatch --array=3,17 slurm/prepare_data.sh --num-tasks 64 --input ... --output DIR
# which merges again when they are done. A finished task's rerun does nothing.
# Submit from the repository root with the project's environment active (sbatch passes
# the environment on): logs go to logs/<job name>-<array job>_<task>.out there.
#SBATCH --job-name=prepare_data
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%A_%a.out

set -uo pipefail
if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  echo "error: slurm/prepare_data.sh runs as a job array: sbatch --array=0-(N-1)" \
    "slurm/prepare_data.sh --input ... --tokenizer ... --output DIR" >&2
  exit 2
fi
output=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --output) output="${args[i + 1]:-}" ;;
    --output=*) output="${args[i]#--output=}" ;;
  esac
done
if [[ -z "$output" ]]; then
  echo "error: give --output DIR (where the task directories and the manifest go)" >&2
  exit 2
fi

# sbatch runs a copy of this file; tools/ sits beside the original's directory.
script=$(scontrol show job "$SLURM_JOB_ID" | grep -oP '^\s*Command=\K\S+' | head -n 1)
repo=$(cd "$(dirname "${script:-$SLURM_SUBMIT_DIR/slurm/prepare_data.sh}")/.." && pwd)
python=$(command -v python3 || command -v python)

if [[ "$SLURM_ARRAY_TASK_ID" == "${SLURM_ARRAY_TASK_MIN:-0}" ]]; then
  merge=$(sbatch --parsable --dependency="afterany:$SLURM_ARRAY_JOB_ID" \
    --job-name="${SLURM_JOB_NAME}-merge" --nodes=1 --ntasks=1 --cpus-per-task=1 \
    --output="logs/%x-%j.out" --chdir="$PWD" \
    --wrap="$(printf '%q ' "$python" "$repo/tools/prepare_data.py" --merge "$output")")
  echo "merge: job $merge, after array job $SLURM_ARRAY_JOB_ID"
fi
exec "$python" "$repo/tools/prepare_data.py" --workers "${SLURM_CPUS_PER_TASK:-1}" "$@"
