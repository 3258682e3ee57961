"""ParallelDims: derived in config resolution (parallel.sequence ranks per sequence, the
rest on the data dimension), checked against the world size and the model before any work,
and what "the ranks that split the batch" means in the batch geometry, the loader and the
evaluator."""

from __future__ import annotations

import re

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
        "parallel.expert=3 must divide the data-parallel size 4: run a multiple of it"
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


def _resolve(world: int, *overrides: str) -> object:
    cfg = compose(["trainer.device=cpu", "model=tiny", "data=synthetic",
                   "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
                   "trainer.seq_len=32", *overrides])  # fmt: skip
    return resolve(cfg, world_size=world, cuda_available=False)


def test_sequence_parallelism_splits_the_world_and_the_batch_goes_to_data_ranks() -> None:
    run = _resolve(4, "parallel.sequence=2")
    assert run.parallel == ParallelDims(data=2, sequence=2)
    assert run.grad_accum == 8 // (2 * 2)  # micro x the data ranks, not the world
    from pretrain.config.resolve import deepspeed_config

    assert deepspeed_config(run)["sequence_parallel_size"] == 2  # zero.Init counts by it


@pytest.mark.parametrize(
    ("world", "overrides", "message"),
    [
        (3, ["parallel.sequence=2"], "parallel.sequence=2 does not divide the 3 ranks"),
        (3, ["parallel.sequence=3"], "model.n_heads=4 is not divisible by parallel.sequence=3"),
        (2, ["parallel.sequence=2", "model.n_heads=6", "model.n_kv_heads=3", "model.d_model=96"],
         "model.n_kv_heads=3 and parallel.sequence=2: one must divide the other"),
        (2, ["parallel.sequence=2", "trainer.seq_len=33"],
         "trainer.seq_len=33 is not divisible by parallel.sequence=2"),
        (2, ["parallel.sequence=2", "model=lstm"], "has no sequence parallelism"),
    ],
)  # fmt: skip
def test_a_sequence_split_that_cannot_work_is_named_at_start(
    world: int, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _resolve(world, *overrides)


def test_fewer_key_value_heads_than_ranks_are_allowed_when_they_divide() -> None:
    run = _resolve(4, "parallel.sequence=4", "model.n_kv_heads=2")  # each repeated twice
    assert run.parallel.sequence == 4
