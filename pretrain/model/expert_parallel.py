"""Expert parallelism's token exchange: the ranks of an expert-parallel group each hold
E / N consecutive experts of every sparse block, and every rank's slots travel to the rank
that holds their expert and back (GShard's dispatch and combine, as all-to-alls).

A rank's slots arrive sorted by global expert (model/moe.py sorts them once), so the rows
for each destination rank are contiguous. `ExpertExchange.dispatch` swaps the slot counts
(one small all-to-all, then a host sync: the token all-to-all needs its split sizes), sends
the rows, and reorders what arrives from (source rank, expert) to (expert, source rank), so
each local expert's rows are contiguous for its matmul; `combine` undoes both. The token
all-to-alls are torch's differentiable functional collective: the backward of a dispatch is
a combine of the gradients, so each expert's gradient holds every token of the group that
reached it.

This is the exchange; DeepSpeed's side of `parallel.expert` (its expert groups, the
gradient reduction and ZeRO partitions over the ranks holding the same experts, the
experts in checkpoints) is engine/expert_groups.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd


@dataclass(frozen=True)
class ExpertShard:
    """This rank's place in its expert-parallel group."""

    group: Any
    """The group's process group (its ranks hold consecutive experts, in rank order)."""
    size: int
    rank: int
    param_attrs: dict[str, Any] = field(default_factory=dict)
    """Attributes set on each expert parameter as it is made, before ZeRO-3's zero.Init
    partitions it: the engine's marks (DeepSpeed's expert groups, engine/deepspeed.py)."""

    def local_experts(self, n_experts: int) -> range:
        """The global indices of the experts this rank holds."""
        local = n_experts // self.size
        return range(self.rank * local, (self.rank + 1) * local)


class ExpertExchange:
    """One sparse block's exchange in one forward: `combine` undoes its `dispatch`."""

    def __init__(self, shard: ExpertShard) -> None:
        self.shard = shard
        self.sent: list[int] = []
        """Rows sent to each rank of the group (its experts' slots)."""
        self.received: list[int] = []
        """Rows received from each rank."""
        self.order: torch.Tensor | None = None
        """The received rows' permutation into local-expert order."""

    def dispatch(
        self, rows: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """rows (M, H): this rank's slots sorted by global expert, counts (E,) how many each
        expert got -> (rows for this rank's experts from every rank of the group, sorted by
        local expert (M', H); their count per local expert (E / N,))."""
        n = self.shard.size
        per_rank = counts.view(n, -1)  # (N, E / N): our slots for each rank's experts
        theirs = torch.empty_like(per_rank)
        dist.all_to_all_single(theirs, per_rank.contiguous(), group=self.shard.group)
        # theirs[i, j]: slots rank i sends to our j-th expert
        self.sent = per_rank.sum(1).tolist()
        self.received = theirs.sum(1).tolist()
        got = all_to_all_single_autograd(rows.contiguous(), self.received, self.sent,
                                         self.shard.group)  # fmt: skip
        got = got.view(-1, rows.size(1))  # rows of rank 0's slots, then rank 1's, ...
        local = torch.arange(theirs.size(1), device=rows.device).repeat(n)
        expert_of_row = torch.repeat_interleave(
            local, theirs.flatten(), output_size=sum(self.received)
        )  # no sync
        self.order = torch.sort(expert_of_row, stable=True).indices
        return got[self.order], theirs.sum(0)

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        """The experts' outputs (M', H) in `dispatch`'s order -> (M, H): each of this rank's
        slots back in the order it was sent."""
        assert self.order is not None, "combine() before dispatch()"
        by_source = torch.empty_like(out).index_copy(0, self.order, out)
        back = all_to_all_single_autograd(by_source.contiguous(), self.sent, self.received,
                                          self.shard.group)  # fmt: skip
        return back.view(-1, out.size(1))


def expert_parallel_errors(n_experts: int, size: int) -> list[str]:
    """Why a sparse block's experts cannot split over `size` ranks ([] when they can)."""
    if n_experts % size:
        return [f"model.n_experts={n_experts} is not divisible by parallel.expert={size}: "
                "each rank holds n_experts / expert of them"]  # fmt: skip
    return []
