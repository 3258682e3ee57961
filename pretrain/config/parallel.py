"""How the ranks of a run are arranged: one size per parallel dimension.

Data parallelism (DeepSpeed's, with ZeRO sharding over every rank), sequence parallelism
(`parallel.sequence`: DeepSpeed-Ulysses, groups of consecutive ranks that split each
sequence) and expert parallelism (`parallel.expert`: groups of consecutive ranks, DeepSpeed's,
that split a mixture-of-experts model's experts; with sequence parallelism they hold or span
sequence groups) exist; tensor
parallelism is the room the next dimension takes, 1 until then. `resolve()` derives and
checks the sizes; `pretrain.dist` builds the process
groups once from them; code that means "the ranks that split the batch" asks for the data
dimension (`dist.data_rank()`, `dist.data_size()`, `run.parallel.data`), never the world
size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the parallel dimensions; their product is the world size."""

    data: int
    """Ranks that each take a different share of every batch (data parallel, ZeRO)."""
    sequence: int = 1
    """Ranks that split one sequence (consecutive ranks: a group stays within a node)."""
    tensor: int = 1
    """Ranks that split each weight matrix (not built yet: 1)."""
    expert: int = 1
    """Ranks that split the experts of a mixture-of-experts layer (consecutive ranks; not a
    factor of the world size; it divides the data size)."""

    @classmethod
    def for_world(cls, world_size: int, sequence: int = 1, expert: int = 1) -> ParallelDims:
        """`sequence` ranks per sequence, the rest on the data dimension (data = world /
        sequence, at least 1: `errors` says when sequence does not divide the world), and
        `expert` of the data ranks per expert group."""
        return cls(data=max(world_size // max(sequence, 1), 1), sequence=sequence, expert=expert)

    @property
    def world_size(self) -> int:
        return self.data * self.sequence * self.tensor

    def errors(self, world_size: int) -> list[str]:
        """What is wrong with these sizes for `world_size` ranks ([] when nothing is)."""
        out = [f"parallel.{k}={v}: must be >= 1" for k, v in asdict(self).items() if v < 1]
        if not out and world_size % self.sequence:
            out.append(
                f"parallel.sequence={self.sequence} does not divide the {world_size} ranks: "
                "run a multiple of it (data-parallel size = ranks / sequence)"
            )
        elif not out and self.world_size != world_size:
            out.append(
                f"parallel sizes data={self.data} x sequence={self.sequence} x tensor="
                f"{self.tensor} = {self.world_size} ranks, but the run has {world_size}"
            )
        if not out and self.data % self.expert:
            out.append(f"parallel.expert={self.expert} must divide the data-parallel size "
                       f"{self.data}: run a multiple of it")  # fmt: skip
        return out

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
