"""The loop on its own, in-process: the Trainer drives a fake TrainModule (no DeepSpeed, no
process group) and must decide *when* right: steps and micro-batches, skipped updates and
divergence, stop signals, the save cadence, early stopping, data running out; and the
callbacks (train/callbacks.py) that carry the side effects."""

from __future__ import annotations

import itertools
import math
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pretrain.config.schema import TrainerConfig
from pretrain.data.stream import DataError
from pretrain.train.callbacks import (
    Callback,
    CheckpointCallback,
    EvalCallback,
    LogCallback,
    MetricsCallback,
)
from pretrain.train.loggers import Loggers
from pretrain.train.metrics import Throughput
from pretrain.train.state import TrainState
from pretrain.train.trainer import Trainer, TrainingDiverged
from tests.train.test_loggers import Recorder  # a logger that keeps what it is given


class FakeModule:
    """A TrainModule whose micro-batch losses come from a list, recording what it was asked."""

    device = torch.device("cpu")

    def __init__(self, losses: Iterator[float]) -> None:
        self.losses = losses
        self.calls: list[tuple[str, bool]] = []
        self.rate = 1e-3

    def lr(self) -> float:
        return self.rate

    def forward_backward(self, batch: torch.Tensor, last: bool) -> torch.Tensor:
        assert batch.tokens.shape == (2, 9)
        self.calls.append(("fb", last))
        return torch.tensor(next(self.losses))

    def optimizer_step(self, skip: bool) -> float:
        self.calls.append(("step", skip))
        self.rate *= 0.5  # the schedule moves on, skipped or not
        return 0.25

    def metrics(self) -> dict[str, float]:
        return {"fake_metric": 1.0}


class FakeSignals:
    received: int | None = None


class FakeData:
    """A DataSource of zero batches (`n` of them; None: endless)."""

    tokenizer = tokenizer_sha256 = eos_id = chat_template = None
    allow_tokenizer_change = False

    def __init__(self, n: int | None = None) -> None:
        self.left = n

    def __iter__(self) -> FakeData:
        return self

    def __next__(self) -> torch.Tensor:
        if self.left is not None:
            if self.left == 0:
                raise StopIteration
            self.left -= 1
        return torch.zeros(2, 9, dtype=torch.long)

    def metrics(self) -> dict[str, float]:
        return {"data_metric": 2.0}


class Saves(list):
    """A checkpoint writer that notes the steps it saved."""

    def __call__(self, state: TrainState) -> Path:
        self.append(state.step)
        return Path(f"step_{state.step}")


def _trainer(losses: Iterator[float], grad_accum: int = 2, data: FakeData | None = None,
             callbacks: tuple[Callback, ...] = (), **kwargs: object,
             ) -> tuple[Trainer, FakeModule, Recorder]:  # fmt: skip
    cfg = TrainerConfig(**{"max_steps": 6, **kwargs.pop("cfg", {})})  # type: ignore[arg-type]
    module, records = FakeModule(losses), Recorder()
    throughput = Throughput(32, 1, None, None)
    own = [MetricsCallback(throughput), *callbacks, LogCallback(Loggers([records]))]
    trainer = Trainer(module, data or FakeData(), cfg, grad_accum, tokens_per_step=32,
                      callbacks=own, **kwargs)  # type: ignore[arg-type]  # fmt: skip
    return trainer, module, records


def _saving(saves: Saves, **kwargs: object) -> CheckpointCallback:
    """Saving at the given cadence into a directory retention never finds anything in."""
    return CheckpointCallback(saves, Path("/nonexistent"), **kwargs)  # type: ignore[arg-type]


def test_each_step_runs_every_micro_batch_then_one_update() -> None:
    trainer, module, records = _trainer(itertools.count(10.0, -1.0), grad_accum=3)
    state = trainer.fit()
    assert state.step == 6 and state.tokens == 6 * 32 and state.skipped_steps == 0
    step_calls = [("fb", False), ("fb", False), ("fb", True), ("step", False)]
    assert module.calls == step_calls * 6
    steps = [s for s, _ in records.records]
    assert steps == [1, 2, 3, 4, 5, 6]
    first = records.records[0][1]
    assert first["loss"] == pytest.approx(9.0)  # the mean of 10, 9, 8
    assert first["lr"] == 1e-3 and records.records[1][1]["lr"] == 5e-4  # the rate it used
    assert first["grad_norm"] == 0.25 and first["fake_metric"] == 1.0
    assert first["data_metric"] == 2.0 and first["tokens_per_s"] > 0
    assert first["tokens"] == 32 and first["step_time_s"] >= first["data_wait_s"] >= 0


