"""Training throughput benchmark: our DeepSpeed trainer step against a plain PyTorch loop and
transformers' LlamaForCausalLM, measured in the same run.

Each configuration runs warm-up steps, then timed optimizer steps, each synchronised with the
device; tokens/s come from the median step time. Rows:

- our variants (`--variant NAME:OVERRIDES`, default one, `ours`, with the config as given):
  `Trainer.train_step` under DeepSpeed at the configured ZeRO stage;
- `plain` (unless --no-baselines): the same model, data, AdamW settings and schedule,
  gradient clipping and accumulation in a hand-written PyTorch loop, no DeepSpeed (bf16
  autocast over fp32 weights where we train in bf16);
- `hf`: transformers' `LlamaForCausalLM` of the same shape (its SDPA attention) in that loop.

Each row prints its switches (ZeRO stage, attention backend, compile, activation
checkpointing, loss), tokens/s, MFU (`pretrain/model/flops.py`, full attention, the GPU's
dense peak), measured peak memory beside `pretrain/model/memory.py`'s estimate for the same
configuration on one rank (on a GPU the allocator's peak over the timed steps; on a CPU the
peak of the allocations made while building and warming the row up, from torch.profiler's
memory events; not per row with --rounds > 1), and its ratio to plain and to hf. The last
line is `ours/hf tokens-per-s ratio: X` for the first variant.

    python tools/bench_train.py model=llama_125m trainer.seq_len=2048 trainer.micro_batch_size=8
    python tools/bench_train.py --variant "compiled:trainer.compile=true" \
        --variant "eager:model.attn_impl=eager" model=tiny --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from pretrain import dist
from pretrain.config import compose, resolve
from pretrain.config.resolve import ConfigError, RunConfig
from pretrain.data.build import build_data, document_split
from pretrain.data.source import as_batch
from pretrain.engine.deepspeed import build_engine, build_model, sequence_shard, trainer_clip
from pretrain.engine.module import DeepSpeedTrainModule
from pretrain.engine.optim import adamw_kernel, lr_scheduler, param_groups
from pretrain.model.attention import resolve_impl
from pretrain.model.family import family_of, model_fields
from pretrain.model.flops import peak_flops
from pretrain.model.llama import LlamaConfig
from pretrain.model.llama_family import LLAMA
from pretrain.model.memory import estimate_memory
from pretrain.train.run import build_module
from pretrain.train.trainer import Trainer


def timed_steps(step: Callable[[], None], steps: int, warmup: int, cuda: bool) -> list[float]:
    """Seconds of each of `steps` calls of `step` after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


@dataclass
class Row:
    """One configuration, built and ready to step: `step()` runs one optimizer step and
    records its loss; `finish(times)` turns the timed steps into the row's figures."""

    step: Callable[[], None]
    finish: Callable[[list[float]], dict[str, float]]


def estimated_gib(run: RunConfig) -> float:
    """`pretrain/model/memory.py`'s peak for the row's configuration per rank, GiB."""
    t = run.trainer
    estimate = estimate_memory(
        OmegaConf.to_object(run.model), seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
        dp=run.parallel.data, zero_stage=run.deepspeed.zero_stage, precision=run.precision,
        activation_checkpointing=t.activation_checkpointing, grad_accum=run.grad_accum,
        offload_optimizer=run.deepspeed.offload_optimizer,
        reduce_bucket_size=run.deepspeed.reduce_bucket_size, sequence=run.parallel.sequence,
    )  # fmt: skip
    return estimate.total / 2**30


def figures(run: RunConfig, times: list[float], final_loss: float) -> dict[str, float]:
    """tokens/s from the median step, MFU, peak memory (measured and estimated)."""
    cuda = run.device_type == "cuda"
    step_time = statistics.median(times)
    tokens_per_s = run.tokens_per_step / step_time
    cfg: LlamaConfig = OmegaConf.to_object(run.model)  # the Llama schema is a LlamaConfig
    model = run.as_dict["model"]  # the family's count, as the logged MFU's (MoE: active)
    count = family_of(model).flops_per_token(model_fields(model), run.trainer.seq_len)
    model_flops = (count or 0.0) * tokens_per_s
    peak = peak_flops(torch.cuda.get_device_name(), run.precision) if cuda else None
    t = run.trainer
    return {
        "zero": run.deepspeed.zero_stage,
        "compile": t.compile,
        "ac": t.activation_checkpointing,
        "loss": cfg.loss_impl,
        "optim": run.optim.impl,
        "tokens_per_s": tokens_per_s,
        "step_time_s": step_time,
        "step_time_spread": (max(times) - min(times)) / step_time,
        "tflops": model_flops / 1e12,
        "mfu": model_flops / peak if peak else float("nan"),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "est_mem_gib": estimated_gib(run),
        "final_loss": final_loss,
    }


