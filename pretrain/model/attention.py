"""Attention backends: flash-attn, torch SDPA, and an eager reference.

Kernel libraries are imported lazily so the model imports (and runs) on a CPU-only machine.
`attn_impl="auto"` picks flash-attn when it imports and the tensors live on a GPU it
supports (Ampere or newer, fp16/bf16), and torch SDPA otherwise.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

ATTN_IMPLS = ("auto", "flash", "sdpa", "eager")


@functools.cache
def flash_attn_func():
    """flash_attn.flash_attn_func, or None when flash-attn is not installed or broken."""
    try:
        from flash_attn import flash_attn_func as fn
    except Exception:  # ImportError, or a wheel built against another torch/CUDA
        return None
    return fn


def flash_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True when flash-attn is installed and can run on tensors of this device and dtype."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if flash_attn_func() is None:
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_impl(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that `requested` means for tensors on `device` with `dtype`."""
    if requested not in ATTN_IMPLS:
        raise ValueError(f"model.attn_impl={requested!r}: choose one of {', '.join(ATTN_IMPLS)}")
    if requested == "auto":
        return "flash" if flash_supported(device, dtype) else "sdpa"
    if requested == "flash" and not flash_supported(device, dtype):
        raise RuntimeError(
            "model.attn_impl=flash needs flash-attn (pip install '.[gpu]') and a CUDA GPU of "
            "compute capability >= 8.0 with fp16/bf16 tensors; "
            f"got device={device}, dtype={dtype}. "
            "Use model.attn_impl=auto to fall back to torch SDPA."
        )
    return requested


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str, dropout_p: float = 0.0
) -> torch.Tensor:
    """Causal attention with grouped-query support.

    q: (B, T, H, D); k, v: (B, T, H_kv, D) with H % H_kv == 0. Returns (B, T, H, D).
    """
    impl = resolve_impl(impl, q.device, q.dtype)
    if impl == "flash":
        # flash-attn takes (B, T, H, D) and handles H_kv < H natively.
        return flash_attn_func()(q, k, v, dropout_p=dropout_p, causal=True)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if impl == "sdpa":
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=k.size(1) != q.size(1)
        )
    else:
        y = eager_attention(q, k, v, dropout_p)
    return y.transpose(1, 2)  # (B, T, H, D)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """Reference causal attention written out in full. q: (B, H, T, D); k, v: (B, H_kv, T, D)."""
    groups = q.size(1) // k.size(1)
    k = k.repeat_interleave(groups, dim=1)  # (B, H, T, D)
    v = v.repeat_interleave(groups, dim=1)
    T = q.size(2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, T)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = F.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v  # (B, H, T, D)


def cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention of new queries over cached keys (generation), with an explicit mask.

    q: (B, T, H, D); k, v: (B, S, H_kv, D); mask: (B, 1, T, S) bool, True = may attend.
    Returns (B, T, H, D). SDPA picks its kernel for the mask (no flash: it takes no mask).
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T|S, D)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.size(1) != q.size(1))
    return y.transpose(1, 2)  # (B, T, H, D)
