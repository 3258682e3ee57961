"""tools/bench_loss.py times the output-head loss three ways and prints the ratio last."""

from __future__ import annotations

import re
import sys

import pytest

from tests.conftest import REPO


def test_bench_loss_prints_each_case_and_the_ratio_last(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import bench_loss

    bench_loss.main(["--model", "tiny", "--tokens", "600", "--steps", "2", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("tiny head: 600 tokens x d ")
    assert [line.split(":")[0].strip() for line in lines[1:4]] == ["full", "chunked", "compiled"]
    assert re.fullmatch(r"compiled/full speed ratio: \d+\.\d\d", lines[-1])
    assert float(lines[-1].split()[-1]) > 0
    sys.modules.pop("bench_loss")
