"""Real training runs, in subprocesses: one process, and torchrun with 2 ranks over gloo."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    EQUIV,
    REPO,
    assert_close,
    free_port,
    loss_list,
    read_metrics,
    subprocess_env,
    teardown_probe,
    tore_down,
    train,
)

pytestmark = pytest.mark.multiprocess


def test_tiny_llama_learns_and_writes_the_run_dir(tmp_path: Path) -> None:
    metrics = train(
        tmp_path,
        ["trainer.max_steps=100", "trainer.global_batch_size=8", "trainer.micro_batch_size=8",
         "optim.lr=3e-3", "optim.warmup_steps=10"],
    )  # fmt: skip
    assert [m["step"] for m in metrics] == list(range(1, 101))
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    assert metrics[-1]["tokens"] == 100 * 8 * 32
    assert metrics[0]["lr"] == pytest.approx(3e-4)  # step 1 of 10 warmup steps
    first, last = metrics[0]["loss"], sum(loss_list(metrics)[-10:]) / 10
    assert first > 5.0  # ~log(256) at init
    assert last < 0.5 * first, f"loss did not fall clearly: {first:.3f} -> {last:.3f}"
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 100 and saved["precision"] == "fp32"


@pytest.mark.parametrize("model", ["lstm", "transformer_encoder"])
def test_baselines_train_through_the_same_loop(tmp_path: Path, model: str) -> None:
    metrics = train(
        tmp_path,
        [f"model={model}", "trainer.max_steps=60", "trainer.global_batch_size=8",
         "trainer.micro_batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=5"],
    )  # fmt: skip
    first, last = metrics[0]["loss"], sum(loss_list(metrics)[-5:]) / 5
    assert last < 0.7 * first, f"{model}: {first:.3f} -> {last:.3f}"


def test_grad_accumulation_1x4_equals_4x1(tmp_path: Path) -> None:
    common = [*EQUIV, "trainer.global_batch_size=4"]
    one_by_four = train(tmp_path / "a", [*common, "trainer.micro_batch_size=1"])
    four_by_one = train(tmp_path / "b", [*common, "trainer.micro_batch_size=4"])
    assert_close(loss_list(one_by_four), loss_list(four_by_one), rel=1e-5)


def test_bf16_trains_on_two_ranks_with_zero2(tmp_path: Path) -> None:
    """...and the finished ranks leave through dist.finish, without the interpreter's
    teardown, where gloo's threads sometimes aborted a finished rank (SIGABRT)."""
    probe = tmp_path / "probe"
    metrics = train(
        tmp_path / "run",
        ["precision=bf16", "deepspeed=zero2", "trainer.max_steps=30", "optim.lr=3e-3",
         "optim.warmup_steps=3"],
        nproc=2, env=teardown_probe(probe),
    )  # fmt: skip
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert sum(loss_list(metrics)[-5:]) / 5 < 0.8 * metrics[0]["loss"]
    assert tore_down(probe, ranks=2) == []


def test_zero3_parameters_are_born_sharded() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
         str(REPO / "tests" / "train" / "zero3_probe.py")],
        cwd=REPO, env={**subprocess_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Two ranks print at once, so lines may interleave: match the reports, not the lines.
    reports = re.findall(r"rank (\d): holds (\d+) of (\d+) parameters", proc.stdout)
    assert sorted(r[0] for r in reports) == ["0", "1"]
    for _, held, total in reports:
        assert int(held) < 0.6 * int(total)  # each rank holds about half
    # deepspeed.stage3_leaf_modules=[Block]: one fetch per block, none inside it.
    hooks = re.findall(r"rank 0 hooks: (.*?)(?:rank \d|$)", proc.stdout, re.MULTILINE)
    assert len(hooks) == 1, proc.stdout
    names = hooks[0].split()
    assert {"layers.0", "layers.1", "lm_head"} <= set(names)
    assert not [n for n in names if n.startswith("layers.") and n.count(".") > 1], names
    # DeepSpeed's memory_efficient_linear replaces torch.nn.functional.linear for the whole
    # process; off by default (deepspeed.stage3_memory_efficient_linear): 14-23% of a ZeRO-3
    # step on CPU, docs/performance.md.
    assert "rank 0 linear: torch._C._nn\n" in proc.stdout, proc.stdout
    assert "rank 0 devices: 2\n" in proc.stdout, proc.stdout


def test_demo_corpus_trains_from_a_clean_data_dir(tmp_path: Path) -> None:
    """data=demo builds the stdlib corpus on first use, then the loss falls on it."""
    data_dir = tmp_path / "data"
    args = [
        "model=tiny", "data=demo", "trainer.device=cpu", "logger.wandb.mode=disabled",
        f"run_dir={tmp_path / 'run'}", "trainer.max_steps=40", "trainer.global_batch_size=8",
        "trainer.micro_batch_size=8", "trainer.seq_len=64", "optim.lr=3e-3",
        "optim.warmup_steps=5", "data.max_bytes=1000000",
    ]  # fmt: skip
    env = {**subprocess_env(), "PRETRAIN_DATA_DIR": str(data_dir)}
    proc = subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (data_dir / "demo" / "tokenizer.json").is_file()
    assert (data_dir / "demo" / "shards" / "manifest.json").is_file()
    losses = loss_list(read_metrics(tmp_path / "run"))
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


@pytest.mark.parametrize("sequence", [1, 2])
def test_demo_corpus_is_built_once_for_two_ranks(tmp_path: Path, sequence: int) -> None:
    """Rank 0 builds the cache while rank 1 waits (at a barrier; as the other rank of a
    sequence group, both data rank 0, at the cache's lock); both then train on it."""
    data_dir = tmp_path / "data"
    args = [
        "model=tiny", "data=demo", "data.max_bytes=300000", "trainer.device=cpu",
        "logger.wandb.mode=disabled", f"run_dir={tmp_path / 'run'}", "trainer.max_steps=5",
        f"trainer.global_batch_size={4 // sequence}", "trainer.micro_batch_size=2",
        "trainer.seq_len=32", f"parallel.sequence={sequence}",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "pretrain",
           *args]  # fmt: skip
    env = {**subprocess_env(), "PRETRAIN_DATA_DIR": str(data_dir)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(read_metrics(tmp_path / "run")) == 5
    # Rank 0 logs; as a sequence group's second rank, rank 1 may have built it (unlogged).
    built = (proc.stdout + proc.stderr).count("building the demo corpus")
    assert built == 1 if sequence == 1 else built <= 1
