"""The README's exit-code table, row by row: each example command is run as written (from a
scratch directory, so `runs/` lands there) and must exit with its row's code, with one
message and no traceback; a row whose example is a test names one that exists and asserts
that code."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, subprocess_env

pytestmark = pytest.mark.multiprocess


def table() -> list[tuple[str, list[str]]]:
    """(code, examples) of each row of the README's exit-code table."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("### Exit codes") :]
    section = section[: section.index("\n## ")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("code", "---"):
            rows.append((cells[0], re.findall(r"`([^`]+)`", cells[2])))
    return rows


def _test_exists(ref: str) -> bool:
    path, _, name = ref.partition("::")
    return (REPO / path).is_file() and (not name or f"def {name}(" in (REPO / path).read_text())


def test_the_table_lists_every_code_with_an_example() -> None:
    codes = [code for code, _ in table()]
    assert codes == ["0", "1", "2", "3", "4", "5", "75", "128 + N", "124"]
    for code, examples in table():
        assert examples, code
        for example in examples:
            if example.startswith("tests/"):
                assert _test_exists(example), example


@pytest.mark.parametrize(
    ("code", "command"),
    [(code, cmd) for code, examples in table() for cmd in examples if cmd.startswith("python")],
)
def test_each_example_command_exits_with_its_code(tmp_path: Path, code: str, command: str) -> None:
    # As written; on CPU even on a GPU machine, W&B off (subprocess_env).
    proc = subprocess.run(
        command.split(), cwd=tmp_path, env={**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    said = proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.returncode == int(code), said
    assert "Traceback" not in proc.stderr, said
    if code == "2":
        assert not (tmp_path / "runs").exists(), "a refused config made a run dir"
    if code != "0":
        assert "ERROR" in proc.stderr, said
