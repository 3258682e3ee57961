"""tools/bench_optim.py times the offloaded AdamW step per kernel and prints the ratio last."""

from __future__ import annotations

import re
import sys

import pytest

from tests.conftest import REPO


def test_bench_optim_prints_each_kernel_and_the_ratio_last(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import bench_optim

    bench_optim.main(["--params", "2e6", "--steps", "3", "--impls", "fused", "foreach"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("AdamW step on CPU: 2,000,000 fp32 parameters")
    assert [line.split(":")[0].strip() for line in lines[1:3]] == ["fused", "foreach"]
    assert re.fullmatch(r"fused/foreach speed ratio: \d+\.\d\d", lines[-1])
    assert float(lines[-1].split()[-1]) > 0
    with pytest.raises(SystemExit):  # no baseline to compare with
        bench_optim.main(["--impls", "fused"])
    sys.modules.pop("bench_optim")
