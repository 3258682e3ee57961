"""`TrainModule` (pretrain/train/module.py) on a DeepSpeed engine: everything the step needs
to know about DeepSpeed lives here, so the loop imports nothing from it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import manager, reshard
from pretrain.checkpoint.reshard import Route
from pretrain.config.schema import OptimConfig
from pretrain.data.source import Batch
from pretrain.engine.deepspeed import UpdateGate, clip_gradients
from pretrain.engine.expert_groups import ExpertCheckpoint
from pretrain.engine.optim import keep_kernel_after_load
from pretrain.model.documents import DocumentSplit, positions_in_documents
from pretrain.model.sequence import SequenceShard
from pretrain.train.metrics import fp16_metrics, memory_metrics


class DeepSpeedTrainModule:
    """A DeepSpeed engine as a TrainModule.

    DeepSpeed scales each micro-batch loss by 1/grad_accum, reduces gradients over ranks at
    the accumulation boundary, clips and steps the optimizer and LR schedule there; its
    `step()` is called after every micro-batch and acts only at the boundary. A skipped
    update goes through `UpdateGate`, which turns the client optimizer's step into a no-op
    for that one call.
    """

    def __init__(
        self, engine: Any, clip: float | None, optim: OptimConfig,
        sequence: SequenceShard | None = None, documents: DocumentSplit | None = None,
        model_metrics: Callable[[], dict[str, float]] | None = None,
        after_step: Callable[[bool], None] | None = None,
    ) -> None:  # fmt: skip
        """`clip`: engine.deepspeed.trainer_clip(run), the max gradient norm clipped here
        (0: none) where DeepSpeed does not clip; None where DeepSpeed does. `optim`: this
        run's optimizer settings, whose kernel replaces a loaded checkpoint's. `sequence`:
        this rank's place in its sequence-parallel group, whose ranks get the same
        micro-batches and each run the model on its slice (model/sequence.py). `documents`:
        the model keeps packed documents apart (model.document_mask, or positions that
        restart per document); each micro-batch's document ids go with it. `model_metrics`:
        the model family's figures of the step (`ModelFamily.step_metrics`); `after_step`:
        its update after each optimizer step (`ModelFamily.after_step`)."""
        self._model_metrics = model_metrics or dict
        self._after_step = after_step
        self.engine, self.optim, self.sequence, self.documents = engine, optim, sequence, documents
        # DeepSpeed divides the gradients summed over all ranks by the data-parallel size,
        # except ZeRO-3's reduce-scatter (every bucket, with reduce_scatter on, as
        # deepspeed_config sets it), which divides by all ranks: a sequence group's share
        # of the loss is scaled up by its size there to make up for it.
        zero3 = engine.zero_optimization_stage() == 3
        self._grad_factor = sequence.size if sequence is not None and zero3 else 1
        self.device: torch.device = engine.device
        self._clip = clip
        self._gate = UpdateGate(engine.client_optimizer)
        self._experts = ExpertCheckpoint(engine)
        # What the trainer clips (clip not None): the dense parameters and the experts'.
        held = {id(p) for _, p in self._experts.params}
        self._params = [p for p in engine.module.parameters() if id(p) not in held
                        ] if clip is not None else []  # fmt: skip
        self._expert_params = [p for _, p in self._experts.params] if clip is not None else []

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """The loss to differentiate on this rank (a sequence group's ranks: each its share
        of the group's mean), and what it is multiplied by to log it (the group size: the
        mean over all ranks of share x size is the mean over the groups' losses)."""
        inputs, targets = batch.inputs, batch.targets
        docs = self.documents
        extra = {}
        if docs is not None:
            extra["documents"] = docs.ids(inputs, batch.documents)
        s = self.sequence
        if s is None:
            return self.engine(inputs, targets, **extra), 1
        local = s.slice(targets)
        if docs is not None and docs.reset:  # the whole sequence's, then this rank's slice
            positions = s.slice(positions_in_documents(extra["documents"]))
        else:
            positions = s.positions(local.size(1), self.device)
        mean = self.engine(s.slice(inputs), local, positions=positions, **extra)
        return s.share(mean, targets, local), s.size

    def forward_backward(self, batch: Batch, last: bool) -> torch.Tensor:
        loss, scale = self._loss(batch)
        if batch.weight is not None:  # its share of the step's counted targets
            loss = loss * batch.weight
        self.engine.backward(loss * self._grad_factor if self._grad_factor != 1 else loss)
        if not last:
            self.engine.step()  # inside the accumulation: bookkeeping only
        return loss.detach().float() * scale

    def optimizer_step(self, skip: bool) -> float:
        self._gate.skip = skip
        norm = None
        if self._clip is not None:  # before step(), which clears the gradients
            norm = clip_gradients(self._params, self._clip, self._expert_params)
        self.engine.step()
        self._gate.skip = False
        if self._after_step is not None:  # applied: neither ours nor fp16's overflow skipped
            self._after_step(not skip and bool(self.engine.was_step_applied()))
        if norm is None:  # DeepSpeed's, where it clipped (None before its first: 0)
            norm = float(self.engine.get_global_grad_norm() or 0.0)
        return norm

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> torch.Tensor:
        self.engine.eval()
        try:
            loss, scale = self._loss(batch)
            return loss * scale
        finally:
            self.engine.train()

    def metrics(self) -> dict[str, float]:
        return {**memory_metrics(self.device), **fp16_metrics(self.engine),
                **self._model_metrics()}  # fmt: skip

    def save(
        self, ckpt_dir: Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
        files: dict[str, str],
    ) -> Path:  # fmt: skip
        rank_state = {**rank_state, **self._experts.state()}
        return manager.save(self.engine, ckpt_dir, step, client_state, rank_state, files)

    def load(self, path: Path, route: Route) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if route == "same":
            client_state, rank_state = manager.load(self.engine, path)
            rank_states = [rank_state]
            self._experts.restore(path)
        else:
            client_state, rank_states = reshard.load(self.engine, path, route)
        keep_kernel_after_load(self.engine.client_optimizer, self.optim)
        return client_state, rank_states
