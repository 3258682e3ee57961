#!/usr/bin/env bash
# The GPU checks of docs/performance.md in one command, for a GPU box (run from the project root):
#
#   bash tools/bench_gpu.sh [tests] [loss] [moe] [small] [large] [zero] [accum] [long]  (default: all)
#   bash tools/bench_gpu.sh large:4096 zero                    (small/large: one seq length)
#
#   tests  the GPU-marked tests (flash == sdpa, bf16/ZeRO training against CPU, compiled blocks
#          under both checkpointing policies, the chunked loss's memory, fp16 loss scale)
#   loss   bench_loss for llama_1b's head at 16K tokens: plain, chunked, chunked + compiled
#   moe    bench_moe for one olmoe_1b_7b sparse block at 8K tokens: the experts by the
#          grouped matmul against one matmul per expert
#   small  bench_train for llama_125m at seq 2048 and 4096: default switches, compiled
#   large  bench_train for llama_1b at seq 2048 and 4096: default, compiled, compiled+selective,
#          compiled at twice the micro-batch
#   zero   llama_1b at seq 4096 under ZeRO 1, 2 and 3 (peak memory against the estimate)
#   accum  llama_1b at a pretraining batch (64K tokens a step: 8 micro-batches accumulated),
#          ZeRO-1 and ZeRO-3 compiled (and ZeRO-3 eager), against plain and transformers at
#          the same batch; the optimizer step weighs 1/8 as much per token as in `large`
#   long   llama_1b at seq 16K and 32K with parallel.sequence 1, 2 and 4 (Ulysses, under
#          torchrun; a size above the GPU count is skipped), untiled and with a tiled MLP:
#          tokens/s and each rank's peak memory against the estimate
#
# Each part writes <part>_*.txt and .json under $OUT (default ./bench-gpu). Without network,
# install carried wheels first: a ./.whl directory is installed into a temporary site dir.
# BENCH_CHECK=1 checks the command lines instead, on any machine and in seconds: each bench
# resolves its rows' configs as on a GPU and prints them with their estimated peak memory
# (`bench_train.py --check`), `tests` only collects the GPU tests, `loss` and `moe` are skipped.
# BENCH_ARGS="OVERRIDES" appends overrides (or bench_train options) to every bench, e.g.
# BENCH_ARGS="model.attn_impl=flash". The script exits with the last failed part's code.
# Every bench prints its rows against a plain PyTorch loop and transformers' Llama measured in
# the same run; the last line of each is `ours/hf tokens-per-s ratio: X`. A row that runs out
# of GPU memory prints "out of GPU memory" and nan figures; the others still run.
set -uo pipefail
OUT=${OUT:-bench-gpu}
mkdir -p "$OUT"
check=${BENCH_CHECK:+--check}
if [ -z "$check" ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests loss moe small large zero accum long)

status=0  # the last failed part's exit code: each part still runs after another fails
finished() {  # finished NAME CODE: report a part's exit code and remember a failure
  echo "== $1 (exit $2)"; [ "$2" -eq 0 ] || status=$2
}
read -r -a extra <<<"${BENCH_ARGS:-}"
bench() {  # bench NAME [bench_train args...]; RANKS=N: N processes under torchrun
  local name=$1 ranks=${RANKS:-1}; shift
  set -- "$@" ${extra[@]+"${extra[@]}"}
  if [ -n "$check" ]; then  # resolved as on N ranks, without starting them
    WORLD_SIZE=$ranks python3 tools/bench_train.py --check "$@" >"$OUT/$name.txt" 2>&1
    finished "$name" $?; cat "$OUT/$name.txt"; return
  fi
  local launch=(python3)
  [ "$ranks" -gt 1 ] && launch=(python3 -m torch.distributed.run --standalone --nproc_per_node="$ranks")
  timeout "${BENCH_TIMEOUT:-420}" "${launch[@]}" tools/bench_train.py --json "$OUT/$name.json" "$@" \
    >"$OUT/$name.txt" 2>&1
  finished "$name" $?
  grep -E "^ *(row|ours|compiled|sel|big|tiled|z[0-3]|plain|hf) |ratio|out of" "$OUT/$name.txt"
}

