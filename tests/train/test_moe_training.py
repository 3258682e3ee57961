"""The sparse Llama (model=moe_tiny) trains through the framework: on 2 data-parallel ranks
under ZeRO-1 and ZeRO-3 (the experts sharded like every other weight) it equals 1 rank, with
the router's bias balancing too (its load summed over the ranks); every metrics record holds
the router's load and aux loss (and the share dropped over a capacity); a stopped run resumes
exactly (and on another layout), and one killed at random moments finishes as if never
killed. Expert parallelism (parallel.expert): tests/train/test_expert_parallel.py."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import export, manager
from tests.conftest import (
    EQUIV,
    TINY,
    assert_close,
    curve,
    loss_list,
    newest_checkpoint,
    start,
    train,
    wait_for_step,
)

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


@pytest.fixture(scope="module")
def one_rank_strong_aux(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return train(tmp_path_factory.mktemp("moe-aux"), [*MOE, "model.aux_loss_coef=1"])


@pytest.mark.parametrize("stage", [1, 3])
def test_sequence_parallel_equals_one_rank(
    tmp_path: Path, stage: int, one_rank_strong_aux: list[dict]
) -> None:
    """parallel.sequence=2: each rank routes its slice of every sequence, and the
    load-balancing loss pools the sequence group's tokens (each rank's router gets the
    whole loss's gradient), so losses, gradient norms and the aux loss equal one rank's
    (before the pooling, the aux loss of each half differed by 2e-3 and the loss drifted
    past 1e-5 by step 3). The aux loss weighs as much as the language model's here, so a
    wrong share of its gradient shows in the norms."""
    run = [*MOE, "model.aux_loss_coef=1", "parallel.sequence=2", f"deepspeed.zero_stage={stage}"]
    records = train(tmp_path, run, nproc=2)
    for ours, ref in zip(records, one_rank_strong_aux, strict=True):
        for key in ("loss", "grad_norm", "moe_aux_loss"):
            assert ours[key] == pytest.approx(ref[key], rel=1e-5), (ours["step"], key)


def test_bias_balancing_on_two_ranks_equals_one(tmp_path: Path) -> None:
    """Auxiliary-loss-free balancing (no aux loss): each step's bias update counts both
    ranks' tokens, so 2 ranks (ZeRO-3) learn the bias 1 rank learns, and the same curve."""
    run = [*MOE, "model.router_bias_rate=0.01", "model.aux_loss_coef=0",
           "checkpoint.save_final=true"]  # fmt: skip
    one = loss_list(train(tmp_path / "one", run))
    two = loss_list(train(tmp_path / "two", [*run, "deepspeed.zero_stage=3"], nproc=2))
    assert_close(two, one, rel=1e-4)
    biases = [export.consolidated_state_dict(tmp_path / r / "checkpoints" / "step_6")
              ["layers.1.mlp.gate.bias"] for r in ("one", "two")]  # fmt: skip
    assert biases[0].abs().sum() > 0 and torch.equal(biases[0], biases[1])


def test_the_router_load_and_aux_loss_are_in_every_record(tmp_path: Path) -> None:
    records = train(tmp_path, [*MOE, "trainer.max_steps=3", "model.capacity_factor=1.0"])
    for r in records:  # moe_tiny: 2 sparse blocks of 8 experts, top 2
        assert 0.0 < r["moe_dropped"] < 0.5  # capacity 1.0: what an uneven load overflows
        assert 1.0 <= r["moe_aux_loss"] <= 8.0  # 2 when even, up to 8 when collapsed
        for block in (0, 1):
            low, high = r[f"moe_load_min/{block}"], r[f"moe_load_max/{block}"]
            assert 0.0 <= low <= 1 / 8 <= high <= 1.0
        assert r["moe_load_max"] == max(r["moe_load_max/0"], r["moe_load_max/1"])


def test_a_stopped_moe_run_resumes_exactly_and_on_another_layout(tmp_path: Path) -> None:
    """Stopped at step 3 and resumed: bit for bit the uninterrupted run (router and its
    bias, experts, Adam state and data position all in the checkpoint); the same checkpoint
    of 2 ZeRO-3 ranks resumes on 1 rank at ZeRO-1 (the experts resharded through the
    universal format) to the same curve within 1e-5."""
    run = [*MOE, "deepspeed.zero_stage=3", "checkpoint.every_steps=3",
           "model.router_bias_rate=0.01"]  # fmt: skip
    straight = curve(train(tmp_path / "straight", run, nproc=2))
    stopped = tmp_path / "stopped"
    train(stopped, [*run, "trainer.stop_at_step=3"], nproc=2)
    moved = tmp_path / "moved"
    shutil.copytree(stopped / "checkpoints", moved / "checkpoints")
    assert curve(train(stopped, run, nproc=2))[3:] == straight[3:]
    other = curve(train(moved, [*MOE, "deepspeed.zero_stage=1", "model.router_bias_rate=0.01"]))
    assert [s for s, _, _ in other] == [4, 5, 6]
    for (_, loss, _), (_, ref, _) in zip(other, straight[3:], strict=True):
        assert loss == pytest.approx(ref, rel=1e-5)


def test_kill_9_at_random_moments_then_the_moe_run_finishes_as_if_never_killed(
    tmp_path: Path,
) -> None:
    """A save every step, so kills land in steps and in saves alike; with the router bias
    and a capacity, whose state must survive too."""
    run = [*MOE, "trainer.max_steps=12", "checkpoint.every_steps=1",
           "model.router_bias_rate=0.01", "model.capacity_factor=1.5"]  # fmt: skip
    straight = curve(train(tmp_path / "straight", run))
    killed = tmp_path / "killed"
    rng = random.Random(7)
    for trial in range(2):
        before = newest_checkpoint(killed)
        proc = start([*TINY, f"run_dir={killed}", *run], tmp_path / f"kill{trial}.log")
        wait_for_step(killed, proc, (before or 0) + 1)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait(timeout=60)
        for ckpt in manager.complete_checkpoints(killed / "checkpoints"):
            assert manager.read_client_state(ckpt)["trainer"]["step"] == int(ckpt.name[5:])
    assert newest_checkpoint(killed) is not None
    assert curve(train(killed, run)) == straight
