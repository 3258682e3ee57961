"""Training throughput benchmark: tokens/s, MFU and peak memory of real DeepSpeed steps.

Runs the same model several times in one process, once per variant (a set of config
overrides), and prints each one's figures with its ratio against the last variant, the
baseline: by default `auto` attention against `eager`, the reference attention written out
in full. Timings exclude warm-up steps.

    python tools/bench_train.py model=llama_125m trainer.seq_len=2048 trainer.micro_batch_size=8
    python tools/bench_train.py --variant "compiled:trainer.compile=true" \
        --variant "sdpa:model.attn_impl=sdpa" --variant "eager:model.attn_impl=eager" model=tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from omegaconf import OmegaConf

from pretrain import dist
from pretrain.config import compose, resolve
from pretrain.config.resolve import RunConfig
from pretrain.engine.deepspeed import build_engine, build_model
from pretrain.model.attention import resolve_impl
from pretrain.model.flops import flops_per_token, peak_flops
from pretrain.model.llama import LlamaConfig
from pretrain.train.run import build_data, build_module
from pretrain.train.trainer import Trainer


def bench_one(run: RunConfig, steps: int, warmup: int) -> dict[str, float]:
    """Time `steps` optimizer steps after `warmup` untimed ones."""
    dist.seed_everything(run.trainer.seed)
    model = build_model(run, lambda: build_module(run))
    engine = build_engine(run, model)
    data = build_data(run)
    trainer = Trainer(engine, data, run.trainer, run.grad_accum, run.tokens_per_step)
    cuda = run.device_type == "cuda"
    for _ in range(warmup):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = [trainer.train_step().loss for _ in range(steps)]
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    # What stays between steps (weights, gradients, optimizer state): tools/estimate.py's
    # "states" figure, while the peak adds the activations of one micro-batch.
    state_mem = torch.cuda.memory_allocated() if cuda else float("nan")
    tokens_per_s = steps * run.tokens_per_step / elapsed
    cfg: LlamaConfig = OmegaConf.to_object(run.model)  # the Llama schema is a LlamaConfig
    model_flops = flops_per_token(cfg, run.trainer.seq_len) * tokens_per_s  # the logged MFU's
    peak = peak_flops(torch.cuda.get_device_name(), run.precision) if cuda else None
    result = {
        "attn": resolve_impl(cfg.attn_impl, engine.device, run.dtype),
        "tokens_per_s": tokens_per_s,
        "step_time_s": elapsed / steps,
        "tflops": model_flops / 1e12,
        "mfu": model_flops / peak if peak else float("nan"),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "state_mem_gib": state_mem / 2**30,
        "final_loss": losses[-1],
    }
    del trainer, engine, model, data
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


DEFAULT_VARIANTS = ["auto:model.attn_impl=auto", "eager:model.attn_impl=eager"]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME:override override ...' -> (NAME, [overrides])."""
    name, _, overrides = text.partition(":")
    return name, overrides.split()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--variant", action="append", metavar="NAME:OVERRIDES",
        help="a configuration to time, e.g. 'compiled:trainer.compile=true' (repeatable); "
        "the last one is the baseline. Default: " + " ".join(DEFAULT_VARIANTS),
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides shared by every variant")
    args = parser.parse_args()

    base = [
        "data=synthetic",  # I/O-free: the benchmark measures the model and engine
        "logger.wandb.mode=disabled",
        "trainer.global_batch_size=${trainer.micro_batch_size}",
    ]
    results = []
    for name, extra in map(parse_variant, args.variant or DEFAULT_VARIANTS):
        run = resolve(compose([*base, *args.overrides, *extra]), world_size=1)
        dist.init(run.device_type)
        results.append({"variant": name, **bench_one(run, args.steps, args.warmup)})

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    baseline = results[-1]
    print(
        f"device: {device} | precision {run.precision} | seq_len {run.trainer.seq_len} | "
        f"micro batch {run.trainer.micro_batch_size} | {args.steps} timed steps"
    )
    print(
        f"{'variant':>10} {'attn':>6} {'tok/s':>12} {'s/step':>8} {'TFLOP/s':>8} {'MFU':>6} "
        f"{'peak GiB':>9} {'x baseline':>10}"
    )
    for r in results:
        print(
            f"{r['variant']:>10} {r['attn']:>6} {r['tokens_per_s']:>12,.0f} "
            f"{r['step_time_s']:>8.4f} {r['tflops']:>8.1f} {r['mfu']:>6.1%} "
            f"{r['peak_mem_gib']:>9.2f} {r['tokens_per_s'] / baseline['tokens_per_s']:>9.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            record = {"device": device, "overrides": args.overrides, "results": results}
            json.dump(record, f, indent=2)
    dist.destroy()


if __name__ == "__main__":
    main()
