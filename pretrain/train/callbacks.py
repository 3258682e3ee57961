"""Side effects of training as callbacks: the Trainer (train/trainer.py) runs the steps and
calls each `Callback` at fixed points; everything else a run does around the steps lives
here, one class per concern:

- `MetricsCallback`: throughput, TFLOP/s, MFU, the module's memory and loss-scale figures
  and the data source's own, into each step's record;
- `EvalCallback`: held-out evaluation every `trainer.eval_every_steps`, and early stopping;
- `ProfilerCallback`: a torch.profiler trace of `trainer.profile_steps`;
- `LogCallback`: the record to the console, metrics.jsonl and W&B (rank 0);
- `CheckpointCallback`: periodic, timed, stop and final saves, then retention;
- `ArtifactCallback`: each committed checkpoint as a W&B model artifact;
- `ExportCallback`: the Hugging Face export at the end (checkpoint.export_hf).

Callbacks run in list order at each point, so a callback sees what the ones before it put in
the step's record. The run's list (`train/run.build_callbacks`): profiler, metrics,
evaluation, then the config's own, then logging, W&B artifacts, checkpointing, export.
More come from the config without touching the loop or run.py:
`trainer.callbacks=[{_target_: my.module.MyCallback, ...}]` (each a `Callback` subclass,
checked at start; Hydra instantiates it), and what they add to a record is logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pretrain import dist
from pretrain.checkpoint import manager as checkpoint
from pretrain.checkpoint.export import export_hf
from pretrain.train.loggers import Loggers
from pretrain.train.metrics import Throughput
from pretrain.train.profiling import StepProfiler
from pretrain.train.state import TrainState

if TYPE_CHECKING:
    from pretrain.train.trainer import StepResult, Trainer

log = logging.getLogger("pretrain")


class Callback:
    """A side effect of training. Every hook does nothing unless overridden; each gets the
    Trainer, whose `state` (step, tokens, best val_loss, ...), `module` (the TrainModule),
    `data` (the data source) and `cfg` (TrainerConfig) it may read.

    Order of calls in one `Trainer.fit()`:
    `on_fit_start`, then per optimizer step `on_step_start`, `wants_save` (while the step's
    ranks agree, before its update), `on_step_end` (after the update, with the record to be
    logged) and `after_step` (after the loop's own checks: the step is final), with
    `on_checkpoint` whenever a checkpoint was committed; then `on_fit_end` when the loop
    ended without an error (last step, stop signal or early stop), and `close` always.
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step of this job (state.step is where it resumes)."""

    def on_step_start(self, trainer: Trainer) -> None:
        """Before optimizer step `trainer.state.step + 1` runs."""

    def wants_save(self, trainer: Trainer) -> bool:
        """This rank's vote for a checkpoint after the current step; the ranks agree on the
        OR of all votes (`StepResult.save_due`), so every rank saves the same step."""
        return False

    def on_step_end(self, trainer: Trainer, result: StepResult, record: dict[str, float]) -> None:
        """After step `trainer.state.step`: add figures to `record` (what the loggers get),
        or decide something from it (early stopping sets `trainer.state.stopped_early`)."""

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        """After the step was logged and passed the loop's checks (a diverged run raises
        first): the place to save."""

    def on_checkpoint(self, trainer: Trainer, path: Path, step: int) -> None:
        """Checkpoint `path` of `step` was committed (`Trainer.checkpoint_saved`)."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """The loop ended without an error; `trainer.stop_signal` says whether a signal
        ended it."""

    def close(self) -> None:
        """Release what the callback holds; runs after errors too. Finish any background
        work here (an upload thread, a writer's buffer): a finished rank then leaves through
        `dist.finish`, which runs no threads, atexit handlers or finalizers."""


class MetricsCallback(Callback):
    """Throughput, TFLOP/s and MFU (`Throughput`), then the module's figures (memory, loss
    scale) and the data source's (skipped shards) into every record."""

    def __init__(self, throughput: Throughput) -> None:
        self.throughput = throughput

    def on_step_end(self, trainer: Trainer, result: StepResult, record: dict[str, float]) -> None:
        record.update(self.throughput(record["step_time_s"]))
        record.update(trainer.module.metrics())
        record.update(trainer.data.metrics())


