"""tools/plot_metrics.py and tools/compare_runs.py on run dirs written by our JSONL logger."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pretrain.train.loggers import JsonlLogger
from tests.conftest import REPO


def fake_run(run_dir: Path, steps: int, loss0: float, tokens_per_s: float) -> None:
    """metrics.jsonl as a training run writes it, with a config.yaml beside it."""
    logger = JsonlLogger(run_dir / "metrics.jsonl")
    for step in range(1, steps + 1):
        logger.log({
            "loss": loss0 / step, "lr": 1e-3 * min(step, 5) / 5, "grad_norm": 1.0,
            "tokens": 1000 * step, "skipped_steps": 0, "step_time_s": 1000 / tokens_per_s,
            "data_wait_s": 100 / tokens_per_s, "compute_s": 900 / tokens_per_s,
            "tokens_per_s": tokens_per_s * (0.5 if step == 1 else 1.0),
            "tokens_per_s_per_gpu": tokens_per_s / 2, "mfu": tokens_per_s / 1e5,
        }, step)  # fmt: skip
        if step % 5 == 0:
            logger.log({"val_loss": loss0 / step + 0.1, "val_ppl": 2.0}, step)
    logger.close()
    (run_dir / "config.yaml").write_text("derived:\n  world_size: 2\n")


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    fake_run(tmp_path / "a", steps=20, loss0=8.0, tokens_per_s=4000.0)
    fake_run(tmp_path / "b", steps=10, loss0=6.0, tokens_per_s=5000.0)
    return [tmp_path / "a", tmp_path / "b"]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_metrics_draws_both_runs_at_the_asked_size(two_runs: list[Path], tmp_path: Path):
    out = tmp_path / "plots" / "curves.png"
    proc = tool("plot_metrics.py", *two_runs, "--output", out, "--size", "800x500")
    assert proc.returncode == 0, proc.stderr
    assert png_size(out) == (800, 500) and out.stat().st_size > 10_000
    import matplotlib.image

    pixels = matplotlib.image.imread(out)[..., :3]
    for color in ("#1f77b4", "#ff7f0e"):  # the first two default line colours: runs a and b
        rgb = np.array([int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).max(axis=-1) < 0.02).sum() > 200, f"no line in {color}"


def test_plot_metrics_names_a_missing_run(tmp_path: Path) -> None:
    proc = tool("plot_metrics.py", tmp_path / "nope", "--output", tmp_path / "x.png")
    assert proc.returncode == 2 and "nope: no metrics.jsonl there" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_compare_runs_final_metrics_by_hand(two_runs: list[Path]) -> None:
    # A run killed mid-write leaves a torn last line: it is ignored.
    with (two_runs[1] / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "lo')
    proc = tool("compare_runs.py", *two_runs, "--format", "json", "--last", "4")
    assert proc.returncode == 0, proc.stderr
    a, b = json.loads(proc.stdout)
    assert (a["run"], a["steps"], a["tokens"], a["world_size"]) == ("a", 20, 20_000, 2)
    assert a["final_loss"] == pytest.approx(np.mean([8 / s for s in (17, 18, 19, 20)]))
    assert a["min_loss"] == pytest.approx(8 / 20)
    assert a["val_loss"] == pytest.approx(8 / 20 + 0.1) and a["val_ppl"] == 2.0
    assert a["tokens_per_s"] == 4000.0  # the median: step 1's slow warm-up does not count
    assert a["mfu"] == pytest.approx(0.04) and a["data_wait_share"] == pytest.approx(0.1)
    assert a["train_hours"] == pytest.approx(20 * 0.25 / 3600)
    assert (b["steps"], b["tokens_per_s"]) == (10, 5000.0)
    table = tool("compare_runs.py", *two_runs, "--sort", "final_loss").stdout.splitlines()
    assert table[0].split()[:4] == ["run", "steps", "tokens", "ranks"]
    assert [line.split()[0] for line in table[1:]] == ["a", "b"]  # a's loss ends lower
    md = tool("compare_runs.py", *two_runs, "--format", "markdown").stdout.splitlines()
    assert md[0].startswith("| run | steps |") and md[1].startswith("|---|---:|")
    assert "| 4,000 |" in md[2] and "| 4.0% |" in md[2]
