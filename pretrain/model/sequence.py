"""DeepSpeed-Ulysses sequence parallelism (Jacobs et al. 2023), applied from outside a model.

A group of N ranks trains on the same sequences, each holding T / N consecutive positions
of them (`SequenceShard.slice`). Everything but attention is per position, so it runs on
the slice as it is. Around attention, one all-to-all trades the sequence split for a head
split: each rank gets the whole sequence for H / N of the heads, attends as a single
process would, and a second all-to-all trades back. The backward of an all-to-all is the
reverse all-to-all, so gradients flow to the ranks that own each position.

Grouped-query attention: with N dividing the key/value heads, they split like the query
heads (a rank's query heads use exactly the key/value heads it receives). With fewer
key/value heads than N (N a multiple of them), each is repeated N / H_kv times before the
exchange, so every rank receives the one its query heads use: more bytes moved, the same
result (DeepSpeed's ALST does the same).

The loss of a group is the token-weighted mean over all its ranks' positions; each rank's
share is its own tokens' loss sum over the group's token count (`SequenceShard.share`),
so summing the shares over the group's ranks, as DeepSpeed's gradient reduction does, gives
the group's gradient (DeepSpeed divides the sums by the data-parallel size; ZeRO-3 by every
rank, which engine/module.py makes up for).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed._functional_collectives import all_to_all_single_autograd


@dataclass(frozen=True)
class SequenceShard:
    """This rank's place in its sequence-parallel group (`pretrain.dist.sequence_shard()`)."""

    group: Any
    """The group's process group (its ranks hold consecutive slices, in rank order)."""
    size: int
    rank: int
    """This rank's index in the group: it holds positions [rank, rank + 1) x T / size."""

    def slice(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's positions of `x` (B, T, ...): (B, T / size, ...)."""
        local = x.size(1) // self.size
        return x[:, self.rank * local : (self.rank + 1) * local]

    def positions(self, local: int, device: torch.device) -> torch.Tensor:
        """The global positions (local,) of this rank's slice of `local` tokens (RoPE)."""
        return torch.arange(self.rank * local, (self.rank + 1) * local, device=device)

    def share(self, mean: torch.Tensor, targets: torch.Tensor, local: torch.Tensor
              ) -> torch.Tensor:  # fmt: skip
        """This rank's share of the group's token-weighted mean loss: `mean` over its own
        targets `local`, weighted by their count over the count of the group's `targets`
        (the whole sequences, which every rank of the group has). -100 marks a target that
        does not count."""
        counted = (local != -100).sum()
        return mean * counted / (targets != -100).sum().clamp(min=1)


def _exchange(x: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """All-to-all over dim 0 of `x` (size, ...): chunk j goes to rank j, chunk i of the
    result came from rank i. Differentiable (its backward is the reverse exchange)."""
    # torch's functional collective: differentiable, and traceable by torch.compile.
    return all_to_all_single_autograd(x.contiguous(), None, None, group)


def heads_to_sequence(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """(B, T / N, H, D) of this rank's positions -> (B, T, H / N, D): every position, this
    rank's H / N heads (head group = rank)."""
    B, local, H, D = x.shape
    n = shard.size
    chunks = x.reshape(B, local, n, H // n, D).permute(2, 0, 1, 3, 4)  # (N, B, T/N, H/N, D)
    got = _exchange(chunks, shard.group, n)  # chunk i: rank i's positions, our heads
    return got.permute(1, 0, 2, 3, 4).reshape(B, n * local, H // n, D)


def sequence_to_heads(y: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """The inverse of `heads_to_sequence`: (B, T, H / N, D) -> (B, T / N, H, D)."""
    B, T, h, D = y.shape
    n = shard.size
    chunks = y.reshape(B, n, T // n, h, D).permute(1, 0, 2, 3, 4)  # (N, B, T/N, H/N, D)
    got = _exchange(chunks, shard.group, n)  # chunk i: our positions, rank i's heads
    return got.permute(1, 2, 0, 3, 4).reshape(B, T // n, n * h, D)


Attend = Callable[..., torch.Tensor]
"""An attention function (q, k, v, *args) over (B, T, H, D) tensors -> (B, T, H, D)."""


class UlyssesAttention:
    """`attend` over the whole sequence for this rank's heads, called on its slice: q
    (B, T / N, H, D), k and v (B, T / N, H_kv, D) -> (B, T / N, H, D)."""

    def __init__(self, attend: Attend, shard: SequenceShard) -> None:
        self.attend, self.shard = attend, shard

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any
                 ) -> torch.Tensor:  # fmt: skip
        n, kv_heads = self.shard.size, k.size(2)
        if kv_heads % n:  # fewer key/value heads than ranks: one copy per rank that needs it
            k, v = (t.repeat_interleave(n // kv_heads, dim=2) for t in (k, v))
        q, k, v = (heads_to_sequence(t, self.shard) for t in (q, k, v))
        return sequence_to_heads(self.attend(q, k, v, *args), self.shard)


def kv_heads_error(n_heads: int, n_kv_heads: int, size: int) -> str | None:
    """Why attention with these heads cannot split over `size` ranks (None: it can)."""
    if n_heads % size:
        return (f"model.n_heads={n_heads} is not divisible by parallel.sequence={size}: "
                "each rank attends with n_heads / sequence heads; pick a sequence size "
                "dividing the heads")  # fmt: skip
    if n_kv_heads % size and size % n_kv_heads:
        return (f"model.n_kv_heads={n_kv_heads} and parallel.sequence={size}: one must divide "
                "the other (key/value heads split over the ranks, or are repeated to one per "
                "rank)")  # fmt: skip
    return None
