"""Size a run before asking for a cluster: parameters, FLOPs, steps, time, memory per GPU.

    python tools/estimate.py model=llama_1b trainer.seq_len=4096 \
        trainer.global_batch_tokens=4194304 trainer.micro_batch_size=2 \
        --tokens 100e9 --nodes 8 --gpus-per-node 8 --gpu H100 --mfu 0.45

The positional arguments are the Hydra overrides a training run would get, so presets,
batch geometry and their checks are the same as `python -m pretrain`'s. Pure arithmetic:
no GPU, no model is built. Memory per GPU is printed for every ZeRO stage (the configured
one marked), from `pretrain/model/memory.py`; FLOPs per token from
`pretrain/model/flops.py` (6 x matmul parameters, a mixture-of-experts model's active ones,
+ attention over the full T x T scores,
the convention of our logged MFU and of published figures; --attention-flops causal halves
the attention term).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict

from omegaconf import OmegaConf

from pretrain.config import compose, resolve
from pretrain.config.resolve import ConfigError
from pretrain.model.flops import (
    PEAK_FLOPS,
    flops_per_token,
    matmul_params,
    num_params,
    peak_flops,
)
from pretrain.model.llama import LlamaConfig
from pretrain.model.memory import GPU_MEMORY_GIB, estimate_memory
from pretrain.model.moe_model import MoEConfig
from pretrain.model.sequence import kv_heads_error

GIB = 2**30


def estimate(overrides: list[str], args: argparse.Namespace) -> dict:
    """Every figure the tool prints, as plain data."""
    gpus = args.nodes * args.gpus_per_node
    # The run's own resolve(): same presets, derived accumulation and batch checks.
    run = resolve(compose(overrides), world_size=gpus, cuda_available=True)
    model = OmegaConf.to_object(run.model)
    if not isinstance(model, LlamaConfig):
        raise ValueError("tools/estimate.py sizes Llama-style models: choose a model=llama_* "
                         "or a mixture-of-experts preset (moe_*, olmoe_1b_7b, ...)")  # fmt: skip
    seq_len, micro = run.trainer.seq_len, run.trainer.micro_batch_size
    flops = flops_per_token(model, seq_len, causal=args.attention_flops == "causal")
    peak = peak_flops(args.gpu, run.precision)  # the table bench_train.py uses, by GPU name
    if args.peak_tflops:
        peak = args.peak_tflops * 1e12
    if peak is None:
        known = sorted({gpu for gpu, _ in PEAK_FLOPS})
        raise ValueError(
            f"no peak FLOP/s for --gpu {args.gpu} in {run.precision}: "
            f"choose one of {', '.join(known)} or pass --peak-tflops"
        )
    tokens_per_s = args.mfu * peak * gpus / flops
    steps = math.ceil(args.tokens / run.tokens_per_step)
    hours = steps * run.tokens_per_step / tokens_per_s / 3600
    sp = run.parallel.sequence

    def memory_at(stage: int, sequence: int) -> dict:
        est = estimate_memory(
            model,
            seq_len=seq_len,
            micro_batch_size=micro,
            dp=gpus // sequence,
            zero_stage=stage,
            precision=run.precision,
            activation_checkpointing=run.trainer.activation_checkpointing,
            offload_optimizer=run.deepspeed.offload_optimizer and stage >= 1,
            # the same global batch over gpus / sequence data ranks
            grad_accum=max(run.trainer.global_batch_size // (micro * (gpus // sequence)), 1),
            reduce_bucket_size=run.deepspeed.reduce_bucket_size,
            sequence=sequence,
            expert=run.parallel.expert,
        )
        return {**asdict(est), "states": est.states, "total": est.total}

    memory = {stage: memory_at(stage, sp) for stage in (0, 1, 2, 3)}
    # What parallel.sequence would give, at the configured ZeRO stage: the sizes that divide
    # the GPUs, the heads and seq_len (key/value heads divide them or they divide it).
    stage = run.deepspeed.zero_stage
    sequence = {
        n: memory_at(stage, n)["total"]
        for n in (1, 2, 4, 8, 16, 32, 64)
        if gpus % n == 0
        and seq_len % n == 0
        and not kv_heads_error(model.n_heads, model.n_kv_heads, n)
    }
    return {
        "params": num_params(model),
        "matmul_params": matmul_params(model),
        "sparse": isinstance(model, MoEConfig),
        "flops_per_token": flops,
        "attention_flops": args.attention_flops,
        "precision": run.precision,
        "seq_len": seq_len,
        "micro_batch_size": micro,
        "grad_accum": run.grad_accum,
        "global_batch_size": run.trainer.global_batch_size,
        "tokens_per_step": run.tokens_per_step,
        "gpus": gpus,
        "tokens": args.tokens,
        "steps": steps,
        "peak_flops": peak,
        "mfu": args.mfu,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / gpus,
        "hours": hours,
        "gpu_hours": hours * gpus,
        "total_flops": flops * steps * run.tokens_per_step,
        "zero_stage": run.deepspeed.zero_stage,
        "gpu_memory_gib": args.gpu_mem_gib or GPU_MEMORY_GIB.get(args.gpu),
        "memory": memory,
        "sequence_parallel": sp,
        "expert_parallel": run.parallel.expert,
        "by_sequence_parallel": sequence,
    }


def report(e: dict, gpu: str) -> str:
    lines = [
        f"parameters: {e['params']:,} ({e['matmul_params']:,} in matmuls"
        + (", the top-k experts a token goes through)" if e["sparse"] else ")"),
        f"FLOPs per token: {e['flops_per_token'] / 1e9:.2f} G at seq {e['seq_len']} "
        f"(6N + {e['attention_flops']} attention), {e['total_flops']:.3g} for the whole run",
        f"batch: {e['global_batch_size']:,} sequences = {e['tokens_per_step']:,} tokens/step "
        f"(micro-batch {e['micro_batch_size']} x accumulation {e['grad_accum']} "
        f"x {e['gpus']} GPUs)",
        f"budget: {e['tokens']:.3g} tokens = {e['steps']:,} steps (trainer.max_steps={e['steps']})",
        f"speed at {e['mfu']:.0%} MFU of {e['peak_flops'] / 1e12:.0f} TFLOP/s ({gpu}, "
        f"{e['precision']}): {e['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, "
        f"{e['tokens_per_s']:,.0f} in all",
        f"time: {e['hours']:,.1f} h on {e['gpus']} GPU(s) = {e['gpu_hours']:,.0f} GPU-hours",
        "",
        f"memory per GPU (GiB) at micro-batch {e['micro_batch_size']}, "
        f"data-parallel size {e['gpus'] // e['sequence_parallel']}"
        + (f" x sequence parallel {e['sequence_parallel']}" if e["sequence_parallel"] > 1 else "")
        + (
            f", experts split over {e['expert_parallel']} (parallel.expert)"
            if e["expert_parallel"] > 1
            else ""
        )
        + "; total = weights + optim + "
        + ("grads + activ." if e["grad_accum"] > 1 else "the larger of grads and activ.")
        + ":",
        f"{'ZeRO':>6} {'weights':>8} {'grads':>8} {'optim':>8} {'activ.':>8} {'total':>8}",
    ]
    capacity = e["gpu_memory_gib"]
    for stage, m in e["memory"].items():
        mark = " <- configured" if stage == e["zero_stage"] else ""
        fits = ""
        if capacity:
            fits = "  fits" if m["total"] / GIB <= 0.9 * capacity else "  too big"
        lines.append(
            f"{stage:>6} {m['weights'] / GIB:>8.2f} {m['grads'] / GIB:>8.2f} "
            f"{m['optimizer'] / GIB:>8.2f} {m['activations'] / GIB:>8.2f} "
            f"{m['total'] / GIB:>8.2f}{fits}{mark}"
        )
    bucket = e["memory"][3]["buffers"] / GIB
    lines.append(
        f"(ZeRO-3 keeps its gradient partitions and a {bucket:.2f} GiB reduce bucket "
        "(deepspeed.reduce_bucket_size) beside the activations: its total is weights + grads + "
        "optim + bucket + activ.)"
    )  # fmt: skip
    if capacity:
        lines.append(f"('fits' leaves 10% of the {capacity:g} GiB for buffers and fragmentation)")
    lines += ["", f"with parallel.sequence=N (Ulysses; ZeRO-{e['zero_stage']}, seq "
                  f"{e['seq_len']} / N tokens per GPU):"]  # fmt: skip
    for n, total in e["by_sequence_parallel"].items():
        fits = ("  fits" if total / GIB <= 0.9 * capacity else "  too big") if capacity else ""
        mark = " <- configured" if n == e["sequence_parallel"] else ""
        lines.append(f"{n:>6} {total / GIB:>8.2f} GiB{fits}{mark}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=float, required=True, help="training token budget")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu", default="H100", help="GPU model, for peak FLOP/s and memory")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    parser.add_argument("--peak-tflops", type=float, help="overrides the GPU's dense peak")
    parser.add_argument("--gpu-mem-gib", type=float, help="overrides the GPU's memory")
    parser.add_argument("--attention-flops", choices=("full", "causal"), default="full")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m pretrain")
    args = parser.parse_args()
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu {args.mfu}: give a fraction in (0, 1], e.g. 0.4")
    try:
        figures = estimate(args.overrides, args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report(figures, args.gpu))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
