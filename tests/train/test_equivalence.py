"""ZeRO 0-3, CPU offload, activation checkpointing and compiled blocks against one process:
the same losses (fp32, 2 gloo ranks). Two torchrun "nodes" on one c10d endpoint are in
tests/slurm/test_pretrain_sh.py, through slurm/launch_node.sh."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import (
    EQUIV,
    TINY,
    assert_close,
    launch,
    loss_list,
    read_metrics,
    train,
)

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    return loss_list(train(tmp_path_factory.mktemp("single"), EQUIV))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_on_two_ranks_matches_one_process(
    tmp_path: Path, stage: int, single_process_losses: list[float]
) -> None:
    losses = loss_list(train(tmp_path, [*EQUIV, f"deepspeed.zero_stage={stage}"], nproc=2))
    assert_close(losses, single_process_losses, rel=1e-4)


def test_cpu_offload_matches_one_process(
    tmp_path: Path, single_process_losses: list[float]
) -> None:
    """ZeRO-2 with optimizer state offloaded, stepped there by torch's fused AdamW (the
    default; DeepSpeedCPUAdam, optim.impl=cpu_adam, is tested on a GPU: tests/train/test_gpu.py)."""
    overrides = [*EQUIV, "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"]
    losses = loss_list(train(tmp_path, overrides, nproc=2))
    # Same AdamW math in another kernel: equal to rounding, not bit for bit.
    assert_close(losses, single_process_losses, rel=1e-4)


def test_activation_checkpointing_gives_the_same_losses(
    tmp_path: Path, single_process_losses: list[float]
) -> None:
    """Recomputing activations must not change the math, also with ZeRO-3 on two ranks, where
    the recompute gathers the sharded weights again (selective: all but matmul outputs)."""
    overrides = [*EQUIV, "trainer.activation_checkpointing=selective", "deepspeed.zero_stage=3"]
    assert_close(loss_list(train(tmp_path, overrides, nproc=2)), single_process_losses, rel=1e-4)


@pytest.mark.slow
def test_compiled_blocks_give_the_same_losses(
    tmp_path: Path, single_process_losses: list[float]
) -> None:
    """torch.compile fuses kernels (inductor's C++ backend on CPU) without changing the math,
    also through full activation checkpointing (compiled with the block)."""
    overrides = [*EQUIV, "trainer.compile=true", "trainer.activation_checkpointing=full"]
    losses = loss_list(train(tmp_path, overrides))
    assert_close(losses, single_process_losses, rel=1e-4)


@pytest.mark.slow
def test_compiled_blocks_under_zero3_give_the_same_losses_without_recompiling(
    tmp_path: Path, single_process_losses: list[float]
) -> None:
    """Under ZeRO-3 only each block's forward is compiled; DeepSpeed's fetch and release
    hooks stay outside it (blocks are ZeRO-3 leaves), so nothing recompiles per block."""
    overrides = [*EQUIV, "trainer.compile=true", "deepspeed.zero_stage=3",
                 "trainer.activation_checkpointing=selective"]  # fmt: skip
    proc = launch([*TINY, f"run_dir={tmp_path}", *overrides], nproc=2,
                  env={"TORCH_LOGS": "recompiles"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Recompiling function" not in proc.stderr, proc.stderr[-4000:]
    # torch's deprecation warning for DeepSpeed's collectives came at every ZeRO-3 step
    # (28 lines in 6 steps on two ranks) until engine/deepspeed.py filtered it.
    assert "is deprecated" not in proc.stderr, proc.stderr[-4000:]
    assert_close(loss_list(read_metrics(tmp_path)), single_process_losses, rel=1e-4)
