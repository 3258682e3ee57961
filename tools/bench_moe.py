"""Mixture-of-experts benchmark: the experts run by torch's grouped matmul against one
matmul per expert (`model.experts_impl=grouped_mm` vs `loop`).

Times forward + backward of one sparse block (router, dispatch by expert, the experts'
SwiGLUs, the weighted combine) at a model preset's shape, in one process, the two ways
taking turns; on CUDA also the peak memory each one adds. The last line is
`grouped_mm/loop speed ratio: X` (above 1: the grouped matmul is faster).

    python tools/bench_moe.py [--model olmoe_1b_7b] [--tokens 8192] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_train import timed_steps  # tools/ is on sys.path when run as a script

from pretrain.config import compose
from pretrain.model.moe import MoE, grouped_mm_fits
from pretrain.model.moe_model import moe_config

IMPLS = ("loop", "grouped_mm")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="olmoe_1b_7b", help="a conf/model MoE preset")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per way (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args(argv)
    cfg = moe_config(dict(compose([f"model={args.model}"]).model))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    block = MoE(cfg.d_model, cfg.moe_ffn_hidden, cfg.n_experts, cfg.top_k, cfg.norm_topk_prob,
                std=cfg.init_std).to(args.device, dtype)  # fmt: skip
    x = torch.randn(1, args.tokens, cfg.d_model, device=args.device, dtype=dtype)
    x.requires_grad_()
    if not grouped_mm_fits(x, cfg.d_model, cfg.moe_ffn_hidden):
        raise SystemExit(f"the grouped matmul does not run here ({args.device}, {args.dtype})")
    cuda = x.device.type == "cuda"

    def step() -> None:
        block(x).square().mean().backward()
        x.grad = None
        block.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    peaks: dict[str, float] = {}
    for _ in range(args.steps):  # the two ways take turns, so drift hits both alike
        for impl in IMPLS:
            block.experts.impl = impl
            base = torch.cuda.memory_allocated() if cuda else 0
            times[impl] += timed_steps(step, 1, warmup=1, cuda=cuda)  # resets the peak
            if cuda:
                peaks[impl] = (torch.cuda.max_memory_allocated() - base) / 2**30
    print(f"{args.model} sparse block: {args.tokens} tokens x d {cfg.d_model}, "
          f"{cfg.n_experts} experts of width {cfg.moe_ffn_hidden}, top {cfg.top_k}, "
          f"{args.dtype} on {args.device}")  # fmt: skip
    median = {impl: statistics.median(t) for impl, t in times.items()}
    for impl in IMPLS:
        peak = f", peak +{peaks[impl]:.2f} GiB" if impl in peaks else ""
        print(f"{impl:>10}: {median[impl] * 1e3:8.1f} ms per forward + backward{peak}")
    print(f"grouped_mm/loop speed ratio: {median['loop'] / median['grouped_mm']:.2f}")


if __name__ == "__main__":
    main()