def prepare_ours(run: RunConfig) -> Row:
    """Our trainer's optimizer step under DeepSpeed."""
    dist.seed_everything(run.trainer.seed)
    model = build_model(run, lambda expert: build_module(run, expert))
    engine = build_engine(run, model)
    data = build_data(run)
    module = DeepSpeedTrainModule(engine, trainer_clip(run), run.optim, sequence_shard(),
                                  document_split(run.as_dict["model"], data))  # fmt: skip
    trainer = Trainer(module, data, run.trainer, run.grad_accum, run.tokens_per_step)
    losses: list[float] = []

    def finish(times: list[float]) -> dict[str, float]:
        cfg: LlamaConfig = OmegaConf.to_object(run.model)
        # What stays between steps (weights, gradients, optimizer state): tools/estimate.py's
        # "states" figure, while the peak adds the activations of one micro-batch.
        cuda = run.device_type == "cuda"
        state_mem = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
        return {
            "attn": resolve_impl(cfg.attn_impl, engine.device, run.dtype),
            **figures(run, times, losses[-1]),
            "state_mem_gib": state_mem,
        }

    return Row(lambda: losses.append(trainer.train_step().loss), finish)


HF_SWITCHES = {"loss": "full", "compile": False, "ac": "none", "est_mem_gib": float("nan")}
"""The `hf` row: transformers' own model, as it is; our switches and estimate do not apply."""


def prepare_loop(run: RunConfig, kind: str) -> Row:
    """A hand-written PyTorch training loop: `plain` (our model) or `hf` (transformers')."""
    dist.seed_everything(run.trainer.seed)
    device = torch.device(run.device_type)
    if kind == "plain":
        model = build_module(run).to(device)
        loss_of = model  # (inputs, targets) -> loss, the head and loss ours use
        attn = resolve_impl(run.model.attn_impl, device, run.dtype)
    else:
        import transformers

        fields = OmegaConf.to_container(run.model, resolve=True)
        config = transformers.LlamaConfig(**LLAMA.hf.config(fields, "float32", {}))
        model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
        model = model.to(device)

        def loss_of(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            logits = model(input_ids=tokens).logits  # (B, T, V)
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

        attn = "sdpa"
    o = run.optim
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
        **adamw_kernel(o.impl),
    )  # fmt: skip
    schedule = lr_scheduler(optimizer, o, run.trainer.max_steps)  # ours: warmup + cosine
    data = build_data(run)
    amp = run.precision in ("bf16", "fp16")
    autocast = (torch.autocast(device.type, dtype=run.dtype) if amp
                else contextlib.nullcontext())  # fmt: skip
    losses: list[float] = []

    def step() -> None:
        for _ in range(run.grad_accum):
            batch = as_batch(next(data)).to(device, non_blocking=True)
            with autocast:
                loss = loss_of(batch.inputs, batch.targets)
            (loss / run.grad_accum).backward()
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # the host sync our trainer also makes each step

    def finish(times: list[float]) -> dict[str, float]:
        row = {"attn": attn, **figures(run, times, losses[-1]), "state_mem_gib": float("nan")}
        if kind == "hf":
            row.update(HF_SWITCHES)
        return row

    return Row(step, finish)