class EvalCallback(Callback):
    """Scores the held-out sets every `trainer.eval_every_steps` and at the job's last step
    (not on a step a stop signal ends: the stop's grace time goes to the save), and stops
    the run early after `trainer.early_stopping_patience` evaluations without improvement."""

    def __init__(self, evaluate: Callable[[], dict[str, float]], last_step: int) -> None:
        """`evaluate`: {metric: value} with at least `val_loss`; `last_step`: this job's."""
        self.evaluate, self.last_step = evaluate, last_step

    def on_step_end(self, trainer: Trainer, result: StepResult, record: dict[str, float]) -> None:
        every, step = trainer.cfg.eval_every_steps, trainer.state.step
        if not every or result.stop or not (step % every == 0 or step == self.last_step):
            return
        trainer.phase("eval")
        record.update(self.evaluate())
        if self._patience_ran_out(trainer, record["val_loss"]):
            trainer.state.stopped_early = True

    @staticmethod
    def _patience_ran_out(trainer: Trainer, val_loss: float) -> bool:
        """Count evaluations without improvement; True when the patience is out."""
        s, cfg = trainer.state, trainer.cfg
        patience = cfg.early_stopping_patience
        if val_loss < s.best_val_loss - cfg.early_stopping_min_delta:
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


class ProfilerCallback(Callback):
    """`trainer.profile_steps=[a, b]`: a `StepProfiler` around steps a..b."""

    def __init__(self, profiler: StepProfiler) -> None:
        self.profiler = profiler

    def on_step_start(self, trainer: Trainer) -> None:
        self.profiler.step_started(trainer.state.step + 1)

    def on_step_end(self, trainer: Trainer, result: StepResult, record: dict[str, float]) -> None:
        self.profiler.step_finished(trainer.state.step)

    def close(self) -> None:
        self.profiler.close()


class LogCallback(Callback):
    """Each step's record to the loggers (console or progress bar, metrics.jsonl, W&B)."""

    def __init__(self, loggers: Loggers) -> None:
        self.loggers = loggers

    def on_step_end(self, trainer: Trainer, result: StepResult, record: dict[str, float]) -> None:
        self.loggers.log(record, trainer.state.step)

    def close(self) -> None:
        self.loggers.close()


class ArtifactCallback(Callback):
    """Each committed checkpoint as a W&B model artifact (logger.wandb.log_checkpoints)."""

    def __init__(self, loggers: Loggers) -> None:
        self.loggers = loggers

    def on_checkpoint(self, trainer: Trainer, path: Path, step: int) -> None:
        self.loggers.log_checkpoint(path, step)


class CheckpointCallback(Callback):
    """When to save: every `every_steps` steps and every `every_minutes` (rank 0's clock
    decides, all ranks save the same step), on a stop signal, where early stopping ends the
    run, and at the job's end when `final`; then retention (`keep_last`, `keep_every`).

    No scheduled checkpoint in a run of NaN steps (resuming it would resume the divergence);
    a stop saves regardless: the weights are the last good ones.
    """

    def __init__(
        self, save: Callable[[TrainState], Path], ckpt_dir: Path, every_steps: int = 0,
        every_minutes: float = 0.0, final: bool = False, keep_last: int = 0, keep_every: int = 0,
    ) -> None:  # fmt: skip
        """`save`: writes and commits the checkpoint of a state, returning its directory."""
        self._save, self.ckpt_dir = save, ckpt_dir
        self.every_steps, self.every_minutes, self.final = every_steps, every_minutes, final
        self.keep_last, self.keep_every = keep_last, keep_every
        self.last_saved_step: int | None = None
        self._last_save_time = time.monotonic()
        self._start_step = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        self._start_step = trainer.state.step

    def wants_save(self, trainer: Trainer) -> bool:
        return (
            dist.is_main()
            and self.every_minutes > 0
            and time.monotonic() - self._last_save_time >= 60 * self.every_minutes
        )

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        step = trainer.state.step
        periodic = self.every_steps and step % self.every_steps == 0
        due = (periodic or result.save_due) and not result.skipped
        if due or result.stop or trainer.state.stopped_early:
            self.save(trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        step = trainer.state.step
        if self.final and step > self._start_step and self.last_saved_step != step:
            self.save(trainer)

    def save(self, trainer: Trainer) -> None:
        trainer.phase("save")
        path = self._save(trainer.state)
        checkpoint.prune(self.ckpt_dir, self.keep_last, self.keep_every)
        self.last_saved_step = trainer.state.step
        self._last_save_time = time.monotonic()
        trainer.checkpoint_saved(path)


class ExportCallback(Callback):
    """checkpoint.export_hf: the newest complete checkpoint as a Hugging Face directory when
    the run ends (not when a stop signal ends it: the requeued job exports at its end)."""

    def __init__(self, ckpt_dir: Path, out: Path) -> None:
        self.ckpt_dir, self.out = ckpt_dir, out

    def on_fit_end(self, trainer: Trainer) -> None:
        if trainer.stop_signal is not None:
            return
        if dist.is_main():
            export_hf(checkpoint.complete_checkpoints(self.ckpt_dir)[-1], self.out)
        dist.barrier()
