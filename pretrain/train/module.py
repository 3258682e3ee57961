"""The seam between the loop and the engine: a `TrainModule` knows *what* one optimizer step
computes (forward and backward of each micro-batch, clipping, the update or its skip, the
learning rate, the gradient norm), the evaluation loss, and how its state is saved and
loaded; `train/trainer.py` decides *when* (steps, agreement between ranks, logging, saving,
stopping) and talks to the model only through it.

`pretrain.engine.module.DeepSpeedTrainModule` is the implementation the runs use; the
Trainer's tests drive the loop with a fake one, in-process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from pretrain.checkpoint.reshard import Route
from pretrain.data.source import Batch


class TrainModule(Protocol):
    """One model being trained, step by step. Call order per optimizer step:
    `forward_backward` once per micro-batch, then `optimizer_step` once."""

    device: torch.device
    """Where the micro-batches go."""

    def lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        ...

    def forward_backward(self, batch: Batch, last: bool) -> torch.Tensor:
        """Forward and backward of micro-batch `batch` (its inputs, its targets: the mean loss
        over those that count, times `batch.weight` when it has one), gradients
        accumulating; `last` is the step's final micro-batch, after which `optimizer_step`
        comes. Returns the loss as a detached fp32 scalar on `device`, not synchronised
        (reading it would stall the device)."""
        ...

    def optimizer_step(self, skip: bool) -> float:
        """End the step: clip the accumulated gradients and apply the update, or, `skip`,
        leave weights and optimizer state as they are while the LR schedule and step
        counters move on as usual. Returns the gradient norm before clipping (NaN where
        none is known)."""
        ...

    def eval_loss(self, batch: Batch) -> torch.Tensor:
        """The mean loss of micro-batch `batch` as training computes it, in eval
        mode (no dropout) and without gradients; every rank must call it equally often
        (sharded weights are gathered collectively)."""
        ...

    def metrics(self) -> dict[str, float]:
        """Figures of the step just taken beyond loss and norm (memory, loss scale), by
        metric name; {} when there are none."""
        ...

    def save(
        self, ckpt_dir: Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
        files: dict[str, str],
    ) -> Path:  # fmt: skip
        """Write and commit checkpoint `step` under `ckpt_dir` on every rank: the model and
        optimizer state as this module holds it (sharded or not), `client_state` (the run's:
        trainer state, config), `rank_state` (this rank's own: its data position) and
        `files` (name -> text, e.g. tokenizer.json). Returns the checkpoint's directory;
        it counts as complete only once every rank's part is on disk."""
        ...

    def load(self, path: Path, route: Route) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Load checkpoint `path` into the model and optimizer (and this rank's RNG): the
        saved client state, and the saved rank states: [this rank's] when `route` is
        `same` (the layout that saved it), else every saved rank's, in rank order (another
        layout, loaded by `route`: checkpoint/resume.py `Route`)."""
        ...