def cpu_memory(work: Callable[[], Row]) -> tuple[Row, int, int]:
    """Run `work` under torch.profiler's memory events: (its result, the peak and the final
    sum of the CPU allocations it made, in bytes). On a CPU there is no allocator counter to
    read, as torch.cuda has; this sees every tensor allocation and free of the CPU allocator."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = work()
        gc.collect()  # tensors held only by reference cycles are garbage, not kept memory
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if _is_memory(e)]
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return result, peak, live


def _is_memory(event: object) -> bool:
    try:
        return event.name() == "[memory]"
    except UnicodeDecodeError:  # seen on some profiled ops' names under torchrun; not ours
        return False


def bench(prepare: Callable[[], Row], steps: int, warmup: int, cuda: bool) -> dict[str, float]:
    """Build one row, warm it up, then time `steps` steps of it alone. On a GPU the peak
    memory is the allocator's over the timed steps; on a CPU, that of the allocations made
    while the row was built and warmed up (`cpu_memory`), where the state memory is what
    of them stayed allocated after the warm-up (weights, optimizer, engine buffers)."""
    if cuda:
        row = prepare()
        return row.finish(timed_steps(row.step, steps, warmup, cuda))

    def warmed() -> Row:
        row = prepare()
        timed_steps(row.step, 0, warmup, cuda)
        return row

    row, peak, live = cpu_memory(warmed)
    result = row.finish(timed_steps(row.step, steps, 0, cuda))
    return {**result, "peak_mem_gib": peak / 2**30, "state_mem_gib": live / 2**30}


def bench_interleaved(
    rows: list[Row], steps: int, warmup: int, rounds: int, cuda: bool
) -> list[dict[str, float]]:
    """All rows at once: warm-up each, then `rounds` rounds that time a share of the steps
    of every row in turn, so a machine whose speed drifts (a shared CPU host, clocks) slows
    every row alike. Peak memory is not per row here (all rows are resident): NaN."""
    for row in rows:
        timed_steps(row.step, 0, warmup, cuda)
    times: list[list[float]] = [[] for _ in rows]
    for r in range(rounds):
        share = steps // rounds + (r < steps % rounds)
        for row_times, row in zip(times, rows, strict=True):
            row_times += timed_steps(row.step, share, 0, cuda)
    results = [row.finish(t) for row, t in zip(rows, times, strict=True)]
    for result in results:
        result["peak_mem_gib"] = result["state_mem_gib"] = float("nan")
    return results


def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def measured(name: str, bench: Callable[[], dict], run: RunConfig) -> dict:
    """One row; a row that runs out of GPU memory says so instead of ending the benchmark."""
    try:
        return {"variant": name, **bench()}
    except torch.OutOfMemoryError:
        print(f"{name}: out of GPU memory", file=sys.stderr)
        figures = ("tokens_per_s", "step_time_s", "step_time_spread", "tflops", "mfu",
                   "peak_mem_gib", "est_mem_gib", "state_mem_gib", "final_loss")  # fmt: skip
        t = run.trainer
        return {"variant": name, "oom": True, "attn": "oom", "zero": run.deepspeed.zero_stage,
                "compile": t.compile, "ac": t.activation_checkpointing, "loss": "-",
                "optim": run.optim.impl, **dict.fromkeys(figures, float("nan"))}  # fmt: skip
    finally:
        _free(run.device_type == "cuda")  # each row starts from an empty device


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME:override override ...' -> (NAME, [overrides])."""
    name, _, overrides = text.partition(":")
    return name, overrides.split()


def resolve_row(name: str, overrides: list[str], gpu: bool | None = None) -> RunConfig:
    """The row's checked config (`gpu`: resolve as on a CUDA machine, or not; None: this
    one); a bad override exits 2 naming the row, before any row runs."""
    try:
        return resolve(compose(overrides), world_size=WORLD, cuda_available=gpu)
    except ConfigError as e:
        print(f"error: row {name!r}: {e}", file=sys.stderr)
        sys.exit(2)


def print_check(rows: list[tuple[str, RunConfig]]) -> None:
    """What `--check` prints: each row's switches, batch and estimated peak memory."""
    print(f"check: {len(rows)} rows resolve; none was built or run")
    print(f"{'row':>10} {'device':>11} {'ZeRO':>4} {'compile':>7} {'act.ckpt':>9} {'loss':>7} "
          f"{'seq x micro x accum':>19} {'est GiB':>8}")  # fmt: skip
    for name, run in rows:
        t = run.trainer
        r = {"loss": run.model.loss_impl, "compile": t.compile,
             "ac": t.activation_checkpointing, "est_mem_gib": estimated_gib(run)}  # fmt: skip
        if name == "hf":
            r.update(HF_SWITCHES)
        zero = "-" if name in ("plain", "hf") else str(run.deepspeed.zero_stage)
        batch = f"{t.seq_len} x {t.micro_batch_size} x {run.grad_accum}"
        device = f"{run.device_type} {run.precision}"
        print(f"{name:>10} {device:>11} {zero:>4} {r['compile']!s:>7} {r['ac']:>9} "
              f"{r['loss']:>7} {batch:>19} {r['est_mem_gib']:>8.2f}")  # fmt: skip


WORLD = int(os.environ.get("WORLD_SIZE", "1"))
"""Ranks: 1, or torchrun's, e.g. for parallel.sequence=2 on 2 (every row the same layout;
rank 0 prints, its own memory)."""


def ratio(a: dict, b: dict | None) -> float:
    return a["tokens_per_s"] / b["tokens_per_s"] if b else float("nan")


