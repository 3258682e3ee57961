"""The sparse Llama (model=moe_tiny) trains through the framework: on 2 data-parallel ranks
under ZeRO-1 and ZeRO-3 (the experts sharded like every other weight) it equals 1 rank, and
every metrics record holds the router's load and aux loss, and a stopped run resumes
exactly (and on another layout). Expert parallelism (parallel.expert) is issue 23's next
step."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import EQUIV, assert_close, curve, loss_list, train

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


def test_a_stopped_moe_run_resumes_exactly_and_on_another_layout(tmp_path: Path) -> None:
    """Stopped at step 3 and resumed: bit for bit the uninterrupted run (router, experts,
    Adam state and data position all in the checkpoint); the same checkpoint of 2 ZeRO-3
    ranks resumes on 1 rank at ZeRO-1 (the experts resharded through the universal
    format) to the same curve within 1e-5."""
    run = [*MOE, "deepspeed.zero_stage=3", "checkpoint.every_steps=3"]
    straight = curve(train(tmp_path / "straight", run, nproc=2))
    stopped = tmp_path / "stopped"
    train(stopped, [*run, "trainer.stop_at_step=3"], nproc=2)
    moved = tmp_path / "moved"
    shutil.copytree(stopped / "checkpoints", moved / "checkpoints")
    assert curve(train(stopped, run, nproc=2))[3:] == straight[3:]
    other = curve(train(moved, [*MOE, "deepspeed.zero_stage=1"]))
    assert [s for s, _, _ in other] == [4, 5, 6]
    for (_, loss, _), (_, ref, _) in zip(other, straight[3:], strict=True):
        assert loss == pytest.approx(ref, rel=1e-5)
