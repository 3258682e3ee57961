"""The synthetic stream is deterministic, learnable, and split-independent."""

from __future__ import annotations

import numpy as np
import torch

from pretrain.data.source import DataContext, DataSource
from pretrain.data.synthetic import SyntheticStream, synthetic_source


def _stream(**kw: int) -> SyntheticStream:
    base = dict(vocab_size=50, seq_len=16, micro_batch_size=2, grad_accum=2, seed=7)
    return SyntheticStream(**{**base, **kw})


def test_same_seed_same_batches_other_seed_other_batches() -> None:
    a, b, c = _stream(), _stream(), _stream(seed=8)
    for _ in range(3):
        x = next(a)
        assert x.shape == (2, 17) and x.dtype == torch.int64
        assert torch.equal(x, next(b))
        assert not torch.equal(x, next(c))


def test_global_batch_is_the_same_however_it_is_split() -> None:
    """1 rank x accum 4 x micro 2 == 2 ranks x accum 2 x micro 2 == 4 ranks x accum 1 x micro 2."""

    def step_samples(world: int, accum: int) -> list[set[bytes]]:
        streams = [_stream(grad_accum=accum, rank=r, world_size=world) for r in range(world)]
        steps = []
        for _ in range(3):
            rows = [row for s in streams for _ in range(accum) for row in next(s)]
            steps.append({row.numpy().tobytes() for row in rows})
        return steps

    assert step_samples(1, 4) == step_samples(2, 2) == step_samples(4, 1)
    assert len(step_samples(1, 4)[0]) == 8  # no sample repeated within a step


def test_walk_follows_the_cycle_except_at_restarts() -> None:
    s = _stream(vocab_size=50, seq_len=2000, micro_batch_size=1, grad_accum=1)
    seq = s.sample(0)
    follows = s._order[(s._pos[seq[:-1]] + 1) % 50] == seq[1:]
    assert 0.85 < follows.mean() < 0.95  # noise 0.1 restarts ~10% of positions


def test_state_dict_resumes_the_stream() -> None:
    a = _stream()
    for _ in range(5):
        next(a)
    b = _stream()
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert torch.equal(next(a), next(b))


def test_tokens_stay_in_vocab() -> None:
    x = np.concatenate([_stream(vocab_size=13).sample(i) for i in range(20)])
    assert x.min() >= 0 and x.max() < 13


def test_the_data_family_builder_takes_one_context() -> None:
    """data=synthetic's builder: the DataSource of a DataContext, the same stream as the
    class given each field; `alone("val")` reads the held-out walk as the one rank of one."""
    ctx = DataContext(vocab_size=50, seq_len=16, micro_batch_size=2, grad_accum=2, seed=7,
                      data_rank=1, data_size=2)  # fmt: skip
    source = synthetic_source(ctx, noise=0.1)
    assert isinstance(source, DataSource)
    assert source.tokenizer is None and source.metrics() == {}
    assert torch.equal(next(source), next(_stream(rank=1, world_size=2)))
    val = synthetic_source(ctx.alone("val"))
    assert (val.rank, val.world, val.accum) == (0, 1, 1)
    assert not torch.equal(next(val), next(_stream()))
