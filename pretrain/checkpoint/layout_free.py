"""Resume across expert layouts: a checkpoint's layout-free state, set into an engine of any
layout, expert-parallel or not.

DeepSpeed's universal conversion (checkpoint/reshard.py) does not know expert groups: it
fails on an expert-parallel checkpoint, and its loader cannot split experts over ranks. So
when `parallel.expert` or the layout of an expert-parallel run changes, every parameter's
full fp32 value and Adam moments are read from where the checkpoint keeps them
(`SavedValues`), this rank's share is cut out (its experts, at `parallel.expert`), and the
engine takes it (engine/full_state.py), with the Adam step count, the LR schedule's
position and the module's buffers:
- an expert-parallel checkpoint keeps them in its rank files (`ExpertRankFiles`;
  engine/expert_groups.py `ExpertCheckpoint` writes them);
- a checkpoint without expert parallelism (ZeRO 1-3), in its universal conversion
  (`UniversalFiles`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from pretrain.engine.expert_groups import local_experts
from pretrain.engine.full_state import KEYS, MOMENTS, prepare, set_adam_step, set_full_values

EXPERT_MOMENTS = "expert_moments"
"""The rank-file key of an expert-parallel checkpoint's expert Adam moments."""


class SavedValues(Protocol):
    """A checkpoint's layout-free state."""

    step: float
    """The Adam step count."""

    def get(self, name: str, experts: range | None) -> dict[str, torch.Tensor]:
        """Parameter `name`'s full values ({fp32, exp_avg, exp_avg_sq}, fp32); with
        `experts`, an expert parameter's rows of those experts only (dim 0)."""
        ...

    def buffers(self) -> dict[str, torch.Tensor]:
        """The module's saved persistent buffers, by name."""
        ...


def _rows(pieces: list[torch.Tensor], wanted: range | None) -> torch.Tensor:
    """Rows `wanted` (all: None) of the concatenation of equal-sized `pieces`, reading
    only the pieces that hold them."""
    per = pieces[0].size(0)
    wanted = range(per * len(pieces)) if wanted is None else wanted
    return torch.cat([
        piece[max(wanted.start - i * per, 0) : min(wanted.stop - i * per, per)]
        for i, piece in enumerate(pieces)
        if wanted.start < (i + 1) * per and wanted.stop > i * per
    ])  # fmt: skip


class ExpertRankFiles:
    """An expert-parallel checkpoint's state: the dense part in rank 0's file, each expert
    shard in its rank's of the first expert group (`size` ranks), memory-mapped."""

    def __init__(self, path: Path, size: int) -> None:
        self.ranks = [torch.load(path / f"rank_{r}.pt", map_location="cpu", weights_only=True,
                                 mmap=True) for r in range(size)]  # fmt: skip
        self.step = float(self.ranks[0]["adam_step"])

    def get(self, name: str, experts: range | None) -> dict[str, torch.Tensor]:
        first = self.ranks[0]
        if name in first["experts"]:
            pieces = {"fp32": [r["experts"][name] for r in self.ranks]}
            pieces.update({k: [r[EXPERT_MOMENTS][name][k] for r in self.ranks] for k in MOMENTS})
            return {k: _rows(v, experts) for k, v in pieces.items()}
        return {"fp32": first["dense"][name], **first["dense_moments"][name]}

    def buffers(self) -> dict[str, torch.Tensor]:
        moments = self.ranks[0]["dense_moments"]
        return {n: t for n, t in self.ranks[0]["dense"].items() if n not in moments}


class UniversalFiles:
    """DeepSpeed's universal conversion of a checkpoint without expert parallelism
    (reshard.convert): one directory per parameter."""

    def __init__(self, universal: Path) -> None:
        self.root = universal
        self.step = float(torch.load(next((universal / "zero").glob("*/step.pt")),
                                     weights_only=True))  # fmt: skip

    def get(self, name: str, experts: range | None) -> dict[str, torch.Tensor]:
        values = {}
        for key in KEYS:
            value = torch.load(self.root / "zero" / name / f"{key}.pt", weights_only=True)
            value = value["param"] if isinstance(value, dict) else value  # reshard._normalize
            values[key] = value if experts is None else value[experts.start : experts.stop]
        return values

    def buffers(self) -> dict[str, torch.Tensor]:
        saved = torch.load(self.root / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=True)  # fmt: skip
        return {n: saved["module"][n] for n in saved.get("buffer_names") or []}


def saved_values(path: Path, expert: int) -> SavedValues:
    """Checkpoint `path`'s layout-free state (saved with `parallel.expert=expert`)."""
    from pretrain.checkpoint.reshard import UNIVERSAL

    return ExpertRankFiles(path, expert) if expert > 1 else UniversalFiles(path / UNIVERSAL)


def has_moments(path: Path) -> bool:
    """Whether expert-parallel checkpoint `path` keeps its Adam moments layout-free (those
    saved before it did keep their weights only)."""
    from pretrain.checkpoint.manager import safe_loading

    with safe_loading(path):
        rank0 = torch.load(path / "rank_0.pt", map_location="cpu", weights_only=True, mmap=True)
    return EXPERT_MOMENTS in rank0 and "dense_moments" in rank0


def load(engine: Any, path: Path, saved: SavedValues) -> None:
    """Set `engine` (any layout) from `saved`, checkpoint `path`'s state: every parameter
    (this rank's experts' rows of an expert one), the Adam step, the buffers, and the
    engine's step counters and LR schedule from DeepSpeed's model states."""
    prepare(engine)
    for name, p in engine.module.named_parameters():
        set_full_values(p, saved.get(name, local_experts(p)), engine)
    set_adam_step(engine.client_optimizer, saved.step)
    buffers = saved.buffers()
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name])
    _restore_schedule(engine, path)


def _restore_schedule(engine: Any, path: Path) -> None:
    """The engine's step counters and the LR schedule's position, from the checkpoint's
    model states (any stage's); the learning rate follows from this run's schedule at that
    position (the saved run's had as many groups as its layout split the optimizer into)."""
    states = next(f for f in ("mp_rank_00_model_states.pt",
                              "zero_pp_rank_0_mp_rank_00_model_states.pt")
                  if (path / f).is_file())  # fmt: skip
    saved = torch.load(path / states, map_location="cpu", weights_only=True)
    for key in ("global_steps", "global_samples", "skipped_steps"):
        setattr(engine, key, int(saved[key]))
    scheduler = engine.lr_scheduler
    if scheduler is None:
        return
    position = saved["lr_scheduler"]
    scheduler.last_epoch, scheduler._step_count = position["last_epoch"], position["_step_count"]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in
           zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]  # fmt: skip
    scheduler._last_lr = lrs
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
