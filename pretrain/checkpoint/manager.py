"""Save a checkpoint: DeepSpeed's sharded `save_checkpoint` plus our state as client_state.

Every rank must call `save`; each writes its own ZeRO shards under `<dir>/step_<N>/`.
Crash-safe commit markers, retention and auto-resume come with the checkpoint issue.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("pretrain")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save(engine: Any, directory: Path, step: int, client_state: dict[str, Any]) -> Path:
    """Write `directory/step_<step>` (collective: call on every rank). Returns its path."""
    tag = f"step_{step}"
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state)
    log.info("saved checkpoint %s", directory / tag)
    return directory / tag
