"""Output-head loss benchmark: the plain loss against the chunked one, eager and compiled.

Times forward + backward of `linear_cross_entropy` (head matmul, cross-entropy, both
gradients) at a model preset's width and padded vocabulary, for `model.loss_impl=full`,
`chunked`, and `chunked` with `trainer.compile=true` (its softmax gradient fused by
torch.compile), all in one process; on CUDA also the peak memory each one adds. The last
line is `compiled/full speed ratio: X` (above 1: the compiled chunked loss is faster).

    python tools/bench_loss.py [--model llama_1b] [--tokens 16384] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_train import timed_steps  # tools/ is on sys.path when run as a script

from pretrain.config import compose
from pretrain.model.llama import LlamaConfig
from pretrain.model.loss import linear_cross_entropy

CASES = {"full": ("full", False), "chunked": ("chunked", False), "compiled": ("chunked", True)}


def time_case(name, x, weight, targets, chunk: int, steps: int) -> tuple[float, float]:
    """(median seconds per forward + backward, peak memory above the inputs in GiB)."""
    impl, compiled = CASES[name]
    cuda = x.device.type == "cuda"

    def step() -> None:
        loss = linear_cross_entropy(x, weight, targets, impl, chunk, compiled=compiled)
        loss.backward()
        x.grad = weight.grad = None

    base = torch.cuda.memory_allocated() if cuda else 0
    times = timed_steps(step, steps, warmup=2, cuda=cuda)  # warm-up includes compilation
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama_1b", help="a conf/model preset")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args(argv)
    fields = dict(compose([f"model={args.model}"]).model)
    cfg = LlamaConfig(**{k: v for k, v in fields.items() if k in LlamaConfig.__dataclass_fields__})
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(args.tokens, cfg.d_model, generator=gen)).to(args.device, dtype)
    weight = (torch.randn(cfg.padded_vocab, cfg.d_model, generator=gen) * 0.02).to(
        args.device, dtype
    )
    targets = torch.randint(0, cfg.vocab_size, (args.tokens,), generator=gen).to(args.device)
    x.requires_grad_(), weight.requires_grad_()
    print(f"{args.model} head: {args.tokens:,} tokens x d {cfg.d_model} x vocab "
          f"{cfg.padded_vocab:,} (padded), {args.dtype}, {args.device}, chunks of "
          f"{cfg.loss_chunk_tokens}")  # fmt: skip
    seconds = {}
    for name in CASES:
        seconds[name], peak = time_case(name, x, weight, targets, cfg.loss_chunk_tokens, args.steps)
        print(f"{name:>9}: {seconds[name] * 1e3:8.1f} ms  peak +{peak:.2f} GiB")
    print(f"compiled/full speed ratio: {seconds['full'] / seconds['compiled']:.2f}")


if __name__ == "__main__":
    main()