for spec in "${parts[@]}"; do
  part=${spec%%:*}
  seqs=(2048 4096)
  [[ $spec == *:* ]] && seqs=("${spec#*:}")
  case $part in
    tests)
      if [ -n "$check" ]; then
        python3 -m pytest -o addopts="" -m gpu -q -p no:cacheprovider --collect-only tests \
          >"$OUT/tests.txt" 2>&1
        finished tests $?; tail -n 1 "$OUT/tests.txt"; continue
      fi
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
      python3 -m pytest -o addopts="" -m gpu -q -p no:cacheprovider tests >"$OUT/tests.txt" 2>&1
      finished tests $?; tail -n 15 "$OUT/tests.txt" ;;
    loss)
      [ -n "$check" ] && { echo "== loss (not checked)"; continue; }
      timeout "${BENCH_TIMEOUT:-420}" python3 tools/bench_loss.py --model llama_1b >"$OUT/loss.txt" 2>&1
      finished loss $?; tail -n 5 "$OUT/loss.txt" ;;
    moe)
      [ -n "$check" ] && { echo "== moe (not checked)"; continue; }
      timeout "${BENCH_TIMEOUT:-420}" python3 tools/bench_moe.py --model olmoe_1b_7b >"$OUT/moe.txt" 2>&1
      finished moe $?; tail -n 4 "$OUT/moe.txt" ;;
    small)
      for seq in "${seqs[@]}"; do
        bench "small_$seq" --variant ours: --variant compiled:trainer.compile=true --steps 10 \
          model=llama_125m model.max_seq_len=$seq trainer.seq_len=$seq \
          trainer.micro_batch_size=$((32768 / seq))  # (the preset's RoPE table: 2048)
      done ;;
    large)
      for seq in "${seqs[@]}"; do
        # 8K tokens per micro-batch, where transformers' model (fp32 logits) still fits; the
        # last row doubles the micro-batch, which the chunked loss leaves room for.
        bench "large_$seq" --variant ours: --variant compiled:trainer.compile=true \
          --variant "sel:trainer.compile=true trainer.activation_checkpointing=selective" \
          --variant "big:trainer.compile=true trainer.micro_batch_size=$((16384 / seq))" \
          --steps 8 model=llama_1b trainer.seq_len=$seq trainer.micro_batch_size=$((8192 / seq))
      done ;;
    zero)
      bench zero_4096 --no-baselines --variant z1:deepspeed.zero_stage=1 \
        --variant z2:deepspeed.zero_stage=2 --variant z3:deepspeed.zero_stage=3 \
        --steps 4 --warmup 2 model=llama_1b trainer.seq_len=4096 trainer.micro_batch_size=4 ;;
    accum)
      [[ $spec == *:* ]] || seqs=(4096)  # default: seq 4096 only
      for seq in "${seqs[@]}"; do
        BENCH_TIMEOUT=${BENCH_TIMEOUT:-540} bench "accum_$seq" \
          --variant "z1:trainer.compile=true deepspeed.zero_stage=1" \
          --variant "z1big:trainer.compile=true deepspeed.zero_stage=1 trainer.micro_batch_size=$((16384 / seq))" \
          --variant "z3:trainer.compile=true deepspeed.zero_stage=3" \
          --variant "z3e:deepspeed.zero_stage=3" --steps 4 --warmup 2 model=llama_1b \
          trainer.seq_len=$seq trainer.micro_batch_size=$((8192 / seq)) \
          trainer.global_batch_size=$((65536 / seq))
      done ;;
    long)
      [[ $spec == *:* ]] || seqs=(16384 32768)
      gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
      for seq in "${seqs[@]}"; do
        for sp in 1 2 4; do
          if [ -z "$check" ] && [ "$sp" -gt "$gpus" ]; then
            echo "== long_${seq}_sp$sp (skipped: $gpus GPU(s))"; continue
          fi
          RANKS=$sp bench "long_${seq}_sp$sp" --no-baselines --variant ours: \
            --variant tiled:model.mlp_chunk_tokens=4096 --steps 4 --warmup 2 model=llama_1b \
            model.max_seq_len=$seq trainer.seq_len=$seq trainer.micro_batch_size=1 \
            parallel.sequence=$sp
        done
      done ;;
    *) echo "unknown part $spec: choose tests, loss, moe, small[:SEQ], large[:SEQ], zero, accum[:SEQ], long[:SEQ]" >&2
       exit 2 ;;
  esac
done
exit $status
