"""GPU-only: the real training path on CUDA (NCCL, bf16, fused AdamW, the fastest attention).

Each GPU run is held against the same run in fp32 on the CPU: bf16 on CUDA must learn and
follow the reference curve, not merely produce finite numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import loss_list, requires_gpu, train

pytestmark = [pytest.mark.gpu, requires_gpu]

SETTINGS = ["trainer.max_steps=60", "trainer.micro_batch_size=8", "optim.lr=3e-3",
            "optim.warmup_steps=5"]  # fmt: skip
GPU = ["trainer.device=cuda", "precision=bf16"]


def tail(losses: list[float]) -> float:
    return sum(losses[-5:]) / 5


@pytest.fixture(scope="module")
def cpu_reference(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    return loss_list(train(tmp_path_factory.mktemp("cpu"), SETTINGS))


def assert_follows(gpu: list[float], cpu: list[float]) -> None:
    assert len(gpu) == len(cpu) and all(math.isfinite(x) for x in gpu)
    assert math.isclose(gpu[0], cpu[0], rel_tol=0.01), "the first step's loss differs"
    assert tail(gpu) < 0.6 * gpu[0], "the loss did not fall"
    assert math.isclose(tail(gpu), tail(cpu), rel_tol=0.05), (
        f"bf16 on CUDA ends at {tail(gpu):.4f}, fp32 on CPU at {tail(cpu):.4f}"
    )


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_training_on_gpu_follows_cpu(
    tmp_path: Path, stage: int, cpu_reference: list[float]
) -> None:
    gpu = loss_list(train(tmp_path, [*SETTINGS, *GPU, f"deepspeed.zero_stage={stage}"]))
    assert_follows(gpu, cpu_reference)


def test_compiled_training_on_gpu_follows_cpu(tmp_path: Path, cpu_reference: list[float]) -> None:
    overrides = [*SETTINGS, *GPU, "trainer.compile=true", "trainer.activation_checkpointing=true"]
    assert_follows(loss_list(train(tmp_path, overrides)), cpu_reference)
