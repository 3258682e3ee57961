"""The sparse Llama (model=moe_tiny) trains through the framework: on 2 data-parallel ranks
under ZeRO-1 and ZeRO-3 (the experts sharded like every other weight) it equals 1 rank.
Expert parallelism (parallel.expert) is issue 23's next step."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import EQUIV, assert_close, loss_list, train

pytestmark = pytest.mark.multiprocess

MOE = [*EQUIV, "model=moe_tiny"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    return loss_list(train(tmp_path_factory.mktemp("moe-one"), MOE))


@pytest.mark.parametrize("stage", [1, 3])
def test_two_data_parallel_ranks_equal_one(
    tmp_path: Path, stage: int, one_rank: list[float]
) -> None:
    losses = loss_list(train(tmp_path, [*MOE, f"deepspeed.zero_stage={stage}"], nproc=2))
    assert_close(losses, one_rank, rel=1e-4)  # data parallel sums in another order
    assert one_rank[-1] < one_rank[0]
