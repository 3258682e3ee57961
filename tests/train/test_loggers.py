"""Loggers: metrics.jsonl, the console line, W&B offline fallback, failures never fatal."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pretrain.config.schema import WandbConfig
from pretrain.train.loggers import ConsoleLogger, JsonlLogger, Loggers, build_loggers

METRICS = {
    "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens": 100, "tokens_per_s": 1e4,
    "step_time_s": 0.01,
}  # fmt: skip


def test_jsonl_has_one_object_per_step(tmp_path: Path) -> None:
    logger = JsonlLogger(tmp_path / "metrics.jsonl")
    for step in (1, 2):
        logger.log(METRICS, step)
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[0]["loss"] == 2.5


def test_console_prints_every_interval_and_the_last_step(caplog: pytest.LogCaptureFixture) -> None:
    logger = ConsoleLogger(every=10, max_steps=25)
    with caplog.at_level(logging.INFO, logger="pretrain"):
        for step in range(1, 26):
            logger.log(METRICS, step)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[1] for line in lines] == ["10/25", "20/25", "25/25"]
    assert "loss 2.5000" in lines[0]


def test_a_failing_logger_is_dropped_and_the_rest_continue(tmp_path: Path) -> None:
    class Broken:
        def log(self, metrics: dict, step: int) -> None:
            raise OSError("disk full")

        def close(self) -> None:
            pass

    jsonl = JsonlLogger(tmp_path / "m.jsonl")
    loggers = Loggers([Broken(), jsonl])
    loggers.log(METRICS, 1)
    loggers.log(METRICS, 2)
    loggers.close()
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2


def test_wandb_online_without_a_key_falls_back_to_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = build_loggers(
        WandbConfig(mode="online"), "t", tmp_path, {"a": 1}, log_every=1, max_steps=1
    )
    loggers.log(METRICS, 1)
    loggers.close()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline W&B run was written"


def test_wandb_run_id_continues_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = build_loggers(WandbConfig(mode="offline"), "t", tmp_path, {"a": 1}, 1, 4)
    first.log(METRICS, 1)
    run_id = first.wandb_run_id
    first.close()
    assert run_id
    again = build_loggers(WandbConfig(mode="offline"), "t", tmp_path, {"a": 1}, 1, 4,
                          resume_step=1, wandb_run_id=run_id)  # fmt: skip
    again.log(METRICS, 2)
    assert again.wandb_run_id == run_id
    again.close()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{run_id}" in r.name for r in runs)  # same id, 2 sessions
