"""The training loop. `Trainer.fit()` decides *when* (steps, logging, saving);
`Trainer.train_step()` decides *what* one optimizer step computes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pretrain import dist
from pretrain.config.schema import TrainerConfig
from pretrain.engine.deepspeed import grad_norm_fallback_needed, local_grad_norm
from pretrain.train.loggers import Loggers
from pretrain.train.state import TrainState

log = logging.getLogger("pretrain")


def data_metrics(data: object) -> dict[str, float]:
    """What the data source reports about itself (e.g. skipped corrupt shards), if anything."""
    metrics = getattr(data, "metrics", None)
    return metrics() if callable(metrics) else {}


class Trainer:
    """Runs optimizer steps until `cfg.max_steps`, logging every step (rank 0)."""

    def __init__(
        self,
        engine: Any,
        data: Iterator[torch.Tensor],
        cfg: TrainerConfig,
        grad_accum: int,
        tokens_per_step: int,
        loggers: Loggers | None = None,
        state: TrainState | None = None,
        save: Callable[[TrainState], None] | None = None,
        save_every: int = 0,
    ) -> None:
        self.engine, self.data, self.cfg = engine, data, cfg
        self.grad_accum, self.tokens_per_step = grad_accum, tokens_per_step
        self.loggers = loggers or Loggers([])
        self.state = state or TrainState()
        self.save, self.save_every = save, save_every
        self._manual_grad_norm = grad_norm_fallback_needed(engine)

    def fit(self) -> TrainState:
        """Train from `state.step` to `cfg.max_steps`; returns the final state."""
        last = self.cfg.max_steps
        if self.cfg.stop_at_step is not None:
            last = min(last, self.cfg.stop_at_step)
        while self.state.step < last:
            t0 = time.perf_counter()
            lr = self.engine.get_lr()[0]  # the rate this step uses; step() advances it
            loss, grad_norm = self.train_step()
            step_time = time.perf_counter() - t0
            self.state.step += 1
            self.state.tokens += self.tokens_per_step
            self.loggers.log(
                {
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": self.state.tokens,
                    "tokens_per_s": self.tokens_per_step / step_time,
                    "step_time_s": step_time,
                    **data_metrics(self.data),
                },
                self.state.step,
            )
            if self.save and self.save_every and self.state.step % self.save_every == 0:
                self.save(self.state)
        return self.state

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over `grad_accum` micro-batches; returns (mean loss, grad norm).

        DeepSpeed scales each micro-batch loss by 1/grad_accum, reduces gradients over ranks
        at the accumulation boundary, clips and steps the optimizer and LR schedule there.
        """
        engine = self.engine
        losses = []
        grad_norm = None
        for _ in range(self.grad_accum):
            batch = next(self.data).to(engine.device, non_blocking=True)  # (B, T + 1)
            loss = engine(batch[:, :-1], batch[:, 1:])
            engine.backward(loss)
            if self._manual_grad_norm and engine.is_gradient_accumulation_boundary():
                grad_norm = local_grad_norm(engine.module)  # before step() clears the grads
            engine.step()
            losses.append(loss.detach().float())
        mean_loss = dist.all_reduce_mean(torch.stack(losses).mean())
        if grad_norm is None:
            grad_norm = float(engine.get_global_grad_norm() or 0.0)
        return float(mean_loss), grad_norm
