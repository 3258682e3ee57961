"""Held-out loss and perplexity: every rank scores its share, one all-reduce sums them.

The validation batches come from a fresh iterator each time (the same batches at every
evaluation, so the curve compares like with like), and the evaluation leaves the training
state as it found it: train/eval mode and the RNG streams are restored, so a run with
evaluations follows the same training curve as one without.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as tdist


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Iterator[torch.Tensor], n_batches: int, device: torch.device
) -> dict[str, float]:
    """Mean next-token loss over `n_batches` of (B, T + 1) token batches on every rank.

    `model(tokens, targets)` returns the mean loss of its batch (a DeepSpeed engine does too,
    gathering ZeRO-3 shards as it goes, which is why every rank runs the same count).
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss x tokens, tokens
    forked = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=forked):
            for _ in range(n_batches):
                batch = next(batches).to(device, non_blocking=True)  # (B, T + 1)
                targets = batch[:, 1:]
                loss = model(batch[:, :-1], targets)
                totals[0] += loss.double() * targets.numel()
                totals[1] += targets.numel()
    finally:
        model.train(was_training)
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(totals)
    loss_sum, tokens = totals.tolist()
    mean = loss_sum / tokens
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 700.0)), "val_tokens": int(tokens)}


class Evaluator:
    """What the trainer calls every `trainer.eval_every_steps`: a fresh validation stream of
    `n_batches` micro-batches per rank, scored by `evaluate`."""

    def __init__(
        self, model: torch.nn.Module, make_batches: Callable[[], Iterator[torch.Tensor]],
        n_batches: int, device: torch.device,
    ) -> None:  # fmt: skip
        self.model, self.make_batches = model, make_batches
        self.n_batches, self.device = n_batches, device

    def __call__(self) -> dict[str, float]:
        return evaluate(self.model, iter(self.make_batches()), self.n_batches, self.device)
