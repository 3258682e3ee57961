"""tools/bench_data.py compares the loader with nanoGPT's memmap loader in one run."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO, subprocess_env


def test_bench_data_prints_the_ratio_last() -> None:
    proc = subprocess.run(
        [sys.executable, "tools/bench_data.py", "--tokens", "2000000", "--batches", "10",
         "--seq-len", "256"],
        cwd=REPO, env={**subprocess_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"loader/memmap ratio: \d+\.\d\d", lines[-1])
    assert float(lines[-1].split()[-1]) > 0
    assert any(line.startswith("loader, 2 workers:") for line in lines)
