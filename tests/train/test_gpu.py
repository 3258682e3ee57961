"""GPU-only: the real training path on CUDA (NCCL, bf16, fused AdamW, the fastest attention)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import requires_gpu, train

pytestmark = [pytest.mark.gpu, requires_gpu]


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_training_on_gpu_learns(tmp_path: Path, stage: int) -> None:
    metrics = train(
        tmp_path,
        ["trainer.device=cuda", "precision=bf16", f"deepspeed.zero_stage={stage}",
         "trainer.max_steps=60", "trainer.micro_batch_size=8", "optim.lr=3e-3",
         "optim.warmup_steps=5"],
    )  # fmt: skip
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert sum(m["loss"] for m in metrics[-5:]) / 5 < 0.5 * metrics[0]["loss"]


def test_compiled_training_on_gpu_learns(tmp_path: Path) -> None:
    metrics = train(
        tmp_path,
        ["trainer.device=cuda", "precision=bf16", "trainer.compile=true",
         "trainer.activation_checkpointing=true", "trainer.max_steps=60",
         "trainer.micro_batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=5"],
    )  # fmt: skip
    assert sum(m["loss"] for m in metrics[-5:]) / 5 < 0.5 * metrics[0]["loss"]