def print_results(results: list[dict], run: RunConfig, args: argparse.Namespace) -> None:
    """The table (and --json): a row per configuration, with its ratios to plain and hf,
    then the first row's ratios (the last lines)."""
    plain, hf = results[-2:] if not args.no_baselines else (None, None)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"device: {device} | {run.model._target_.rsplit('.', 1)[-1]} "
        f"{run.model.n_layers}x{run.model.d_model} | precision {run.precision} | "
        f"ZeRO-{run.deepspeed.zero_stage} | seq_len {run.trainer.seq_len}"
        + (
            f" over {run.parallel.sequence} ranks (parallel.sequence; rank 0's memory)"
            if run.parallel.sequence > 1
            else ""
        )
        + f" | micro batch "
        f"{run.trainer.micro_batch_size} | median of {args.steps} steps after {args.warmup}"
        + (f", in {args.rounds} interleaved rounds" if args.rounds > 1 else "")
    )
    print(
        f"{'row':>10} {'ZeRO':>4} {'attn':>6} {'compile':>7} {'act.ckpt':>9} {'loss':>7} "
        f"{'tok/s':>12} {'s/step':>8} {'spread':>7} {'TFLOP/s':>8} {'MFU':>6} "
        f"{'peak GiB':>9} {'est GiB':>8} {'/plain':>7} {'/hf':>7}"
    )
    for r in results:
        r["vs_plain"], r["vs_hf"] = ratio(r, plain), ratio(r, hf)
        zero = str(r["zero"]) if r["variant"] not in ("plain", "hf") else "-"
        mfu = "-" if math.isnan(r["mfu"]) else f"{r['mfu']:.1%}"  # no peak known (a CPU)
        print(
            f"{r['variant']:>10} {zero:>4} {r['attn']:>6} {r['compile']!s:>7} {r['ac']:>9} "
            f"{r['loss']:>7} {r['tokens_per_s']:>12,.0f} {r['step_time_s']:>8.4f} "
            f"{r['step_time_spread']:>6.0%} {r['tflops']:>8.2f} {mfu:>6} "
            f"{r['peak_mem_gib']:>9.2f} {r['est_mem_gib']:>8.2f} {r['vs_plain']:>6.2f}x "
            f"{r['vs_hf']:>6.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            record = {"device": device, "overrides": args.overrides, "steps": args.steps,
                      "warmup": args.warmup, "results": results}  # fmt: skip
            json.dump(record, f, indent=2)
    if hf is not None:
        print(f"ours/plain tokens-per-s ratio: {ratio(results[0], plain):.3f}")
        print(f"ours/hf tokens-per-s ratio: {ratio(results[0], hf):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--variant", action="append", metavar="NAME:OVERRIDES",
        help="a configuration of ours to time, e.g. 'compiled:trainer.compile=true' "
        "(repeatable; default: 'ours:', the config as given)",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="1: time each row alone, one after another. N > 1: build every row first, then "
        "time the steps in N rounds through all rows, so a drifting machine (a shared CPU "
        "host) slows each row alike; all rows must fit in memory at once, and no per-row "
        "peak memory is measured",
    )  # fmt: skip
    parser.add_argument("--no-baselines", action="store_true", help="skip plain and hf")
    parser.add_argument(
        "--check", action="store_true",
        help="resolve every row's config as on a GPU machine (trainer.device=auto: cuda, "
        "precision=auto: bf16), print what each would run (switches, batch, estimated peak "
        "memory) and exit without building a model: checks a command line anywhere before "
        "GPU time is spent on it",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides shared by every row")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or not 1 <= args.rounds <= args.steps:
        parser.error("--steps must be >= 1, --warmup >= 0 and 1 <= --rounds <= --steps")

    base = [
        "data=synthetic",  # I/O-free: the benchmark measures the model and engine
        "logger.wandb.mode=disabled",
        "trainer.global_batch_size=${trainer.micro_batch_size}",
    ]
    if WORLD > 1 and not args.no_baselines:
        parser.error("under torchrun, pass --no-baselines (the plain and hf loops are one rank's)")
    gpu = True if args.check else None
    rows: list[tuple[str, RunConfig, Callable[[], Row]]] = []  # (name, config, builder)
    for name, extra in map(parse_variant, args.variant or ["ours:"]):
        run = resolve_row(name, [*base, *args.overrides, *extra], gpu)
        rows.append((name, run, lambda r=run: prepare_ours(r)))
    if not args.no_baselines:
        run = resolve_row("plain and hf", [*base, *args.overrides], gpu)
        rows += [(k, run, lambda k=k, r=run: prepare_loop(r, k)) for k in ("plain", "hf")]
    if args.check:
        print_check([(name, r) for name, r, _ in rows])
        return
    if len({r.parallel for _, r, _ in rows}) > 1:  # DeepSpeed keeps one sequence unit
        parser.error("every row must have the same parallel.sequence (run one bench per size)")
    dist.init(run.device_type)
    dist.init_parallel(run.parallel)
    cuda = run.device_type == "cuda"
    if args.rounds == 1:
        results = [
            measured(name, lambda p=prepare: bench(p, args.steps, args.warmup, cuda), r)
            for name, r, prepare in rows
        ]
    else:
        built = [prepare() for _, _, prepare in rows]
        timed = bench_interleaved(built, args.steps, args.warmup, args.rounds, cuda)
        results = [{"variant": name, **t} for (name, _, _), t in zip(rows, timed, strict=True)]

    if dist.is_main():
        print_results(results, run, args)
    dist.finish()


if __name__ == "__main__":
    main()
