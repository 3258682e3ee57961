"""The sparse Llama (model=moe_tiny) trains through the framework: on 2 data-parallel ranks
under ZeRO-1 and ZeRO-3 (the experts sharded like every other weight) it equals 1 rank, and
every metrics record holds the router's load and aux loss. Expert parallelism
(parallel.expert) is issue 23's next step."""

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


def test_the_router_load_and_aux_loss_are_in_every_record(tmp_path: Path) -> None:
    records = train(tmp_path, [*MOE, "trainer.max_steps=3"])
    for r in records:  # moe_tiny: 2 sparse blocks of 8 experts, top 2
        assert 1.0 <= r["moe_aux_loss"] <= 8.0  # 2 when even, up to 8 when collapsed
        for block in (0, 1):
            low, high = r[f"moe_load_min/{block}"], r[f"moe_load_max/{block}"]
            assert 0.0 <= low <= 1 / 8 <= high <= 1.0
        assert r["moe_load_max"] == max(r["moe_load_max/0"], r["moe_load_max/1"])
