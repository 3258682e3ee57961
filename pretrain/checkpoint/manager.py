"""Crash-safe checkpoints: DeepSpeed's sharded save, per-rank state, and a commit marker.

Layout of `<run_dir>/checkpoints/step_<N>/`: DeepSpeed's model and ZeRO optimizer shards,
`rank_<r>.pt` per rank (data loader state and RNG states, which differ between ranks), and
`client_state.json` (trainer state and resolved config, readable without DeepSpeed), and
`COMMITTED.json`, written last by rank 0 after every rank has finished and fsynced its files:
the list of files with their sizes and CRC-32s (the ranks hash a share of the files each). A
directory without a valid marker is not a checkpoint. Resuming picks the newest complete one
whose files match their checksums (`choose_resume`), saying which newer ones it skipped and
why. Everything is loaded with `torch.load(weights_only=True)` (`safe_loading`): tensors,
plain types and a short allowlist of DeepSpeed's and numpy's data classes, so a crafted file
cannot run code. The saver imports nothing from `train/`: it saves any object with
`state_dict()` / `load_state_dict()`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from pretrain.data.shards import file_crc32

log = logging.getLogger("pretrain")

MARKER = "COMMITTED.json"
CLIENT_STATE = "client_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or loaded: the message names the path and the fix."""


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
    try:
        engine.save_checkpoint(str(directory), tag=tag, client_state=client_state,
                               save_latest=False)  # fmt: skip
        torch.save({**rank_state, "rng": rng_state()}, path / f"rank_{_rank()}.pt")
        if _rank() == 0:  # readable before loading anything: resume checks the model shape first
            (path / CLIENT_STATE).write_text(json.dumps(client_state, default=str))
            for name, text in (files or {}).items():
                (path / name).write_text(text)
        _fsync_tree(path)
    except (OSError, RuntimeError) as e:
        raise _save_failed(e, path, directory) from e
    _barrier()  # every rank's files are on disk
    listed = _checksums(path)
    if _rank() == 0:
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


DISK_FULL_FREE = 64 << 20
"""A save that fails with less than this free on its file system failed for lack of space
(torch.save reports a full disk as `enforce fail ... unexpected pos`, without an errno)."""


def _save_failed(e: Exception, path: Path, directory: Path) -> Exception:
    """The error to raise for a failed save: "no space left on <path>" with the size needed
    when the disk is full; the original error otherwise."""
    free = shutil.disk_usage(directory).free if directory.exists() else 0
    full = isinstance(e, OSError) and e.errno == errno.ENOSPC
    if not (full or free < DISK_FULL_FREE or "No space left" in str(e)):
        return e
    previous = complete_checkpoints(directory)
    size = _tree_size(previous[-1]) if previous else None
    written = _tree_size(path) if path.exists() else 0
    need = (f"the previous checkpoint, {previous[-1].name}, takes {_size(size)}"
            if size else f"{_size(written)} were written before it failed")  # fmt: skip
    return CheckpointError(
        f"no space left on {directory} while saving {path.name} ({_size(free)} free; "
        f"{need}, and each save needs as much again until the oldest is pruned). Free space "
        "or lower checkpoint.keep_last, then run the same command to resume from the newest "
        "complete checkpoint (an interrupted save never counts)"
    )


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return ""


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _listing(path: Path) -> list[str]:
    ours = (MARKER, f".{MARKER}.tmp")
    return [str(f.relative_to(path)) for f in sorted(path.rglob("*"))
            if f.is_file() and f.name not in ours]  # fmt: skip


def _my_share(names: list[str]) -> list[str]:
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    return names[_rank() :: world]


def _gather(mine: dict[str, Any]) -> dict[str, Any]:
    """Every rank's dict, merged (collective)."""
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return mine
    parts: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _checksums(path: Path) -> dict[str, dict[str, Any]]:
    """{file: {size, crc32}} of the checkpoint's files; each rank hashes a share (collective)."""
    mine = {n: {"size": (path / n).stat().st_size, "crc32": file_crc32(path / n)}
            for n in _my_share(_listing(path))}  # fmt: skip
    return dict(sorted(_gather(mine).items()))


