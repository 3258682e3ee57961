"""Crash-safe checkpoints: DeepSpeed's sharded save, per-rank state, and a commit marker.

Layout of `<run_dir>/checkpoints/step_<N>/`: DeepSpeed's model and ZeRO optimizer shards,
`rank_<r>.pt` per rank (data loader state and RNG states, which differ between ranks), and
`client_state.json` (trainer state and resolved config, readable without DeepSpeed), and
`COMMITTED.json`, written last by rank 0 after every rank has finished and fsynced its files:
the list of files with their sizes. A directory without a valid marker is not a checkpoint;
loading picks the newest one that has one. The saver imports nothing from `train/`: it saves
any object with `state_dict()` / `load_state_dict()`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

log = logging.getLogger("pretrain")

MARKER = "COMMITTED.json"
CLIENT_STATE = "client_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def _barrier() -> None:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    engine: Any,
    directory: Path,
    step: int,
    client_state: dict[str, Any],
    rank_state: dict[str, Any],
    files: dict[str, str] | None = None,
) -> Path:
    """Write and commit `directory/step_<step>` (collective: call on every rank).

    `client_state` is the same on every rank (rank 0's copy is kept); `rank_state` is this
    rank's own (data position, RNG); `files` ({name: text}) are written by rank 0 beside them
    (the tokenizer). Raises if any part fails; the marker is then never
    written, so the previous complete checkpoint stays the one that loads.
    """
    tag = f"step_{step}"
    path = directory / tag
    if _rank() == 0 and path.exists():  # debris of a killed save, or a step saved before
        (path / MARKER).unlink(missing_ok=True)  # first: never complete while half-deleted
        shutil.rmtree(path)  # no stale files (another world size's) may join the new marker
    _barrier()
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    torch.save({**rank_state, "rng": rng_state()}, path / f"rank_{_rank()}.pt")
    if _rank() == 0:  # readable before loading anything: resume checks the model shape first
        (path / CLIENT_STATE).write_text(json.dumps(client_state, default=str))
        for name, text in (files or {}).items():
            (path / name).write_text(text)
    _fsync_tree(path)
    _barrier()  # every rank's files are on disk
    if _rank() == 0:
        listed = {
            str(f.relative_to(path)): f.stat().st_size
            for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != MARKER
        }
        tmp = path / f".{MARKER}.tmp"
        with tmp.open("w") as fh:
            json.dump({"step": step, "files": listed}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path / MARKER)
        dir_fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself is durable
        finally:
            os.close(dir_fd)
        log.info("saved checkpoint %s", path)
    _barrier()
    return path


def is_complete(path: Path) -> bool:
    """True when `path` has a commit marker and every file it lists, at its size."""
    try:
        marker = json.loads((path / MARKER).read_text())
        return all((path / f).stat().st_size == size for f, size in marker["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints under `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := STEP_DIR.match(p.name)) and is_complete(p)
    ]
    return [p for _, p in sorted(found)]


def read_client_state(path: Path) -> dict[str, Any]:
    """The trainer state and resolved config saved with checkpoint `path`, without loading it."""
    return json.loads((path / CLIENT_STATE).read_text())


def load(engine: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load checkpoint `path` into `engine`; returns (client_state, this rank's state).

    Restores this rank's RNG states too. The caller restores its own objects from the dicts.
    """
    if not is_complete(path):
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (no valid {MARKER}): it was interrupted while "
            "saving; resume from an earlier one, or use checkpoint.resume=auto"
        )
    rank_file = path / f"rank_{_rank()}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(
            f"{rank_file} is missing: {path} was saved by fewer ranks than this run has"
        )
    _, client_state = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return client_state or {}, rank_state


def prune(directory: Path, keep_last: int, keep_every: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, except multiples of
    `keep_every` (0: none kept for good). Rank 0 only; never touches incomplete ones."""
    if _rank() != 0 or keep_last <= 0:
        return
    ckpts = complete_checkpoints(directory)
    for path in ckpts[:-keep_last]:
        step = int(STEP_DIR.match(path.name).group(1))
        if keep_every and step % keep_every == 0:
            continue
        (path / MARKER).unlink()  # first: a half-deleted checkpoint must not look complete
        shutil.rmtree(path)
