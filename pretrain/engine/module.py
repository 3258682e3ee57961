"""`TrainModule` (pretrain/train/module.py) on a DeepSpeed engine: everything the step needs
to know about DeepSpeed lives here, so the loop imports nothing from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import manager, reshard
from pretrain.config.schema import OptimConfig
from pretrain.engine.deepspeed import UpdateGate, clip_gradients
from pretrain.engine.optim import keep_kernel_after_load
from pretrain.train.metrics import fp16_metrics, memory_metrics


class DeepSpeedTrainModule:
    """A DeepSpeed engine as a TrainModule.

    DeepSpeed scales each micro-batch loss by 1/grad_accum, reduces gradients over ranks at
    the accumulation boundary, clips and steps the optimizer and LR schedule there; its
    `step()` is called after every micro-batch and acts only at the boundary. A skipped
    update goes through `UpdateGate`, which turns the client optimizer's step into a no-op
    for that one call.
    """

    def __init__(self, engine: Any, clip: float | None, optim: OptimConfig) -> None:
        """`clip`: engine.deepspeed.trainer_clip(run), the max gradient norm clipped here
        (0: none) where DeepSpeed does not clip; None where DeepSpeed does. `optim`: this
        run's optimizer settings, whose kernel replaces a loaded checkpoint's."""
        self.engine, self.optim = engine, optim
        self.device: torch.device = engine.device
        self._clip = clip
        self._params = list(engine.module.parameters()) if clip is not None else []
        self._gate = UpdateGate(engine.client_optimizer)

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def forward_backward(self, batch: torch.Tensor, last: bool) -> torch.Tensor:
        loss = self.engine(batch[:, :-1], batch[:, 1:])
        self.engine.backward(loss)
        if not last:
            self.engine.step()  # inside the accumulation: bookkeeping only
        return loss.detach().float()

    def optimizer_step(self, skip: bool) -> float:
        self._gate.skip = skip
        norm = None
        if self._clip is not None:  # before step(), which clears the gradients
            norm = clip_gradients(self._params, self._clip)
        self.engine.step()
        self._gate.skip = False
        if norm is None:  # DeepSpeed's, where it clipped (None before its first: 0)
            norm = float(self.engine.get_global_grad_norm() or 0.0)
        return norm

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        self.engine.eval()
        try:
            return self.engine(batch[:, :-1], batch[:, 1:])
        finally:
            self.engine.train()

    def metrics(self) -> dict[str, float]:
        return {**memory_metrics(self.device), **fp16_metrics(self.engine)}

    def save(
        self, ckpt_dir: Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
        files: dict[str, str],
    ) -> Path:  # fmt: skip
        return manager.save(self.engine, ckpt_dir, step, client_state, rank_state, files)

    def load(
        self, path: Path, resharded: bool, universal: bool
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if resharded:
            client_state, rank_states = reshard.load(self.engine, path, universal)
        else:
            client_state, rank_state = manager.load(self.engine, path)
            rank_states = [rank_state]
        keep_kernel_after_load(self.engine.client_optimizer, self.optim)
        return client_state, rank_states
