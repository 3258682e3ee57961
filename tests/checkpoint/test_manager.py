"""The commit protocol on its own: a failed save never hides or harms the last good one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pretrain.checkpoint import manager


class FakeEngine:
    """Writes a shard file like DeepSpeed would; can be told to fail half-way (disk full)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_checkpoint(
        self, directory: str, tag: str, client_state: dict, save_latest: bool
    ) -> None:
        path = Path(directory) / tag
        path.mkdir(parents=True, exist_ok=True)
        (path / "mp_rank_00_model_states.pt").write_bytes(b"weights" * 100)
        if self.fail:
            raise OSError(28, "No space left on device")


def _save(directory: Path, step: int, engine: Any) -> Path:
    return manager.save(engine, directory, step, {"trainer": {"step": step}}, {"data": {}})


def test_failed_save_leaves_the_previous_checkpoint_the_newest_complete(tmp_path: Path) -> None:
    good = _save(tmp_path, 2, FakeEngine())
    with pytest.raises(manager.CheckpointError, match=f"no space left on {tmp_path} while "
                       "saving step_4 .* the previous checkpoint, step_2, takes"):  # fmt: skip
        _save(tmp_path, 4, FakeEngine(fail=True))
    assert (tmp_path / "step_4").is_dir()  # the debris is there ...
    assert manager.complete_checkpoints(tmp_path) == [good]  # ... but never counts
    assert manager.read_client_state(good)["trainer"]["step"] == 2


def test_resaving_a_step_uncommits_it_first(tmp_path: Path) -> None:
    path = _save(tmp_path, 2, FakeEngine())
    assert manager.is_complete(path)
    with pytest.raises(manager.CheckpointError):  # the fake fails as a full disk does
        _save(tmp_path, 2, FakeEngine(fail=True))
    assert not manager.is_complete(path)


def test_load_refuses_an_incomplete_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "step_9").mkdir()
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        manager.load(object(), tmp_path / "step_9")


def test_which_layout_changes_convert_and_which_are_refused(tmp_path: Path) -> None:
    from pretrain.checkpoint.reshard import needs_universal

    assert not needs_universal((2, 3), (2, 3), tmp_path)  # same layout: DeepSpeed loads it
    assert not needs_universal((2, 0), (1, 0), tmp_path)  # ZeRO-0 is replicated
    assert needs_universal((2, 3), (1, 1), tmp_path)
    assert needs_universal((1, 2), (4, 2), tmp_path)
    with pytest.raises(ValueError, match="zero_stage=0; this run has zero_stage=2"):
        needs_universal((1, 0), (1, 2), tmp_path)
