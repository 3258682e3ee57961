"""AdamW parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pretrain.config.schema import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; norms, biases and embeddings do not.

    Decaying gains and biases only fights the normalisation, and decaying embeddings
    shrinks rare tokens' rows towards zero (as in GPT-NeoX, OLMo and torchtitan).
    """
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # a tied weight appears twice
            continue
        seen.add(id(p))
        # ZeRO-3 partitions parameters in place; ds_shape keeps the original shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or id(p) in embedding_params else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (1-based).

    Linear warmup to 1 over `warmup_steps`, then cosine decay to `min_lr_ratio` at `max_steps`.
    """
    if step <= warmup_steps:
        return step / warmup_steps
    if step >= max_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_warnings(cfg: OptimConfig, max_steps: int) -> list[str]:
    """What makes this schedule other than intended, in words with the numbers and the fix.

    A warning, not a config error: a smoke test or a debugging run (`trainer.max_steps=3`
    under the default warmup) is a valid run, and refusing it would make every short run
    restate the schedule. Said at start, before any step, and in the run summary.
    """
    warmup = cfg.warmup_steps
    if warmup < max_steps:
        return []
    peak = lr_factor(max_steps, warmup, max_steps, cfg.min_lr_ratio)
    where = (
        "reaches optim.lr only at the last step"
        if warmup == max_steps
        else f"never reaches optim.lr={cfg.lr:g} (it ends at {peak * cfg.lr:.3g}, {peak:.0%} of it)"
    )
    return [
        f"optim.warmup_steps={warmup} >= trainer.max_steps={max_steps}: the learning rate "
        f"rises for the whole run, {where}, and the cosine decay never starts. Set "
        f"optim.warmup_steps below {max_steps} (a tenth of the run is usual: "
        f"optim.warmup_steps={max(max_steps // 10, 1)}), or raise trainer.max_steps"
    ]


def lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR counts the steps already taken from 0; our steps are numbered from 1."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda taken: lr_factor(taken + 1, cfg.warmup_steps, max_steps, cfg.min_lr_ratio),
    )


def adamw_kernel(impl: str) -> dict[str, bool]:
    """torch.optim.AdamW's kernel arguments for optim.impl (auto: fused, on CPU too: 4.2x
    faster than foreach for 124M fp32 parameters on 2 cores, docs/performance.md)."""
    if impl == "auto":
        impl = "fused"
    return {"fused": impl == "fused", "foreach": impl == "foreach"}


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, split: Callable[[list[dict]], list[dict]] | None = None
) -> torch.optim.Optimizer:  # fmt: skip
    """torch's AdamW with the optim.impl kernel, or DeepSpeedCPUAdam (optim.impl=cpu_adam).
    `split`: rearranges the parameter groups (the engine's, e.g. experts apart).

    With optimizer state offloaded (ZeRO-Offload), DeepSpeed steps this optimizer on the CPU
    copies. torch's fused AdamW needs no compiler and no JIT build, and stepped 124M fp32
    parameters 1.1-1.8x faster than DeepSpeedCPUAdam on this project's 2-core CI machine
    (tools/bench_optim.py, docs/performance.md); DeepSpeedCPUAdam is JIT-built on first use
    (about 2 minutes there).
    """
    groups = param_groups(model, cfg.weight_decay)
    if split is not None:
        groups = split(groups)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.impl == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **adamw_kernel(cfg.impl), **kwargs)


def keep_kernel_after_load(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """After a checkpoint's param groups replaced the optimizer's own: this run's kernel.

    A loaded group keeps the saved run's settings, kernel flags included, so a run resumed
    with another optim.impl would silently keep the old kernel (a checkpoint saved under
    DeepSpeedCPUAdam even drops torch's to its slow default), and DeepSpeedCPUAdam fails on
    groups saved by torch's AdamW, which lack its `bias_correction`.
    """
    kernel = {} if cfg.impl == "cpu_adam" else adamw_kernel(cfg.impl)
    for group in optimizer.param_groups:
        group.update(kernel)
        for key, value in optimizer.defaults.items():
            group.setdefault(key, value)
