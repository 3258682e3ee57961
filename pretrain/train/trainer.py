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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from pretrain.config.schema import TrainerConfig
from pretrain.data.stream import DataError
from pretrain.train.loggers import Loggers
from pretrain.train.metrics import Throughput
from pretrain.train.module import TrainModule
from pretrain.train.profiling import StepProfiler
from pretrain.train.signals import StopSignals
from pretrain.train.state import TrainState
from pretrain.train.watchdog import Watchdog

log = logging.getLogger("pretrain")

EXIT_DIVERGED = 3
"""Exit code when `trainer.max_bad_steps` non-finite losses came in a row. Nothing was saved
after the first of them; the newest complete checkpoint predates the divergence."""


class TrainingDiverged(RuntimeError):
    """The loss was NaN/Inf on some rank for `trainer.max_bad_steps` steps in a row."""


def data_metrics(data: object) -> dict[str, float]:
    """What the data source reports about itself (e.g. skipped corrupt shards), if anything."""
    metrics = getattr(data, "metrics", None)
    return metrics() if callable(metrics) else {}


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
    """Rank 0's clock says a timed checkpoint is due."""
    data_wait_s: float = 0.0
    """Seconds this rank waited for its micro-batches (the rest of the step is compute)."""


class Trainer:
    """Runs optimizer steps until `cfg.max_steps` (or `cfg.stop_at_step`, or a stop signal)."""

    def __init__(
        self,
        module: TrainModule,
        data: Iterator[torch.Tensor],
        cfg: TrainerConfig,
        grad_accum: int,
        tokens_per_step: int,
        loggers: Loggers | None = None,
        state: TrainState | None = None,
        save: Callable[[TrainState], None] | None = None,
        save_every: int = 0,
        save_every_minutes: float = 0.0,
        signals: StopSignals | None = None,
        throughput: Throughput | None = None,
        profiler: StepProfiler | None = None,
        evaluate: Callable[[], dict[str, float]] | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        """`watchdog`: told each phase of each step (data, compute, sync, eval, save)."""
        self.module, self.data, self.cfg = module, data, cfg
        self.grad_accum, self.tokens_per_step = grad_accum, tokens_per_step
        self.loggers = loggers or Loggers([])
        self.state = state or TrainState()
        self.save, self.save_every, self.save_every_minutes = save, save_every, save_every_minutes
        self.signals = signals
        world = tdist.get_world_size() if tdist.is_initialized() else 1
        self.throughput = throughput or Throughput(tokens_per_step, world, None, None)
        self.profiler = profiler
        self.evaluate = evaluate
        """Scores the held-out split every `cfg.eval_every_steps` and at the last step."""
        self.stop_signal: int | None = None
        """Set when fit() returned early because of a stop signal (on any rank)."""
        self.last_saved_step: int | None = None
        self._last_save_time = time.monotonic()
        self._bad_in_row = 0
        self.watchdog = watchdog

    def _at(self, phase: str) -> None:
        if self.watchdog is not None:
            self.watchdog.at(self.state.step + (phase not in ("eval", "save")), phase)

    def fit(self) -> TrainState:
        """Train from `state.step` to the last step; returns the final state."""
        last = self.cfg.max_steps
        if self.cfg.stop_at_step is not None:
            last = min(last, self.cfg.stop_at_step)
        if self.state.stopped_early:
            log.info("the run stopped early at step %d (no val_loss improvement): nothing to do",
                     self.state.step)  # fmt: skip
            return self.state
        while self.state.step < last:
            if self.profiler:
                self.profiler.step_started(self.state.step + 1)
            t0 = time.perf_counter()
            lr = self.module.lr()  # the rate this step uses; the step advances it
            result = self.train_step()
            # The step's one host sync (in _agree) makes this wall time the device's too.
            step_time = time.perf_counter() - t0
            self.state.step += 1
            self.state.tokens += self.tokens_per_step
            self.state.skipped_steps += result.skipped
            if self.profiler:
                self.profiler.step_finished(self.state.step)
            record = self._metrics(result, lr, step_time)
            evaluated = self._eval_due(last) and not result.stop  # a stop saves in its grace
            if evaluated:
                self._at("eval")
                record.update(self.evaluate())
            self.loggers.log(record, self.state.step)
            if evaluated and self._patience_ran_out(record["val_loss"]):
                self.state.stopped_early = True
            self._check_bad_steps(result.skipped)
            periodic = self.save_every and self.state.step % self.save_every == 0
            # No scheduled checkpoint in a run of NaN steps (resuming it would resume the
            # divergence); a stop request saves regardless: the weights are the last good ones.
            due = (periodic or result.save_due) and not result.skipped
            if self.save and (due or result.stop or self.state.stopped_early):
                self._at("save")
                self.save(self.state)
                self.last_saved_step = self.state.step
                self._last_save_time = time.monotonic()
            if result.stop:
                received = self.signals.received if self.signals else None
                self.stop_signal = received or signal.SIGTERM
                if received is None:
                    log.warning("another rank received a stop signal: stopping after this step")
                break
            if self.state.stopped_early:
                break
        return self.state

    def _patience_ran_out(self, val_loss: float) -> bool:
        """Early stopping: count evaluations without improvement; True when patience is out."""
        s, patience = self.state, self.cfg.early_stopping_patience
        if val_loss < s.best_val_loss - self.cfg.early_stopping_min_delta:
            s.best_val_loss, s.best_val_step, s.evals_since_best = val_loss, s.step, 0
            return False
        s.evals_since_best += 1
        if not patience or s.evals_since_best < patience:
            return False
        log.warning(
            "early stopping at step %d: val_loss %.4f has not improved on %.4f (step %d) for "
            "%d evaluations (trainer.early_stopping_patience=%d)", s.step, val_loss,
            s.best_val_loss, s.best_val_step, s.evals_since_best, patience,
        )  # fmt: skip
        return True

    def _eval_due(self, last: int) -> bool:
        every = self.cfg.eval_every_steps
        if self.evaluate is None or not every:
            return False
        return self.state.step % every == 0 or self.state.step == last

    def _metrics(self, result: StepResult, lr: float, step_time: float) -> dict[str, float]:
        """One step's record: metrics.jsonl gets each; console and W&B one per log interval."""
        return {
            "loss": result.loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "tokens": self.state.tokens,
            "skipped_steps": self.state.skipped_steps,
            "step_time_s": step_time,
            "data_wait_s": result.data_wait_s,
            "compute_s": step_time - result.data_wait_s,
            **self.throughput(step_time),
            **self.module.metrics(),
            **data_metrics(self.data),
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
            self._at("data")
            batch = self._next_batch().to(self.module.device, non_blocking=True)  # (B, T + 1)
            data_wait += time.perf_counter() - t0
            self._at("compute")
            losses.append(self.module.forward_backward(batch, last=i == self.grad_accum - 1))
        self._at("sync")
        agreed = self._agree(torch.stack(losses))
        self._at("compute")
        agreed.grad_norm = self.module.optimizer_step(skip=agreed.skipped)
        agreed.data_wait_s = data_wait
        return agreed

    def _next_batch(self) -> torch.Tensor:
        """The next micro-batch; a stream that ends before the last step is a DataError."""
        try:
            return next(self.data)
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
        rank = tdist.get_rank() if tdist.is_initialized() else 0
        due = (  # rank 0's clock alone decides, so every rank agrees
            rank == 0
            and self.save_every_minutes > 0
            and time.monotonic() - self._last_save_time >= 60 * self.save_every_minutes
        )
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
