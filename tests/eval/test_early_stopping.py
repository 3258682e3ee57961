"""Early stopping on validation loss, through the real CLI, and a resume that stays stopped."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.checkpoint import manager
from tests.conftest import TINY, launch, read_metrics

pytestmark = pytest.mark.multiprocess

# Evaluations at steps 2, 4, ...; an improvement must beat the best by 100 nats, so only the
# first evaluation ever improves and patience 1 runs out at the second.
RUN = ["trainer.max_steps=10", "trainer.eval_every_steps=2", "trainer.eval_tokens=256",
       "trainer.early_stopping_patience=1", "trainer.early_stopping_min_delta=100"]  # fmt: skip


def test_patience_stops_saves_and_a_resume_stays_stopped(tmp_path: Path) -> None:
    first = launch([*TINY, f"run_dir={tmp_path}", *RUN])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "early stopping at step 4: val_loss" in first.stderr
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    (ckpt,) = manager.complete_checkpoints(tmp_path / "checkpoints")
    state = manager.read_client_state(ckpt)["trainer"]
    assert ckpt.name == "step_4" and state["stopped_early"] and state["best_val_step"] == 2
    again = launch([*TINY, f"run_dir={tmp_path}", *RUN])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stopped early at step 4" in again.stderr
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_early_stopping_needs_evaluations() -> None:
    from pretrain.config import ConfigError, resolve
    from tests.conftest import compose_config

    with pytest.raises(ConfigError, match=r"early_stopping_patience=3 needs evaluations"):
        resolve(compose_config(["trainer.early_stopping_patience=3"]), 1, cuda_available=False)
    with pytest.raises(ConfigError, match=r"eval_data names \['a-b'\]"):
        resolve(compose_config(["trainer.eval_every_steps=2", "+trainer.eval_data={a-b: x}"]), 1,
                cuda_available=False)  # fmt: skip
