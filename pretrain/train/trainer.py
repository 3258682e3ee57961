"""The training loop. `Trainer.fit()` decides *when* (steps, logging, saving, stopping);
`Trainer.train_step()` runs one optimizer step through the `TrainModule`
(pretrain/train/module.py), which knows *what* it computes. Nothing here knows DeepSpeed.

Once per step, at the gradient-accumulation boundary and before the optimizer update, every
rank joins one small all-reduce that carries its loss and three flags: "my loss is not
finite" (every rank then skips this update), "I got a stop signal" and "a timed checkpoint
is due" (every rank then saves, or stops, after this same step).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

from pretrain.config.schema import TrainerConfig
from pretrain.data.source import Batch, DataSource, as_batch
from pretrain.data.stream import DataError
from pretrain.train.callbacks import Callback
from pretrain.train.module import TrainModule
from pretrain.train.signals import StopSignals
from pretrain.train.state import TrainState
from pretrain.train.watchdog import Watchdog

log = logging.getLogger("pretrain")

EXIT_DIVERGED = 3
"""Exit code when `trainer.max_bad_steps` non-finite losses came in a row. Nothing was saved
after the first of them; the newest complete checkpoint predates the divergence."""


class TrainingDiverged(RuntimeError):
    """The loss was NaN/Inf on some rank for `trainer.max_bad_steps` steps in a row."""


@dataclass
class StepResult:
    """What all ranks agreed on for one optimizer step."""

    loss: float
    """Mean loss over ranks and micro-batches (NaN when some rank's was not finite)."""
    grad_norm: float
    skipped: bool
    """Some rank's loss was NaN/Inf: no rank applied the update."""
    stop: bool
    """Some rank received a stop signal."""
    save_due: bool
    """Some callback voted for a checkpoint after this step (`Callback.wants_save`: e.g.
    checkpoint.every_minutes, by rank 0's clock)."""
    data_wait_s: float = 0.0
    """Seconds this rank waited for its micro-batches (the rest of the step is compute)."""


class Trainer:
    """Runs optimizer steps until `cfg.max_steps` (or `cfg.stop_at_step`, or a stop signal,
    or early stopping); side effects (metrics, evaluation, logging, saving) are `callbacks`
    (train/callbacks.py), called in list order."""

    def __init__(
        self,
        module: TrainModule,
        data: DataSource,
        cfg: TrainerConfig,
        grad_accum: int,
        tokens_per_step: int,
        state: TrainState | None = None,
        callbacks: Sequence[Callback] = (),
        signals: StopSignals | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        """`watchdog`: told each phase of each step (data, compute, sync, eval, save)."""
        self.module, self.data, self.cfg = module, data, cfg
        self.grad_accum, self.tokens_per_step = grad_accum, tokens_per_step
        self.state = state or TrainState()
        self.callbacks = list(callbacks)
        self.signals = signals
        self.stop_signal: int | None = None
        """Set when fit() returned early because of a stop signal (on any rank)."""
        self._bad_in_row = 0
        self.watchdog = watchdog

    def phase(self, name: str) -> None:
        """Tell the watchdog what this rank does now: data, compute, sync (of the coming
        step), eval or save (of the step just taken; exempt from the hang timeout)."""
        if self.watchdog is not None:
            self.watchdog.at(self.state.step + (name not in ("eval", "save")), name)

    def checkpoint_saved(self, path: Path) -> None:
        """A callback committed checkpoint `path` of the current step: tell every callback."""
        for cb in self.callbacks:
            cb.on_checkpoint(self, path, self.state.step)

    def fit(self) -> TrainState:
        """Train from `state.step` to the last step; returns the final state. Every
        callback's `close` runs at the end, also after an error."""
        try:
            for cb in self.callbacks:
                cb.on_fit_start(self)
            if self.state.stopped_early:
                log.info("the run stopped early at step %d (no val_loss improvement): nothing "
                         "to do", self.state.step)  # fmt: skip
            else:
                self._loop(self.cfg.last_step)
            for cb in self.callbacks:
                cb.on_fit_end(self)
        finally:
            for cb in self.callbacks:
                cb.close()
        return self.state

    def _loop(self, last: int) -> None:
        while self.state.step < last:
            for cb in self.callbacks:
                cb.on_step_start(self)
            t0 = time.perf_counter()
            lr = self.module.lr()  # the rate this step uses; the step advances it
            result = self.train_step()
            # The step's one host sync (in _agree) makes this wall time the device's too.
            step_time = time.perf_counter() - t0
            self.state.step += 1
            self.state.tokens += self.tokens_per_step
            self.state.skipped_steps += result.skipped
            record = self._record(result, lr, step_time)
            for cb in self.callbacks:
                cb.on_step_end(self, result, record)
            self._check_bad_steps(result.skipped)
            for cb in self.callbacks:
                cb.after_step(self, result)
            if result.stop:
                received = self.signals.received if self.signals else None
                self.stop_signal = received or signal.SIGTERM
                if received is None:
                    log.warning("another rank received a stop signal: stopping after this step")
                break
            if self.state.stopped_early:
                break

    def _record(self, result: StepResult, lr: float, step_time: float) -> dict[str, float]:
        """The loop's own figures of a step; callbacks add theirs (throughput, val_loss)."""
        return {
            "loss": result.loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "tokens": self.state.tokens,
            "skipped_steps": self.state.skipped_steps,
            "step_time_s": step_time,
            "data_wait_s": result.data_wait_s,
            "compute_s": step_time - result.data_wait_s,
        }

    def _check_bad_steps(self, skipped: bool) -> None:
        self._bad_in_row = self._bad_in_row + 1 if skipped else 0
        if not skipped:
            return
        limit = self.cfg.max_bad_steps
        log.warning(
            "step %d: the loss is not finite on some rank; its update was skipped "
            "(%d in a row; trainer.max_bad_steps=%d)", self.state.step, self._bad_in_row, limit,
        )  # fmt: skip
        if self._bad_in_row >= limit:
            first = self.state.step - self._bad_in_row + 1
            raise TrainingDiverged(
                f"the loss was NaN/Inf for {self._bad_in_row} steps in a row (steps {first}-"
                f"{self.state.step}; trainer.max_bad_steps={limit}). Nothing was saved since; "
                "the newest complete checkpoint predates them. Lower optim.lr, raise "
                "optim.warmup_steps or check the data, then resume."
            )

    def train_step(self) -> StepResult:
        """One optimizer step over `grad_accum` micro-batches; every rank agrees on the loss
        and the flags (`_agree`) before the update, so a non-finite loss anywhere skips it
        everywhere."""
        losses = []
        data_wait = 0.0
        for i in range(self.grad_accum):
            t0 = time.perf_counter()
            self.phase("data")
            batch = self._next_batch().to(self.module.device, non_blocking=True)
            data_wait += time.perf_counter() - t0
            self.phase("compute")
            losses.append(self.module.forward_backward(batch, last=i == self.grad_accum - 1))
        self.phase("sync")
        agreed = self._agree(torch.stack(losses))
        self.phase("compute")
        agreed.grad_norm = self.module.optimizer_step(skip=agreed.skipped)
        agreed.data_wait_s = data_wait
        return agreed

    def _next_batch(self) -> Batch:
        """The next micro-batch; a stream that ends before the last step is a DataError."""
        try:
            return as_batch(next(self.data))
        except StopIteration:
            raise DataError(
                f"the data ran out during step {self.state.step + 1} of trainer.max_steps="
                f"{self.cfg.max_steps}: a finite data.epochs holds fewer batches than the run "
                "asks for. Raise data.epochs (null: no limit) or lower trainer.max_steps"
            ) from None

    def _agree(self, losses: torch.Tensor) -> StepResult:
        """The one collective of the step: mean loss, and the flags any rank raised (on one
        rank, just the host sync that reads the losses)."""
        stop = self.signals is not None and self.signals.received is not None
        due = any([cb.wants_save(self) for cb in self.callbacks])  # every callback votes
        world = tdist.get_world_size() if tdist.is_initialized() else 1
        if world == 1:  # nothing to agree on: read the losses (the step's one host sync)
            values = losses.tolist()
            return StepResult(
                loss=sum(values) / len(values),  # NaN when one is (fsum would raise)
                grad_norm=math.nan,
                skipped=not all(map(math.isfinite, values)),
                stop=stop,
                save_due=due,
            )
        device = losses.device
        packed = torch.stack([
            losses.mean(),
            (~torch.isfinite(losses)).any().float(),
            torch.tensor(float(stop), device=device),
            torch.tensor(float(due), device=device),
        ])  # fmt: skip
        tdist.all_reduce(packed, op=tdist.ReduceOp.SUM)
        loss_sum, bad, stops, dues = packed.tolist()
        return StepResult(
            loss=loss_sum / world,
            grad_norm=math.nan,
            skipped=bad > 0,
            stop=stops > 0,
            save_due=dues > 0,
        )
