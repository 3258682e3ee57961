"""tools/bench_moe.py times a sparse block both ways and prints the ratio last."""

from __future__ import annotations

import re
import sys

import pytest

from tests.conftest import REPO


def test_bench_moe_prints_both_ways_and_the_ratio_last(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import bench_moe

    bench_moe.main(["--model", "moe_tiny", "--tokens", "256", "--steps", "2", "--device", "cpu",
                    "--dtype", "fp32"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("moe_tiny sparse block: 256 tokens x d 64, 8 experts")
    assert [line.split(":")[0].strip() for line in lines[1:3]] == ["loop", "grouped_mm"]
    assert re.fullmatch(r"grouped_mm/loop speed ratio: \d+\.\d\d", lines[-1])
    assert float(lines[-1].split()[-1]) > 0
    sys.modules.pop("bench_moe")
