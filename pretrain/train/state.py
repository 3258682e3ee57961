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

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