def verify(path: Path) -> list[str]:
    """What is wrong with the files of complete checkpoint `path` against the checksums its
    marker records (collective: each rank reads a share); [] when nothing is."""
    listed = json.loads((path / MARKER).read_text())["files"]
    problems = {}
    for name in _my_share(sorted(listed)):
        entry = listed[name]
        if not isinstance(entry, dict) or "crc32" not in entry:
            continue  # a marker from before checksums: sizes only (is_complete)
        try:
            actual = file_crc32(path / name)
        except OSError as e:
            problems[name] = f"{name} cannot be read ({e.strerror or e})"
            continue
        if actual != entry["crc32"]:
            problems[name] = f"{name} fails its checksum (crc32 {actual}, saved {entry['crc32']})"
    gathered = _gather(problems)
    return [gathered[k] for k in sorted(gathered)]


def choose_resume(directory: Path, check: bool) -> Path | None:
    """The checkpoint `checkpoint.resume=auto` resumes from: the newest complete one whose
    files pass `verify` (when `check`), saying which newer ones it skipped and why. None
    when there is none at all; an error when every complete one fails its checksums."""
    found = directory.iterdir() if directory.is_dir() else ()
    steps = sorted(((int(m.group(1)), p) for p in found if (m := STEP_DIR.match(p.name))),
                   reverse=True)  # fmt: skip
    failed = []
    for _, path in steps:
        why = incomplete_reason(path)
        if why:
            log.warning("not resuming from %s: %s", path, why)
            continue
        problems = verify_timed(path) if check else []
        if not problems:
            return path
        failed.append(path)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        log.warning("not resuming from %s: %s%s; trying the one before", path, problems[0], more)
    if failed:
        raise CheckpointError(
            f"every complete checkpoint in {directory} fails its checksums ({len(failed)}): "
            "the storage corrupted them. Restore them from a copy, or start over with "
            "checkpoint.resume=none (checkpoint.verify=false loads them unchecked)"
        )
    return None


def verify_timed(path: Path) -> list[str]:
    """`verify`, logging what it read and how long it took (rank 0)."""
    t0 = time.perf_counter()
    problems = verify(path)
    listed = json.loads((path / MARKER).read_text())["files"]
    total = sum(e["size"] if isinstance(e, dict) else e for e in listed.values())
    log.info("verified %s: %d files, %s in %.2f s (checkpoint.verify=false skips this)",
             path.name, len(listed), _size(total), time.perf_counter() - t0)  # fmt: skip
    return problems


def incomplete_reason(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (no marker, a file missing or of another size
    than the marker lists), or None when it is complete."""
    try:
        marker = json.loads((path / MARKER).read_text())
        files = marker["files"]
    except FileNotFoundError:
        return f"no {MARKER}: its save was interrupted"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MARKER} is unreadable ({e})"
    for name, entry in files.items():
        size = entry["size"] if isinstance(entry, dict) else entry
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual:,} bytes, not the {size:,} saved"
    return None


def is_complete(path: Path) -> bool:
    """True when `path` has a commit marker and every file it lists, at its size."""
    return incomplete_reason(path) is None


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


def _allowlist() -> list[Any]:
    """The classes beyond tensors and plain types that checkpoints hold: DeepSpeed's optimizer
    state (its ZeRO stage enum, loss scalers, fragment addresses) and numpy's RNG state
    arrays. Each is data: unpickling one runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    multiarray = getattr(np, "_core", None) or np.core  # numpy 2 | 1
    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address,
            multiarray.multiarray._reconstruct, np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]  # fmt: skip


@contextmanager
def safe_loading(what: Path) -> Iterator[None]:
    """Every torch.load inside, ours and DeepSpeed's (which asks for weights_only=False), runs
    with weights_only=True and `_allowlist()`: a file holding anything else is refused with a
    CheckpointError naming `what`, instead of running the code a pickle can carry."""
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {k: os.environ.pop(k, None) for k in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_allowlist()):
            yield
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)|global[^`]*`([\w.]+)`", str(e))
        name = next((g for g in found.groups() if g), "?") if found else "?"
        raise CheckpointError(
            f"refused to load {what}: a file in it holds a Python object that is not data "
            f"({name}), and unpickling it could run code. Checkpoints this framework writes "
            "never do: the file was altered or made by another program. Load only checkpoints "
            "you trust; convert a foreign one to safetensors or a Hugging Face directory first"
        ) from e
    finally:
        del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        os.environ.update({k: v for k, v in saved.items() if v is not None})


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
    with safe_loading(path):
        _, client_state = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )  # fmt: skip
        rank_state = torch.load(rank_file, weights_only=True, mmap=True)
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
