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

from pretrain.model.documents import DocumentLayout

ATTN_IMPLS = ("auto", "flash", "sdpa", "eager")


@functools.cache
def flash_attn_func():
    """flash_attn.flash_attn_func, or None when flash-attn is not installed or broken."""
    try:
        from flash_attn import flash_attn_func as fn
    except Exception:  # ImportError, or a wheel built against another torch/CUDA
        return None
    return fn


@functools.cache
def flash_attn_varlen_func():
    """flash_attn.flash_attn_varlen_func (packed sequences of different lengths), or None."""
    try:
        from flash_attn import flash_attn_varlen_func as fn
    except Exception:
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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str, dropout_p: float = 0.0,
    documents: DocumentLayout | None = None,
) -> torch.Tensor:  # fmt: skip
    """Causal attention with grouped-query support; with `documents`, the packed documents
    of the window (model/documents.py), each position attends within its own only.

    q: (B, T, H, D); k, v: (B, T, H_kv, D) with H % H_kv == 0. Returns (B, T, H, D).
    flash: flash-attn's varlen kernel over every (row, document) piece; sdpa and eager: a
    block-diagonal causal mask (SDPA picks a kernel that takes one).
    """
    impl = resolve_impl(impl, q.device, q.dtype)
    if impl == "flash":
        # flash-attn takes (B, T, H, D) and handles H_kv < H natively.
        if documents is None:
            return flash_attn_func()(q, k, v, dropout_p=dropout_p, causal=True)
        return _flash_documents(q, k, v, documents, dropout_p)
    mask = None if documents is None else documents.mask()  # (B, 1, T, T)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if impl == "sdpa":
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None,
            enable_gqa=k.size(1) != q.size(1),
        )  # fmt: skip
    else:
        y = eager_attention(q, k, v, dropout_p, mask)
    return y.transpose(1, 2)  # (B, T, H, D)


def _flash_documents(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: DocumentLayout,
    dropout_p: float,
) -> torch.Tensor:  # fmt: skip
    """flash-attn varlen: the B x T tokens as one packed batch of (row, document) pieces."""
    B, T, H, D = q.shape
    edges, longest = documents.varlen()
    y = flash_attn_varlen_func()(
        q.reshape(B * T, H, D), k.reshape(B * T, k.size(2), D), v.reshape(B * T, v.size(2), D),
        edges, edges, longest, longest, dropout_p=dropout_p, causal=True,
    )  # fmt: skip
    return y.reshape(B, T, H, D)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Reference causal attention written out in full. q: (B, H, T, D); k, v: (B, H_kv, T, D);
    `mask` (B, 1, T, T) bool, True = may attend (default: causal)."""
    groups = q.size(1) // k.size(1)
    k = k.repeat_interleave(groups, dim=1)  # (B, H, T, D)
    v = v.repeat_interleave(groups, dim=1)
    T = q.size(2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, T)
    if mask is None:
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
