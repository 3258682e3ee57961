"""tools/bench_prepare.py times prepare_data against the tokenizer's ceiling in one run."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO, subprocess_env


def test_bench_prepare_prints_the_ratio_last() -> None:
    proc = subprocess.run(
        [sys.executable, "tools/bench_prepare.py", "--mb", "0.5", "--vocab-size", "600",
         "--repeats", "1"],
        cwd=REPO, env={**subprocess_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"prepare/ceiling ratio: \d+\.\d{3}", lines[-1])
    assert re.fullmatch(r"2 workers / 1 worker: \d+\.\d\d", lines[-2])
    rows = {line.split("  ")[0] for line in lines[1:-2]}
    assert rows == {"encode_batch (offsets)", "ceiling", "prepare 1 worker(s)",
                    "prepare 2 worker(s)"}  # fmt: skip
    assert all(float(line.split()[-1]) > 0 for line in lines[-2:])
