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

from pretrain.checkpoint import reshard
from pretrain.engine.expert_groups import local_experts, set_loss_scale
from pretrain.engine.full_state import KEYS, MOMENTS, EngineState

EXPERT_MOMENTS = "expert_moments"
"""The rank-file key of an expert-parallel checkpoint's expert Adam moments."""


class SavedValues(Protocol):
    """A checkpoint's layout-free state."""

    def step(self) -> float:
        """The Adam step count."""
        ...

    def loss_scale(self) -> dict[str, float]:
        """The fp16 loss scaler's state ({}: none saved)."""
        ...

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

    def step(self) -> float:
        return float(self.ranks[0]["adam_step"])

    def loss_scale(self) -> dict[str, float]:
        return dict(self.ranks[0].get("loss_scale") or {})

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

    def weights(self) -> dict[str, torch.Tensor]:
        """The whole model's fp32 weights and buffers (what an export reads; checkpoints
        saved before the moments were kept have these too)."""
        first = self.ranks[0]
        experts = {name: _rows([r["experts"][name] for r in self.ranks], None)
                   for name in first["experts"]}  # fmt: skip
        return {**first["dense"], **experts}


class UniversalFiles:
    """DeepSpeed's universal conversion of a checkpoint without expert parallelism
    (reshard.convert): one directory per parameter."""

    def __init__(self, universal: Path) -> None:
        self.root = universal

    def step(self) -> float:
        return float(torch.load(next((self.root / "zero").glob("*/step.pt")), weights_only=True))

    def loss_scale(self) -> dict[str, float]:
        return {}  # DeepSpeed's universal global state keeps it; reshard's route restores it

    def get(self, name: str, experts: range | None) -> dict[str, torch.Tensor]:
        values = {}
        for key in KEYS:
            value = torch.load(self.root / "zero" / name / f"{key}.pt", weights_only=True,
                               mmap=True)  # fmt: skip
            value = value["param"] if isinstance(value, dict) else value  # reshard._normalize
            values[key] = value if experts is None else value[experts.start : experts.stop]
        return values

    def buffers(self) -> dict[str, torch.Tensor]:
        return reshard.saved_buffers(self.root)


def saved_values(path: Path, expert: int) -> SavedValues:
    """Checkpoint `path`'s layout-free state (saved with `parallel.expert=expert`)."""
    return ExpertRankFiles(path, expert) if expert > 1 else UniversalFiles(path / reshard.UNIVERSAL)


def has_moments(path: Path) -> bool:
    """Whether expert-parallel checkpoint `path` keeps its Adam moments layout-free (those
    saved before it did keep their weights only)."""
    from pretrain.checkpoint.manager import safe_loading

    with safe_loading(path):
        rank0 = torch.load(path / "rank_0.pt", map_location="cpu", weights_only=True, mmap=True)
    return EXPERT_MOMENTS in rank0 and "dense_moments" in rank0


def load(engine: Any, path: Path, saved: SavedValues) -> None:
    """Set `engine` (any layout) from `saved`, checkpoint `path`'s state: every parameter
    (this rank's experts' rows of an expert one), the Adam step, the fp16 loss scale, the
    buffers, and the engine's step counters and LR schedule from DeepSpeed's model
    states."""
    full = EngineState(engine)
    for name, p in engine.module.named_parameters():
        full.set(p, saved.get(name, local_experts(p)))
    full.set_step(saved.step())
    set_loss_scale(engine, saved.loss_scale())
    buffers = saved.buffers()
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name])
    _restore_schedule(engine, path)


def _restore_schedule(engine: Any, path: Path) -> None:
    """The engine's step counters and the LR schedule's position and base rate, from the
    checkpoint's model states (any stage's), as DeepSpeed's own load restores them; the
    learning rate follows from this run's schedule there (the saved run had as many
    optimizer groups as its layout split them into, each at the same rate)."""
    saved = torch.load(reshard.model_states(path), map_location="cpu", weights_only=True,
                       mmap=True)  # fmt: skip
    for key in ("global_steps", "global_samples", "skipped_steps"):
        setattr(engine, key, int(saved.get(key, getattr(engine, key))))
    scheduler = engine.lr_scheduler
    if scheduler is None:
        return
    position = saved["lr_scheduler"]
    scheduler.last_epoch, scheduler._step_count = position["last_epoch"], position["_step_count"]
    scheduler.base_lrs = [position["base_lrs"][0]] * len(scheduler.base_lrs)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in
           zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]  # fmt: skip
    scheduler._last_lr = lrs
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
