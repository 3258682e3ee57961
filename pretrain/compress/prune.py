"""Magnitude pruning of a model's linear layers, and training that keeps the pruned weights
at zero.

The layers pruned are every `nn.Linear` but the output head (attention and MLP projections,
experts' when they are linear layers); embeddings and norms are not linear layers. Each
layer on its own:

- `unstructured`: the `sparsity` fraction of its weights smallest in magnitude (exactly
  that many; ties by position) become zero;
- `2:4`: in every run of 4 consecutive inputs of an output row, the 2 smallest in magnitude
  (sparsity 0.5 exactly; the pattern NVIDIA's sparse tensor cores multiply at twice the
  dense rate).

`keep_zeros(model)` (`model.keep_zeros=true`, with `model.init_from` the pruned directory)
masks the gradient of each such layer's zero weights: with no gradient ever, AdamW moves
them by nothing (its moments stay zero; decay of zero is zero), so fine-tuning recovers the
loss with the masks fixed, through the normal trainer (tools/prune.py --finetune-steps).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from pretrain.compress.shapes import linear_inputs, request_errors

PATTERNS = ("unstructured", "2:4")


def prunable(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """(name, layer) of each linear layer pruning touches: all but the output head."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            yield name, module


def errors(config: dict[str, Any], sparsity: float, pattern: str) -> list[str]:
    """Why the model of HF `config` cannot be pruned so ([] when it can)."""
    first = request_errors(config, "--pattern", pattern, PATTERNS, "pruned")
    if first:
        return first
    if pattern == "2:4":
        out = [] if sparsity == 0.5 else [f"--pattern 2:4 prunes exactly half: --sparsity "
                                          f"{sparsity} cannot be (give 0.5)"]  # fmt: skip
        odd = [f"{k}={v}" for k, v in linear_inputs(config).items() if v % 4]
        if odd:
            out.append(f"--pattern 2:4 needs inputs in runs of 4: {', '.join(odd)}")
        return out
    if not 0.0 < sparsity < 1.0:
        return [f"--sparsity {sparsity}: must be in (0, 1)"]
    return []


def mask_of(weight: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """True where `weight` (out, in) is kept."""
    magnitude = weight.detach().abs().float()
    if pattern == "2:4":
        groups = magnitude.reshape(weight.size(0), -1, 4)
        # A stable sort: of equal magnitudes, the earlier input is pruned first.
        order = groups.argsort(dim=-1, stable=True)
        keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, order[..., :2], False)
        return keep.reshape(weight.shape)
    n_prune = round(sparsity * weight.numel())
    order = magnitude.flatten().argsort(stable=True)
    keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    keep[order[:n_prune]] = False
    return keep.reshape(weight.shape)


@torch.no_grad()
def prune(model: nn.Module, sparsity: float, pattern: str) -> None:
    """Zero each prunable layer's weights by `pattern`."""
    for _, layer in prunable(model):
        layer.weight.mul_(mask_of(layer.weight, sparsity, pattern))


def sparsity_of(weights: dict[str, torch.Tensor], names: list[str]) -> dict[str, float]:
    """Zeros among the `names` weights (the pruned layers') and among all of `weights`."""
    pruned_zero = sum(int((weights[n] == 0).sum()) for n in names)
    pruned_all = sum(weights[n].numel() for n in names)
    every_zero = sum(int((w == 0).sum()) for w in weights.values())
    every_all = sum(w.numel() for w in weights.values())
    return {"linear": pruned_zero / max(pruned_all, 1), "model": every_zero / max(every_all, 1),
            "linear_params": pruned_all, "model_params": every_all}  # fmt: skip


def keep_zeros(model: nn.Module) -> int:
    """Mask the gradient of every prunable layer's zero weights (model.keep_zeros), so they
    stay zero through training; returns how many are held."""
    held = 0
    for _, layer in prunable(model):
        keep = layer.weight.detach() != 0
        if bool(keep.all()):
            continue
        held += int((~keep).sum())
        layer.weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.dtype))
    return held
