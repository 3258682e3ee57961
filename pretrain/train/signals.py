"""Preemption: a stop request by signal ends the run cleanly, with a checkpoint.

SIGTERM (what Slurm and Kubernetes send before killing), SIGUSR1 (what `sbatch --signal`
sends ahead of the time limit) and SIGINT (Ctrl-C) set a flag; the trainer folds the flag
into the collective it runs every step anyway, so every rank stops after the same step, even
when only one of them got the signal. The run then saves a checkpoint at that step and the
process exits with `EXIT_PREEMPTED`. A second signal aborts at once, without saving: the
newest complete checkpoint is then the one before (an interrupted save never counts).

Launchers deliver one request several times: Slurm signals every process of a job step and
`srun` forwards what it gets, torchrun forwards SIGTERM/SIGINT to its workers as SIGTERM.
So any stop signal within `REPEAT_WINDOW_S` of the first counts as that same request; only
a later one aborts.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from types import FrameType
from typing import Any

log = logging.getLogger("pretrain")

EXIT_PREEMPTED = 75
"""Exit code after a signal-requested stop that saved its checkpoint: sysexits' EX_TEMPFAIL,
"temporary failure, try again". Run the same command again to resume."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

REPEAT_WINDOW_S = 2.0
"""Seconds after the first stop signal during which another one is a copy, not a second."""


class Preempted(Exception):
    """Raised by the run after it saved the checkpoint a stop signal asked for."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step = signum, step


class StopSignals:
    """Installs the stop handlers (main thread only); `received` is the first signal, if any."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._received_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if time.monotonic() - self._received_at < REPEAT_WINDOW_S:
                log.info("%s: the same stop request, delivered again by the launcher", name)
                return
            log.error("second stop signal (%s): aborting now, without saving", name)
            logging.shutdown()
            os._exit(128 + signum)
        self.received, self._received_at = signum, time.monotonic()
        log.warning(
            "%s received: finishing this step, saving a checkpoint, then exiting with code %d "
            "(send one again after %.0f s to abort without saving)",
            name, EXIT_PREEMPTED, REPEAT_WINDOW_S,
        )  # fmt: skip
