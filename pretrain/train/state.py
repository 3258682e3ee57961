"""The trainer's own progress counters, saved with every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    """Where the run stands. `step` counts optimizer steps done; `tokens` tokens consumed."""

    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    """Steps whose update was skipped because some rank's loss was NaN/Inf."""
    best_val_loss: float = float("inf")
    """Early stopping: the lowest val_loss so far, and the step it was measured at."""
    best_val_step: int = 0
    evals_since_best: int = 0
    """Evaluations since best_val_loss last improved (by more than the minimum delta)."""
    stopped_early: bool = False
    """trainer.early_stopping_patience ran out: a resumed job does not train further."""

    def state_dict(self) -> dict[str, int | float | bool]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int | float | bool]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.best_val_loss = float(state.get("best_val_loss", float("inf")))
        self.best_val_step = int(state.get("best_val_step", 0))
        self.evals_since_best = int(state.get("evals_since_best", 0))
        self.stopped_early = bool(state.get("stopped_early", False))