def test_a_non_finite_loss_skips_the_update_and_a_run_of_them_diverges() -> None:
    losses = iter([1.0, 1.0, math.nan, 1.0, 1.0, 1.0] + [math.inf] * 20)
    trainer, module, records = _trainer(
        losses, grad_accum=1, cfg={"max_bad_steps": 3, "max_steps": 20}
    )
    with pytest.raises(TrainingDiverged, match=r"NaN/Inf for 3 steps in a row \(steps 7-9"):
        trainer.fit()
    assert [skip for call, skip in module.calls if call == "step"] == [
        False, False, True, False, False, False, True, True, True,
    ]  # fmt: skip
    assert trainer.state.skipped_steps == 4
    assert math.isnan(records.records[2][1]["loss"])


def test_a_stop_signal_saves_that_step_and_stops() -> None:
    signals = FakeSignals()
    saved = Saves()

    def losses() -> Iterator[float]:
        for i in itertools.count():
            if i == 5:  # during step 3 (two micro-batches a step)
                signals.received = signal.SIGUSR1
            yield 1.0

    saving = _saving(saved, final=True)
    trainer, _, _ = _trainer(losses(), callbacks=(saving,), signals=signals)
    state = trainer.fit()
    assert state.step == 3 and saved == [3]  # the stop's save; no second one at the end
    assert trainer.stop_signal == signal.SIGUSR1 and saving.last_saved_step == 3


def test_saves_every_n_steps_and_stop_at_step_ends_the_job_early() -> None:
    saved = Saves()
    trainer, _, _ = _trainer(itertools.repeat(1.0), callbacks=(_saving(saved, every_steps=2),),
                             cfg={"max_steps": 10, "stop_at_step": 5})  # fmt: skip
    assert trainer.fit().step == 5
    assert saved == [2, 4]  # no final save unless asked for
    saved.clear()
    final = _saving(saved, every_steps=2, final=True)
    trainer, _, _ = _trainer(itertools.repeat(1.0), callbacks=(final,),
                             cfg={"max_steps": 10, "stop_at_step": 4})  # fmt: skip
    assert trainer.fit().step == 4 and saved == [2, 4]  # step 4 saved once


def test_a_callback_vote_saves_that_step_and_is_told_of_the_checkpoint() -> None:
    class Timed(Callback):
        """Votes to save at step 3; records what it is told."""

        def __init__(self) -> None:
            self.told: list[tuple[str, int]] = []

        def wants_save(self, trainer: Trainer) -> bool:
            return trainer.state.step + 1 == 3

        def on_checkpoint(self, trainer: Trainer, path: Path, step: int) -> None:
            self.told.append((str(path), step))

    saved, timed = Saves(), Timed()
    trainer, _, _ = _trainer(itertools.repeat(1.0), callbacks=(_saving(saved), timed))
    trainer.fit()
    assert saved == [3] and timed.told == [("step_3", 3)]


def test_early_stopping_stops_and_saves_after_patience_runs_out() -> None:
    val = iter([3.0, 2.0, 2.5, 2.4, 2.6, 1.0])
    saved = Saves()
    evaluate = EvalCallback(lambda: {"val_loss": next(val)}, last_step=6)
    trainer, _, records = _trainer(
        itertools.repeat(1.0), callbacks=(evaluate, _saving(saved, final=True)),
        cfg={"eval_every_steps": 1, "early_stopping_patience": 3},
    )  # fmt: skip
    state = trainer.fit()
    assert state.step == 5 and state.stopped_early and saved == [5]
    assert (state.best_val_loss, state.best_val_step) == (2.0, 2)
    assert [r["val_loss"] for _, r in records.records] == [3.0, 2.0, 2.5, 2.4, 2.6]
    again, _, _ = _trainer(itertools.repeat(1.0), callbacks=(_saving(saved, final=True),),
                           state=state)  # fmt: skip
    assert again.fit().step == 5 and saved == [5]  # a stopped run stays stopped


def test_data_that_runs_out_is_a_data_error() -> None:
    trainer, _, _ = _trainer(itertools.repeat(1.0), data=FakeData(5))  # two and a half steps
    with pytest.raises(DataError, match=r"the data ran out during step 3 of trainer\.max_steps=6"):
        trainer.fit()
