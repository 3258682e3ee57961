"""Transformations applied to a model from outside it, per block: activation checkpointing
and torch.compile. A family's `parallelize` (model/family.py) decides where they apply."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from pretrain.model.attention import flash_attn_func


def compile_block(block: nn.Module, zero3: bool) -> None:
    """torch.compile `block` in place (parameter names, so checkpoints, are unchanged).

    Under ZeRO-3 only its forward: the fetch and release hooks on the block (a leaf module:
    none inside it) stay eager around it. Compiled with them, dynamo traced into them and
    recompiled the block for each one (a guard on its ds_id).
    """
    if zero3:
        block.forward = torch.compile(block.forward)
    else:
        block.compile()


def checkpoint_activations(block: nn.Module, policy: str = "full") -> None:
    """Make `block` recompute activations in backward instead of keeping them.

    full: keep only the block's inputs and recompute its whole forward (one more forward's
    FLOPs, about a third more compute). selective: keep the outputs of the matmuls and of
    the attention kernel, recompute the rest (norms, RoPE, SwiGLU's pointwise product):
    almost no extra FLOPs, about half the activation memory (Korthikanti et al. 2022's
    selective recomputation, at the operator level as torchtitan's selective AC does it).

    Non-reentrant checkpointing works with ZeRO-3 (the recompute gathers parameters through
    the same module hooks) and with torch.compile (torchtitan applies it the same way).
    """
    if policy not in ("full", "selective"):
        raise ValueError(f"activation checkpointing policy {policy!r}: choose full or selective")
    forward = block.forward
    context_fn = _save_matmuls_context if policy == "selective" else None
    kwargs = {"context_fn": context_fn} if context_fn else {}

    def checkpointed(*args: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed


@functools.cache
def _saved_ops() -> frozenset:
    """The operators whose outputs selective checkpointing keeps: matmuls (the experts'
    grouped ones too) and attention."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_grouped_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu"]  # fmt: skip
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    if flash_attn_func() is not None:  # importing flash-attn >= 2.6 registers its torch ops
        flash = torch.ops.flash_attn
        for name in ("_flash_attn_forward", "_flash_attn_varlen_forward"):  # + documents
            if hasattr(flash, name):
                ops.add(getattr(flash, name).default)
    return frozenset(ops)


def _keep_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _saved_ops():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _save_matmuls_context() -> tuple[Any, Any]:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_keep_matmuls)
