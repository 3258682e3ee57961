"""A callback that a run adds from its config alone (`trainer.callbacks=[{_target_:
tests.train.callback_probe.HookLog, out: DIR}]`): it writes, per rank, every hook it was
called with, for tests/train/test_observability.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pretrain.train.callbacks import Callback
from pretrain.train.trainer import StepResult, Trainer


class HookLog(Callback):
    def __init__(self, out: str) -> None:
        self.path = Path(out) / f"hooks_rank{os.environ.get('RANK', '0')}.json"
        self.calls: list[list] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.calls.append(["fit_start", trainer.state.step])

    def on_step_end(self, trainer: Trainer, result: StepResult, record: dict[str, float]) -> None:
        self.calls.append(["step_end", trainer.state.step, sorted(record)])

    def on_checkpoint(self, trainer: Trainer, path: Path, step: int) -> None:
        self.calls.append(["checkpoint", step, Path(path).name])

    def on_fit_end(self, trainer: Trainer) -> None:
        self.calls.append(["fit_end", trainer.state.step])

    def close(self) -> None:
        self.calls.append(["close"])
        self.path.write_text(json.dumps(self.calls))
