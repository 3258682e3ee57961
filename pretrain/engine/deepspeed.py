"""Build the model (sharded at birth under ZeRO-3) and wrap it in a DeepSpeed engine.

DeepSpeed owns data parallelism, ZeRO, precision, gradient accumulation and clipping; the
model and the loop stay free of it. DeepSpeed is imported lazily, after the accelerator
choice is made, because importing it picks its accelerator once and for all.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from pretrain.config.resolve import RunConfig, deepspeed_config
from pretrain.engine.optim import build_optimizer, lr_scheduler

log = logging.getLogger("pretrain")


def _import_deepspeed(device_type: str) -> Any:
    # On a GPU machine told to train on CPU, DeepSpeed must not pick CUDA by itself.
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # Adopt the process group dist.init() made, so zero.Init sees the real world size.
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo")
    return deepspeed


def build_model(run: RunConfig, factory: Callable[[], nn.Module]) -> nn.Module:
    """Call `factory` under `deepspeed.zero.Init` for ZeRO-3, so no rank ever holds all weights."""
    deepspeed = _import_deepspeed(run.device_type)
    if run.deepspeed.zero_stage == 3:
        ctx = deepspeed.zero.Init(config_dict_or_path=deepspeed_config(run))
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        model = factory()
    blocks = getattr(model, "layers", None)  # the Transformer's blocks; baselines have none
    wanted = run.trainer.activation_checkpointing or run.trainer.compile
    if wanted and not isinstance(blocks, nn.ModuleList):
        log.warning(
            "trainer.compile / trainer.activation_checkpointing apply per Transformer block; "
            "%s has no `layers` blocks, so they are ignored", type(model).__name__,
        )  # fmt: skip
    if isinstance(blocks, nn.ModuleList):
        for block in blocks:
            if run.trainer.activation_checkpointing:
                checkpoint_activations(block)
            if run.trainer.compile:
                block.compile()  # in place: parameter names (and checkpoints) are unchanged
    return model


def checkpoint_activations(block: nn.Module) -> None:
    """Make `block` keep only its inputs in forward and recompute the rest in backward.

    Non-reentrant checkpointing works with ZeRO-3 (the recompute gathers parameters through
    the same module hooks) and with torch.compile (torchtitan applies it the same way).
    """
    forward = block.forward

    def checkpointed(*args: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)

    block.forward = checkpointed


def build_engine(run: RunConfig, model: nn.Module, load_universal: bool = False) -> Any:
    """deepspeed.initialize with our AdamW groups and warmup + cosine schedule.

    `load_universal`: the engine will load a universal checkpoint (another layout's).
    """
    deepspeed = _import_deepspeed(run.device_type)
    optimizer = build_optimizer(
        model, run.optim, run.device_type, offload=run.deepspeed.offload_optimizer
    )
    config = deepspeed_config(run)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: lr_scheduler(opt, run.optim, run.trainer.max_steps),
        config=config,
    )
    return engine


def grad_norm_fallback_needed(engine: Any) -> bool:
    """DeepSpeed records the global grad norm except in plain fp32 data parallel (no ZeRO)."""
    return not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled())


def local_grad_norm(model: nn.Module) -> float:
    """L2 norm of the (already all-reduced) gradients held whole on this rank."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))


class UpdateGate:
    """Skip one optimizer update on request, e.g. after a non-finite loss on some rank.

    DeepSpeed's ZeRO and bf16 wrappers (and the plain engine) all end a step by calling the
    client optimizer's `step()` on the fp32 master weights and then copying those back into
    the model; when that call does nothing, weights and Adam moments stay as they were while
    DeepSpeed's own bookkeeping (gradient zeroing, LR schedule, step counters) runs as usual.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.skip = False
        update = optimizer.step

        def gated_step(*args: Any, **kwargs: Any) -> Any:
            return None if self.skip else update(*args, **kwargs)

        # The LR scheduler wrapped step() to see that it runs first; our wrapper calls its
        # wrapper, so say so, or torch warns on every run that step() was overridden.
        if hasattr(update, "_wrapped_by_lr_sched"):
            gated_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        optimizer.step = gated_step  # an instance attribute: DeepSpeed looks it up per call
