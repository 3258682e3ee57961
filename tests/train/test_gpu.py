"""GPU-only: the real training path on CUDA (NCCL, bf16, fused AdamW, the fastest attention,
the chunked loss, compiled blocks under both checkpointing policies).

Each GPU run is held against the same run in fp32 on the CPU: bf16 on CUDA must learn and
follow the reference curve, not merely produce finite numbers.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY, launch, loss_list, read_metrics, requires_gpu, train

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


@pytest.mark.parametrize(("policy", "stage"), [("full", 0), ("selective", 0), ("selective", 3)])
def test_compiled_training_on_gpu_follows_cpu(
    tmp_path: Path, cpu_reference: list[float], policy: str, stage: int
) -> None:
    overrides = [*SETTINGS, *GPU, "trainer.compile=true", f"deepspeed.zero_stage={stage}",
                 f"trainer.activation_checkpointing={policy}"]  # fmt: skip
    assert_follows(loss_list(train(tmp_path, overrides)), cpu_reference)


def test_gpu_metrics_memory_mfu_and_profile(tmp_path: Path) -> None:
    """On CUDA each step records memory and (H100/A100/...: a table GPU) MFU; profiling with
    profile_memory writes a CUDA trace and an allocator snapshot."""
    import gzip
    import json

    import torch

    from pretrain.model.flops import peak_flops

    profile = ["trainer.profile_steps=[3,4]", "trainer.profile_memory=true"]
    records = train(tmp_path, [*SETTINGS, *GPU, "trainer.max_steps=6", *profile])
    for r in records:
        assert 0 < r["mem_allocated_gib"] <= r["mem_peak_gib"] <= r["mem_reserved_gib"]
        assert "loss_scale" not in r  # bf16 has none
    if peak_flops(torch.cuda.get_device_name(), "bf16") is not None:
        assert all(0 < r["mfu"] < 1 for r in records)
    trace = tmp_path / "profile" / "rank0_steps3-4.json.gz"
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events), "no CUDA kernels in the trace"
    assert (tmp_path / "profile" / "rank0_steps3-4_memory.pickle").stat().st_size > 0


def test_fp16_records_the_loss_scale(tmp_path: Path) -> None:
    records = train(tmp_path, [*SETTINGS, "trainer.device=cuda", "precision=fp16",
                               "trainer.max_steps=4"])  # fmt: skip
    assert all(r["loss_scale"] > 0 and r["overflow_steps"] >= 0 for r in records)


def test_offload_from_gpu_with_either_cpu_adamw_and_resume_across_them(tmp_path: Path) -> None:
    """ZeRO-2 with optimizer state offloaded from the GPU: torch's fused AdamW (the default)
    and DeepSpeedCPUAdam (optim.impl=cpu_adam, JIT-built on first use) take the same steps,
    and a run saved under one resumes under the other with the same losses."""
    offload = [*SETTINGS, *GPU, "precision=fp32", "trainer.max_steps=6", "trainer.log_every=1",
               "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"]  # fmt: skip
    fused = loss_list(train(tmp_path / "fused", [*offload, "checkpoint.every_steps=3"]))
    cpu_adam = loss_list(train(tmp_path / "cpu_adam", [*offload, "optim.impl=cpu_adam"]))
    assert cpu_adam == pytest.approx(fused, rel=1e-4)
    shutil.rmtree(tmp_path / "fused" / "checkpoints" / "step_6")
    proc = launch([*TINY, f"run_dir={tmp_path / 'fused'}", *offload, "optim.impl=cpu_adam"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout + proc.stderr
    assert loss_list(read_metrics(tmp_path / "fused")) == pytest.approx(fused, rel=1e-4)
