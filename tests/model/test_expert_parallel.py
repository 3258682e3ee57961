"""Expert parallelism's token exchange (pretrain/model/expert_parallel.py) on real ranks:
the block with its experts split over 2 and 4 gloo ranks equals the whole block (outputs,
gradients of the input, the router and each rank's experts), with both ways of running the
experts. The script is tests/model/expert_parallel_check.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.model.expert_parallel import expert_parallel_errors
from tests.conftest import REPO, free_port, subprocess_env

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize(("nproc", "impl"), [(2, "grouped_mm"), (2, "loop"), (4, "grouped_mm")])
def test_split_experts_equal_the_whole_block(tmp_path: Path, nproc: int, impl: str) -> None:
    out = tmp_path / "sent"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
         str(REPO / "tests" / "model" / "expert_parallel_check.py"), impl, str(out)],
        cwd=REPO, env={**subprocess_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    sent = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(nproc)]
    for r in sent:  # every slot went somewhere, and the exchange was not trivial
        assert sum(r["sent"]) == 2 * r["tokens"]
        assert sum(n > 0 for n in r["sent"]) > 1


def test_experts_that_do_not_split_evenly_are_named() -> None:
    assert expert_parallel_errors(8, 4) == []
    (err,) = expert_parallel_errors(6, 4)
    assert "model.n_experts=6 is not divisible by parallel.expert=4" in err
