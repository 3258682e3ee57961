"""tools/record_losses.py's comparison: equal recordings pass, a difference beyond the
tolerance or a missing step is reported. (The runs themselves are the training tests'.)"""

from __future__ import annotations

import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import record_losses


def test_compare_reports_differences_beyond_the_tolerance() -> None:
    base = {"a": [[1, 6.0, 1.0], [2, 5.0, 0.5]]}
    assert (
        record_losses.compare(base, {"a": [[1, 6.0, 1.0], [2, 5.0 * (1 + 5e-7), 0.5]]}, 1e-6) == []
    )
    found = record_losses.compare(base, {"a": [[1, 6.0, 1.0], [2, 5.0 * (1 + 2e-6), 0.5]]}, 1e-6)
    assert len(found) == 1 and found[0].startswith("a step 2 loss:")
    assert (
        "steps [1], recorded [1, 2]" in record_losses.compare(base, {"a": [[1, 6.0, 1.0]]}, 1e-6)[0]
    )
    assert record_losses.compare(base, {}, 1e-6) == ["a: steps [], recorded [1, 2]"]
