"""The output head and its cross-entropy, without the whole batch's fp32 logits.

The plain loss, `cross_entropy(lm_head(x).float(), targets)`, keeps fp32 log-probabilities
for every token and vocabulary entry until backward, which then adds their gradient and the
logits' gradient: 12 bytes per token per vocabulary entry, 25 GB for a 128K vocabulary at
16K tokens per micro-batch, more than the whole 1B model's weights and optimizer state.

`linear_cross_entropy` instead walks the tokens in chunks and, for each chunk, computes its
logits, the loss, and at once the gradient with respect to the hidden states and the head's
weight, then drops the logits. Backward only scales the two stored gradients. Peak memory
for the loss is one chunk's logits; no matmul is repeated (unlike checkpointing the head,
which recomputes it), so the FLOPs are those of the plain loss. This is the scheme of
Liger-Kernel's fused linear cross-entropy (Hsu et al. 2024) and of Apple's Cut Cross-Entropy
(Wijmans et al. 2024), here in plain torch ops so it runs, and is tested, on any device.

Numerics follow the plain path: logits in the compute dtype, softmax in fp32, gradients
cast back to the compute dtype before their matmuls; over several chunks the weight gradient
is accumulated in fp32 and cast once (with one chunk it is one matmul, as in the plain path).

Between the matmuls, eager mode runs a chunk's softmax gradient as separate pointwise
kernels over an fp32 copy of its logits (about 16 bytes of memory traffic per logit); with
`compiled=True` (trainer.compile) torch.compile fuses them into a reduction and one
pointwise kernel that read the logits in their own dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

LOSS_IMPLS = ("chunked", "full")
IGNORE_INDEX = -100  # as F.cross_entropy: targets with this id count for nothing


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    impl: str = "chunked",
    chunk_tokens: int = 2048,
    compiled: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of `x @ weight.T` against `targets`, over non-ignored targets.

    x: (..., d); weight: (V, d); targets: (...) int, IGNORE_INDEX where nothing is predicted.
    compiled: torch.compile each chunk's softmax gradient (the chunked loss, in training).
    """
    x, targets = x.flatten(0, -2), targets.flatten()  # (N, d), (N,)
    if impl == "full":  # a sum over the counted targets: 0, not NaN, when none counts
        total = F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=IGNORE_INDEX,
                                reduction="sum")  # fmt: skip
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
    if impl != "chunked":
        raise ValueError(f"model.loss_impl={impl!r}: choose one of {', '.join(LOSS_IMPLS)}")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        logit_grads = _compiled_logit_grads() if compiled else _logit_grads_in_place
        return _ChunkedLinearCrossEntropy.apply(x, weight, targets, chunk_tokens, logit_grads)
    return _chunks(x, weight, targets, chunk_tokens, None)[0]


def _logit_grads_in_place(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, n_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a chunk's summed loss, d mean loss / d its logits `x @ weight.T` in x's dtype), eagerly.

    In place on one fp32 copy of the logits, so the chunk never holds two of them.
    """
    z = F.linear(x, weight).float()  # (n, V); the compute-dtype logits are freed at once
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    valid = targets != IGNORE_INDEX
    safe = targets.masked_fill(~valid, 0)
    loss = ((lse - z.gather(1, safe[:, None]).squeeze(1)) * valid).sum()
    # softmax - one_hot(target), over the valid targets' count, zero where ignored.
    probs = z.sub_(lse[:, None]).exp_()
    probs.scatter_add_(1, safe[:, None], -valid[:, None].to(probs.dtype))
    probs.mul_((valid.to(probs.dtype) / n_valid)[:, None])
    return loss, probs.to(x.dtype)


def _logit_grads(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, n_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_logit_grads_in_place`'s math as a pure function, for torch.compile to fuse."""
    z = F.linear(x, weight).float()
    lse = torch.logsumexp(z, dim=-1)
    valid = targets != IGNORE_INDEX
    safe = targets.masked_fill(~valid, 0)
    loss = ((lse - z.gather(1, safe[:, None]).squeeze(1)) * valid).sum()
    hot = torch.arange(z.size(1), device=z.device)[None, :] == safe[:, None]
    scale = (valid.to(torch.float32) / n_valid)[:, None]
    return loss, ((torch.exp(z - lse[:, None]) - hot.to(torch.float32)) * scale).to(x.dtype)


@functools.cache
def _compiled_logit_grads() -> Any:
    # Static shapes: a run has at most two chunk sizes (the last chunk may be shorter).
    return torch.compile(_logit_grads, dynamic=False)


def _chunks(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    logit_grads: Any,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(mean loss, d loss / d x, d loss / d weight), one chunk of tokens at a time; only the
    loss when `logit_grads` (a `_logit_grads` function) is None."""
    grads = logit_grads is not None
    n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
    total = torch.zeros((), device=x.device, dtype=torch.float32)
    grad_x = torch.empty_like(x) if grads else None
    grad_w = None
    one_chunk = x.size(0) <= chunk_tokens
    if grads and not one_chunk:  # fp32 across chunks: one rounding to the weight's dtype
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
    for start in range(0, x.size(0), chunk_tokens):
        xc, tc = x[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if not grads:
            logits = F.linear(xc, weight).float()  # (n, V)
            valid = tc != IGNORE_INDEX
            picked = logits.gather(1, tc.masked_fill(~valid, 0)[:, None]).squeeze(1)
            total += ((torch.logsumexp(logits, dim=-1) - picked) * valid).sum()
            continue
        loss, g = logit_grads(xc, weight, tc, n_valid)  # g: (n, V), in x's dtype
        total += loss
        grad_x[start : start + chunk_tokens] = g @ weight  # (n, d)
        if one_chunk:
            grad_w = g.t() @ xc  # (V, d)
        elif grad_w.dtype == g.dtype:
            grad_w.addmm_(g.t(), xc)  # in place: no (V, d) temporary
        else:
            grad_w += g.t() @ xc  # each chunk's product rounded once to the compute dtype
    loss = total / n_valid
    return loss, grad_x, None if grad_w is None else grad_w.to(weight.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Gradients computed in forward, chunk by chunk; backward scales them."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        logit_grads: Any,
    ) -> torch.Tensor:
        loss, grad_x, grad_w = _chunks(x, weight, targets, chunk, logit_grads)
        # Saved like any tensor autograd keeps, so memory accounting (and the
        # saved-tensor hooks tests use to measure it) sees them.
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x, grad_w = ctx.saved_tensors
        # The loss is usually the root (grad_loss = 1, or the fp16 loss scale).
        grad_x = grad_x * grad_loss.to(grad_x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_w * grad_loss.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None, None
