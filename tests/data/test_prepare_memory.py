"""prepare_data's memory does not grow with the corpus: a corpus 10x larger peaks at about
the same resident memory, in the reading and writing process and in the tokenizing workers.
That is what lets a corpus larger than RAM through (it streams: a record batch or a line at a
time in, at most two batches per worker in flight, a tar member at a time out)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, subprocess_env

pytest.importorskip("pyarrow")


def peak(tmp_path: Path, mb: float) -> dict[str, float]:
    root = tmp_path / f"{mb}mb"
    root.mkdir()
    env = {**subprocess_env(), "PYTHONPATH": str(REPO)}
    del env["OMP_NUM_THREADS"]  # pyarrow sizes its thread pool by it: keep the default's
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests/data/prepare_peak.py"), str(mb), str(root)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow
def test_memory_stays_flat_as_the_corpus_grows(tmp_path: Path) -> None:
    small, large = peak(tmp_path, 3), peak(tmp_path, 30)
    assert large["tokens"] > 9 * small["tokens"]  # the bytes tokenizer: a token per byte
    # Holding the corpus, its tokens, or its batches would add >= 27 MB (a whole-file read
    # of the parquet added 33 MB here, with pyarrow's threads); allocator noise is under ~10.
    for who in ("main_mb", "worker_mb"):
        grew = large[who] - small[who]
        assert grew < 13.5, f"{who}: {small[who]:.0f} MB at 3 MB of corpus, {large[who]:.0f} at 30"
