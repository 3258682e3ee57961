"""NaN/Inf losses: the step is skipped on every rank and counted; too many in a row stop the
run with the last good checkpoint intact."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.checkpoint import manager
from pretrain.train.trainer import EXIT_DIVERGED
from tests.conftest import REPO, TINY, free_port, read_metrics, subprocess_env

pytestmark = pytest.mark.multiprocess


def test_nan_on_one_rank_skips_that_step_everywhere_and_a_run_of_them_stops(
    tmp_path: Path,
) -> None:
    # Rank 1's loss is NaN at step 3 (alone), then at steps 5 and 6: the limit of 2 in a row.
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
         str(REPO / "tests" / "train" / "nan_probe.py"), "3,5,6", str(tmp_path), *TINY,
         "precision=fp32", "deepspeed.zero_stage=2", "trainer.max_steps=10",
         "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
         "trainer.max_bad_steps=2", "checkpoint.every_steps=1", "checkpoint.keep_last=0"],
        cwd=REPO, env={**subprocess_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert len(re.findall(rf"exitcode\s*: {EXIT_DIVERGED}\b", out)) >= 1, out[-4000:]
    assert "the loss was NaN/Inf for 2 steps in a row (steps 5-6" in out

    metrics = {m["step"]: m for m in read_metrics(tmp_path)}
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
    assert [metrics[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 2, 3]
    assert metrics[3]["loss"] != metrics[3]["loss"]  # NaN is logged as such
    assert metrics[4]["loss"] < 100  # and training goes on, finite

    for rank in (0, 1):  # no rank applied a skipped update; the others changed the weights
        sums = {int(k): v for k, v in json.loads((tmp_path / f"weights_rank{rank}.json")
                                                 .read_text()).items()}  # fmt: skip
        assert sums[3] == sums[2] and sums[5] == sums[4] and sums[6] == sums[4]
        assert sums[2] != sums[1] and sums[4] != sums[3]
    # Checkpoints at the good steps only; the newest is the last good one, complete.
    names = [p.name for p in manager.complete_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_1", "step_2", "step_4"]


def test_nan_in_a_single_process_run_skips_that_step(tmp_path: Path) -> None:
    """One rank, plain fp32 data parallel: the trainer reads the losses itself (no collective)
    and clips itself (DeepSpeed does not), and a NaN step still leaves the weights alone."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "train" / "nan_probe.py"), "2", str(tmp_path),
         *TINY, "precision=fp32", "deepspeed.zero_stage=0", "trainer.max_steps=4",
         "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "optim.grad_clip=1.0"],
        cwd=REPO, env={**subprocess_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = {m["step"]: m for m in read_metrics(tmp_path)}
    assert [metrics[s]["skipped_steps"] for s in range(1, 5)] == [0, 1, 1, 1]
    assert metrics[2]["loss"] != metrics[2]["loss"]
    assert all(metrics[s]["loss"] < 100 and metrics[s]["grad_norm"] > 0 for s in (1, 3, 4))
    sums = {int(k): v for k, v in json.loads((tmp_path / "weights_rank0.json").read_text()).items()}
    assert sums[2] == sums[1] and sums[3] != sums[2] and sums[4] != sums[3]
