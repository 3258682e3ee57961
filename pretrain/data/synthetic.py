"""A deterministic, learnable, I/O-free token stream for tests and benchmarks.

Every sample is a walk along one fixed random cycle through the vocabulary (token x is
followed by `next(x)`), restarted at a random token with probability `noise` at each
position. A model that learns the bigram table reaches a loss near the noise entropy, far
below log(vocab_size), so "the loss falls" is a meaningful check.

Sample `i` depends only on (seed, i), and the global batch of optimizer step `s` holds
samples [s * G, (s + 1) * G) however they are split over ranks, micro-batches and
accumulation steps. So a run's loss curve is the same on 1 or N ranks for the same global
batch, which is what the ZeRO equivalence tests rely on.
"""

from __future__ import annotations

import numpy as np
import torch

from pretrain.data.source import DataContext


class SyntheticStream:
    """Iterator over this rank's micro-batches: LongTensor (micro_batch_size, seq_len + 1).
    A `DataSource` (data/source.py) without a tokenizer."""

    tokenizer: str | None = None
    tokenizer_sha256: str | None = None
    allow_tokenizer_change = False
    eos_id: int | None = None  # a stream of tokens with no documents
    chat_template: str | None = None

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        micro_batch_size: int,
        grad_accum: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        noise: float = 0.1,
        split: str = "train",
    ) -> None:
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"data.noise={noise}: must be in [0, 1]")
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: choose train or val")
        # val: other samples of the same walk (a held-out draw of the same distribution).
        self._stream = () if split == "train" else (1,)
        self.vocab_size, self.seq_len, self.noise, self.seed = vocab_size, seq_len, noise, seed
        self.micro, self.accum, self.rank, self.world = (
            micro_batch_size,
            grad_accum,
            rank,
            world_size,
        )
        order = np.random.default_rng([seed, 0x5EED]).permutation(vocab_size)
        self._order = order  # the cycle: order[j] is followed by order[j + 1]
        self._pos = np.argsort(order)  # position of each token on the cycle
        self.micro_batches_done = 0

    def sample(self, index: int) -> np.ndarray:
        """Tokens of global sample `index`: int64 array of length seq_len + 1."""
        n = self.seq_len + 1
        rng = np.random.default_rng([self.seed, index, *self._stream])
        restart = rng.random(n) < self.noise
        restart[0] = True
        starts = rng.integers(0, self.vocab_size, size=n)
        t = np.arange(n)
        seg_begin = np.maximum.accumulate(np.where(restart, t, 0))  # last restart at or before t
        walked = self._pos[starts[seg_begin]] + (t - seg_begin)
        return self._order[walked % self.vocab_size].astype(np.int64)

    def __iter__(self) -> SyntheticStream:
        return self

    def __next__(self) -> torch.Tensor:
        step, micro_step = divmod(self.micro_batches_done, self.accum)
        global_batch = self.micro * self.accum * self.world
        first = step * global_batch + (self.rank * self.accum + micro_step) * self.micro
        batch = np.stack([self.sample(first + j) for j in range(self.micro)])
        self.micro_batches_done += 1
        return torch.from_numpy(batch)

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, int]:
        return {"micro_batches_done": self.micro_batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.micro_batches_done = int(state["micro_batches_done"])

    def load_resharded_state(self, states: list[dict[str, int]], step: int) -> None:
        """Continue after `step` steps saved by another number of ranks: exact, since the
        global batch of each step does not depend on how it is split."""
        del states
        self.micro_batches_done = step * self.accum


def synthetic_source(ctx: DataContext, noise: float = 0.1) -> SyntheticStream:
    """data=synthetic: the stream for `ctx` (the global batch of each step is the same
    however the ranks split it)."""
    return SyntheticStream(
        ctx.vocab_size, ctx.seq_len, ctx.micro_batch_size, ctx.grad_accum, ctx.seed,
        ctx.data_rank, ctx.data_size, noise, ctx.split,
    )  # fmt: skip
