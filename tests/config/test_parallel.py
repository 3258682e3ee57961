"""ParallelDims: derived in config resolution (every rank on the data dimension, the only
one today), checked against the world size, and what "the ranks that split the batch" means
in the batch geometry, the loader and the evaluator."""

from __future__ import annotations

import pytest

from pretrain import dist
from pretrain.config import ConfigError, compose, resolve
from pretrain.config.parallel import ParallelDims


def test_the_sizes_are_checked_against_the_world() -> None:
    assert ParallelDims.for_world(8) == ParallelDims(data=8, sequence=1, tensor=1, expert=1)
    assert ParallelDims(data=4, sequence=2).world_size == 8
    assert ParallelDims(data=4, sequence=2).errors(8) == []
    assert "= 8 ranks, but the run has 6" in ParallelDims(data=4, tensor=2).errors(6)[0]
    assert ParallelDims(data=4, expert=3).errors(4) == [
        "parallel.expert=3 must divide parallel.data=4"
    ]
    assert ParallelDims(data=0).errors(0) == ["parallel.data=0: must be >= 1"]


def test_resolve_derives_them_and_the_batch_splits_over_the_data_ranks() -> None:
    cfg = compose(["trainer.device=cpu", "model=tiny", "data=synthetic",
                   "trainer.global_batch_size=16", "trainer.micro_batch_size=2"])  # fmt: skip
    run = resolve(cfg, world_size=4, cuda_available=False)
    assert run.parallel == ParallelDims(data=4) and run.world_size == 4
    assert run.grad_accum == 16 // (2 * 4)
    assert run.as_dict["derived"]["parallel"] == {"data": 4, "sequence": 1, "tensor": 1,
                                                   "expert": 1}  # fmt: skip
    with pytest.raises(ConfigError, match=r"x data-parallel ranks=3 = 6"):
        resolve(cfg, world_size=3, cuda_available=False)


def test_dist_answers_for_the_data_dimension_in_a_single_process() -> None:
    assert dist.parallel() == ParallelDims(data=1)
    assert (dist.data_rank(), dist.data_size(), dist.data_group()) == (0, 1, None)
    with pytest.raises(ValueError, match="does not cover the 1 ranks"):
        dist.init_parallel(ParallelDims(data=2))
