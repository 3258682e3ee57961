"""Read finished (or running) run dirs back: metrics.jsonl records and one summary per run.

`tools/plot_metrics.py` draws the records; `tools/compare_runs.py` tabulates the summaries.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METRICS_FILE = "metrics.jsonl"


@dataclass
class Run:
    """One run's records, in step order, and its resolved config when config.yaml is there."""

    name: str
    path: Path
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    def series(self, key: str, x: str = "tokens") -> tuple[list[float], list[float]]:
        """(x, y) over the records that hold `key` (evaluations log only some steps)."""
        rows = [r for r in self.records if r.get(key) is not None and x in r]
        return [r[x] for r in rows], [r[key] for r in rows]


def load_run(path: str | Path) -> Run:
    """A run dir (or its metrics.jsonl); raises FileNotFoundError/ValueError naming the file."""
    path = Path(path)
    file = path if path.is_file() else path / METRICS_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{path}: no {METRICS_FILE} there; give a run dir (run_dir of a training run) "
            "or a metrics.jsonl file"
        )
    records = []
    lines = file.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                break  # a run killed mid-write leaves a torn last line: ignore it
            raise ValueError(f"{file}:{n}: not JSON ({e})") from e
    if not records:
        raise ValueError(f"{file}: no records yet (the run has not finished a step)")
    run_dir = file.parent
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    # One row per step: an evaluation's record joins its step's training record, and a step
    # written twice (a file copied across a resume) keeps its latest values.
    by_step: dict[int, dict[str, Any]] = {}
    for r in records:
        if "step" in r:
            by_step.setdefault(r["step"], {}).update(r)
    return Run(run_dir.name, run_dir, [by_step[s] for s in sorted(by_step)], config or {})


def load_runs(paths: list[str] | list[Path]) -> list[Run]:
    """Several runs, labelled by dir name (with the parent dir where two names collide)."""
    runs = [load_run(path) for path in paths]
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.path.parent.name}/{run.path.name}"
    return runs


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(run: Run, last: int = 10) -> dict[str, Any]:
    """A run's final figures: loss as the mean of the last `last` steps (one step is noisy),
    throughput as medians (the first steps hold warm-up and compilation)."""
    train = [r for r in run.records if "loss" in r]
    tail = train[-last:]
    val = [r for r in run.records if "val_loss" in r]
    times = [r["step_time_s"] for r in train if "step_time_s" in r]
    waits = [r["data_wait_s"] for r in train if "data_wait_s" in r]
    peaks = [r["mem_peak_gib"] for r in run.records if "mem_peak_gib" in r]
    derived = run.config.get("derived", {})
    return {
        "run": run.name,
        "steps": train[-1]["step"] if train else 0,
        "tokens": train[-1].get("tokens") if train else None,
        "world_size": derived.get("world_size"),
        "final_loss": statistics.fmean(r["loss"] for r in tail) if tail else None,
        "min_loss": min(r["loss"] for r in train) if train else None,
        "val_loss": val[-1]["val_loss"] if val else None,
        "val_ppl": val[-1].get("val_ppl") if val else None,
        "tokens_per_s": _median([r["tokens_per_s"] for r in train if "tokens_per_s" in r]),
        "tokens_per_s_per_gpu": _median(
            [r["tokens_per_s_per_gpu"] for r in train if "tokens_per_s_per_gpu" in r]
        ),
        "mfu": _median([r["mfu"] for r in train if "mfu" in r]),
        "data_wait_share": sum(waits) / sum(times) if waits and sum(times) > 0 else None,
        "peak_mem_gib": max(peaks) if peaks else None,
        "skipped_steps": train[-1].get("skipped_steps") if train else None,
        "train_hours": sum(times) / 3600 if times else None,
    }
