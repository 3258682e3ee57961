"""`trainer.profile_steps=[a,b]`: a torch profiler trace of optimizer steps a..b.

Each rank writes `<run_dir>/profile/rank<R>_steps<a>-<b>.json.gz`, a Chrome trace that
https://ui.perfetto.dev and chrome://tracing open as is; every step is a span named
`step <n>`, so the slow one is easy to find. With `trainer.profile_memory=true` on CUDA the
same steps also record the caching allocator's history, dumped to
`rank<R>_steps<a>-<b>_memory.pickle` for https://pytorch.org/memory_viz.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

log = logging.getLogger("pretrain")

MEMORY_HISTORY_ENTRIES = 100_000
"""Allocator events kept for the memory snapshot (the oldest drop out beyond this)."""


class StepProfiler:
    """Starts the profiler before step `first` and writes the trace after step `last`."""

    def __init__(
        self, out_dir: Path, first: int, last: int, rank: int, device: torch.device,
        memory: bool = False,
    ) -> None:  # fmt: skip
        self.first, self.last = first, last
        self.cuda = device.type == "cuda"
        self.memory = memory and self.cuda
        stem = f"rank{rank}_steps{first}-{last}"
        self.trace_path = out_dir / f"{stem}.json.gz"
        self.memory_path = out_dir / f"{stem}_memory.pickle"
        self._prof: profile | None = None
        self._span: record_function | None = None

    def step_started(self, step: int) -> None:
        """Called before optimizer step `step` (numbered from 1) runs."""
        if step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._prof = profile(activities=activities, record_shapes=True, with_stack=False)
            if self.memory:
                torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            self._prof.start()
        if self._prof is not None:
            self._span = record_function(f"step {step}")
            self._span.__enter__()

    def step_finished(self, step: int) -> None:
        """Called after optimizer step `step` completed (all ranks agreed on it)."""
        self._end_span()
        if self._prof is not None and step >= self.last:
            self._write()

    def close(self) -> None:
        """Write what was recorded when the run ended inside the window (a stop signal)."""
        self._end_span()
        if self._prof is not None:
            log.warning("the run ended inside trainer.profile_steps: writing the steps so far")
            self._write()

    def _end_span(self) -> None:
        if self._span is not None:
            self._span.__exit__(None, None, None)
            self._span = None

    def _write(self) -> None:
        assert self._prof is not None
        if self.cuda:
            torch.cuda.synchronize()
        self._prof.stop()
        self.trace_path.parent.mkdir(parents=True, exist_ok=True)
        self._prof.export_chrome_trace(str(self.trace_path))
        self._prof = None
        log.info("profiled steps %d-%d: %s (open in https://ui.perfetto.dev)", self.first,
                 self.last, self.trace_path)  # fmt: skip
        if self.memory:
            torch.cuda.memory._dump_snapshot(str(self.memory_path))
            torch.cuda.memory._record_memory_history(enabled=None)
            log.info("memory snapshot: %s (open in https://pytorch.org/memory_viz)",
                     self.memory_path)  # fmt: skip
