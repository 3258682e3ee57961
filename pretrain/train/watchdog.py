"""No hang, ever: one thread per rank that ends the job when this rank stops making progress,
and acts on a stop signal that a wait would otherwise delay without end.

The trainer says where it is with `watchdog.at(step, phase)` (two attribute writes: free).
The thread wakes every second, and at once on a stop signal: `signal.set_wakeup_fd` makes the
interpreter's C-level handler write the signal number to a pipe even while the main thread is
blocked inside a C call (a gloo or NCCL collective, a DataLoader queue), where the Python
handler of `pretrain.train.signals` cannot run until the call returns.

- **Hang.** In a watched phase (every phase of every step after this process's first, which
  compiles and warms up, also after a resume; not checkpoint saves nor evaluations, whose
  length scales with the model and the file system), no phase change for
  `trainer.hang_timeout_s` seconds ends this rank with
  `EXIT_HUNG`. It first names every rank's last reported step and phase, read from the
  rendezvous store, where each rank's thread publishes its own every few seconds: a rank
  that stopped reporting is the one that hung. The launcher then stops the others (torchrun
  ends the job when one process fails), so no rank waits forever.
- **Stop signal during a wait.** A stop signal normally ends the run after the current step,
  with a checkpoint. When the rank is waiting for data or for the step's collective and is
  still in that same wait `max(STOP_WAIT_S, last step's time)` after the signal, the wait may
  never end: the rank exits at once with 128 + the signal number, saving nothing (the newest
  complete checkpoint stays the one to resume from).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import threading
import time
from datetime import timedelta
from typing import Any

from pretrain import dist
from pretrain.train.signals import STOP_SIGNALS

log = logging.getLogger("pretrain")

EXIT_HUNG = 5
"""Exit code when a rank made no progress for `trainer.hang_timeout_s` seconds."""

STOP_WAIT_S = 5.0
"""Seconds a wait for data or a collective may still take after a stop signal (or the last
step's time, when longer) before the rank exits without saving."""

PHASES = {
    "setup": "setting up",
    "data": "waiting for data",
    "compute": "in forward, backward or the optimizer step (and their collectives)",
    "sync": "waiting for the step's collective",
    "eval": "evaluating",
    "save": "saving a checkpoint",
}
"""Where the main thread can be, as the messages name it."""

WAITS = ("data", "sync")
"""Phases that wait on something outside this rank."""

UNWATCHED = {"setup", "save", "eval"}
"""Phases whose length the hang timeout does not bound (nor the first step: compilation)."""


class Watchdog:
    """A context manager: the thread runs inside `with`; `at()` reports progress."""

    def __init__(self, timeout_s: float, exit_process: Any = None) -> None:
        """`timeout_s`: trainer.hang_timeout_s (0: no hang detection, stop waits still bounded).
        `exit_process(code)`: how the thread ends the process (os._exit; tests pass their own)."""
        self.timeout_s = timeout_s
        self._exit = exit_process or _exit_now
        self._where = (0, "setup", time.monotonic())
        self._first_step: int | None = None  # this process's first: it compiles and warms up
        self._step_started = time.monotonic()
        self._last_step_s = 0.0
        self._signal: tuple[int, float] | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pretrain-watchdog", daemon=True)
        self._pipe: tuple[int, int] | None = None
        self._previous_fd = -1
        self._store: Any = None
        self._published = 0.0

    def at(self, step: int, phase: str) -> None:
        """The main thread enters `phase` ("data", "compute", "sync", "save", "eval") of
        optimizer step `step` (1-based)."""
        now = time.monotonic()
        if self._first_step is None:
            self._first_step = step
        if step != self._where[0]:
            self._last_step_s, self._step_started = now - self._step_started, now
        self._where = (step, phase, now)

    def __enter__(self) -> Watchdog:
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._pipe = (read, write)
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._store = _progress_store()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._pipe is not None:
            with contextlib.suppress(BlockingIOError):  # a full pipe wakes it anyway
                os.write(self._pipe[1], b"\0")  # wake the thread now, not at its next 1 s tick
        self._thread.join(timeout=5)
        signal.set_wakeup_fd(self._previous_fd)
        for fd in self._pipe or ():
            os.close(fd)

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._done.is_set():
            self._read_signals()
            now = time.monotonic()
            self._publish(now)
            step, phase, since = self._where
            waited = now - since
            if self._signal and phase in WAITS:
                signum, at = self._signal
                grace = max(STOP_WAIT_S, self._last_step_s)
                if now - max(at, since) >= grace:
                    self._stop_now(signum, step, phase, waited)
            first = self._first_step
            watched = phase not in UNWATCHED and first is not None and step > first
            if self.timeout_s and watched and waited >= self.timeout_s:
                self._hung(step, phase, waited)

    def _read_signals(self) -> None:
        ready, _, _ = select.select([self._pipe[0]], [], [], 1.0)
        if not ready or self._done.is_set():
            return
        for signum in os.read(self._pipe[0], 64):
            if signum in STOP_SIGNALS and self._signal is None:
                self._signal = (signum, time.monotonic())

    def _stop_now(self, signum: int, step: int, phase: str, waited: float) -> None:
        name = signal.Signals(signum).name
        log.error(
            "%s received while %s in step %d (%.0f s so far), which may never end: exiting "
            "now without saving (exit %d); the newest complete checkpoint is the one to "
            "resume from", name, PHASES[phase], step, waited, 128 + signum,
        )  # fmt: skip
        self._exit(128 + signum)

    def _hung(self, step: int, phase: str, waited: float) -> None:
        lines = [
            f"rank {dist.rank()} made no progress for {waited:.0f} s (trainer.hang_timeout_s="
            f"{self.timeout_s:g}) in step {step}, {PHASES[phase]}: ending the job (exit "
            f"{EXIT_HUNG}) "
            "so the launcher stops every rank; resume from the newest checkpoint (slurm/"
            "pretrain.sh requeues). Some rank is stuck (a hung collective or stuck I/O)."
        ]
        lines += self._ranks_report()
        log.error("%s", "\n  ".join(lines))
        self._exit(EXIT_HUNG)

    # -- every rank's progress, through the rendezvous store ----------------------------------

    def _publish(self, now: float) -> None:
        if self._store is None or now - self._published < _report_every(self.timeout_s):
            return
        step, phase, _ = self._where
        report = {"step": step, "phase": phase, "time": time.time()}
        try:
            self._store.set(f"{_prefix()}{dist.rank()}", json.dumps(report))
            self._published = now
        except Exception:  # the store's host may be the stuck one
            self._store = None

    def _ranks_report(self) -> list[str]:
        """One line per rank: its last reported step and phase, and how long ago."""
        if self._store is None:
            return ["(no rendezvous store to read the other ranks' progress from)"]
        stale = 3 * _report_every(self.timeout_s)
        lines = []
        for r in range(dist.world_size()):
            try:
                key = f"{_prefix()}{r}"
                if not self._store.check([key]):
                    lines.append(f"rank {r}: never reported")
                    continue
                report = json.loads(self._store.get(key))
            except Exception as e:
                lines.append(f"rank {r}: unknown (the store did not answer: {e})")
                continue
            age = time.time() - report["time"]
            note = "  <- stopped reporting: hung or stopped" if age > stale else ""
            phase = PHASES.get(report["phase"], report["phase"])
            age_s = f"reported {age:.0f} s ago"
            lines.append(f"rank {r}: step {report['step']}, {phase}, {age_s}{note}")
        return lines


def _report_every(timeout_s: float) -> float:
    return min(10.0, max(timeout_s / 5, 1.0)) if timeout_s else 10.0


def _prefix() -> str:
    return f"pretrain/progress/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def _progress_store() -> Any:
    """A client of the launcher's rendezvous store (MASTER_ADDR:MASTER_PORT) with a short
    timeout, so a stuck store host cannot block the watchdog; None in a single process."""
    if dist.world_size() == 1 or "MASTER_ADDR" not in os.environ:
        return None
    import torch.distributed as tdist

    try:
        return tdist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=timedelta(seconds=5), wait_for_workers=False,
        )  # fmt: skip
    except Exception as e:  # progress reports are a convenience
        log.warning("hang watchdog: no rendezvous store to report progress to (%s)", e)
        return None


def _exit_now(code: int) -> None:
    """End the process from the watchdog thread: flush the logs, record the code for
    slurm/launch_node.sh, skip the interpreter's teardown (the main thread is blocked)."""
    dist.write_exit_code(code)
    logging.shutdown()
    os._exit(code)
