"""Preemption: a stop request by signal ends the run cleanly, with a checkpoint.

SIGTERM (what Slurm and Kubernetes send before killing), SIGUSR1 (what `sbatch --signal`
sends ahead of the time limit) and SIGINT (Ctrl-C) set a flag; the trainer folds the flag
into the collective it runs every step anyway, so every rank stops after the same step, even
when only one of them got the signal. The run then saves a checkpoint at that step and the
process exits with `EXIT_PREEMPTED`. A second signal aborts at once, without saving: the
newest complete checkpoint is then the one before (an interrupted save never counts).
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType
from typing import Any

log = logging.getLogger("pretrain")

EXIT_PREEMPTED = 75
"""Exit code after a signal-requested stop that saved its checkpoint: sysexits' EX_TEMPFAIL,
"temporary failure, try again". Run the same command again to resume."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """Raised by the run after it saved the checkpoint a stop signal asked for."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.signum, self.step = signum, step


class StopSignals:
    """Installs the stop handlers (main thread only); `received` is the first signal, if any."""

    def __init__(self) -> None:
        self.received: int | None = None
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
            log.error("second stop signal (%s): aborting now, without saving", name)
            logging.shutdown()
            os._exit(128 + signum)
        self.received = signum
        log.warning(
            "%s received: finishing this step, saving a checkpoint, then exiting with code %d "
            "(send it again to abort without saving)", name, EXIT_PREEMPTED,
        )  # fmt: skip
