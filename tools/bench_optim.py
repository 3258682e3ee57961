"""CPU AdamW benchmark: the optimizer step of ZeRO-Offload, per kernel, on this machine's CPU.

With `deepspeed.offload_optimizer=true` the fp32 master weights and Adam moments live in CPU
memory and the step runs there, on one flat partition per parameter group. This times that
step for each `optim.impl`: torch's fused and foreach AdamW, and DeepSpeedCPUAdam (cpu_adam,
JIT-built on first use, about 2 minutes). Run it on a training node's CPU to choose the
kernel there. The last line is `fused/<baseline> speed ratio: X` (the baseline is cpu_adam
when timed, else foreach); above 1, torch's fused step is faster.

    python tools/bench_optim.py [--params 124000000] [--threads N] [--impls fused cpu_adam]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

IMPLS = ("fused", "foreach", "cpu_adam")


def make_optimizer(impl: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    decay, no_decay = params
    groups = [{"params": [decay], "weight_decay": 0.1}, {"params": [no_decay], "weight_decay": 0.0}]
    kwargs = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    if impl == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=impl == "fused", foreach=impl == "foreach", **kwargs)


def time_steps(impl: str, n_params: int, steps: int) -> float:
    """Median seconds per step over `steps`, after one warm-up step that allocates the state."""
    # ZeRO's layout: one flat fp32 partition per group (matrices decay; the ~1% rest do not).
    sizes = [n_params - n_params // 100, n_params // 100]
    params = [torch.nn.Parameter(torch.randn(n) * 0.02) for n in sizes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = make_optimizer(impl, params)
    optimizer.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=124e6, help="parameters on this rank")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    args = parser.parse_args(argv)
    if "fused" not in args.impls or len(args.impls) < 2:
        parser.error("--impls: give fused and at least one baseline (foreach, cpu_adam)")
    if args.threads:
        torch.set_num_threads(args.threads)
    n_params = int(args.params)
    print(f"AdamW step on CPU: {n_params:,} fp32 parameters, {torch.get_num_threads()} threads")
    seconds = {}
    for impl in args.impls:
        seconds[impl] = time_steps(impl, n_params, args.steps)
        rate = n_params / seconds[impl] / 1e9
        print(f"{impl:>9}: {seconds[impl] * 1e3:8.1f} ms/step  {rate:6.2f} G params/s")
    baseline = "cpu_adam" if "cpu_adam" in seconds else "foreach"
    print(f"fused/{baseline} speed ratio: {seconds[baseline] / seconds['fused']:.2f}")


if __name__ == "__main__":
    main()
