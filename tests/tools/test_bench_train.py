"""tools/bench_train.py runs real steps per variant and reports them against the baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, subprocess_env


def test_bench_reports_every_variant_against_the_last(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "tools/bench_train.py", "--steps", "2", "--warmup", "1",
         "--variant", "sdpa:model.attn_impl=sdpa", "--variant", "eager:model.attn_impl=eager",
         "--json", str(out), "trainer.device=cpu", "trainer.seq_len=32"],
        cwd=REPO, env={**subprocess_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results] == ["sdpa", "eager"]
    assert [r["attn"] for r in results] == ["sdpa", "eager"]
    assert all(r["tokens_per_s"] > 0 and r["step_time_s"] > 0 for r in results)
    assert proc.stdout.rstrip().endswith("1.00x")  # the baseline against itself
