"""Loggers: metrics.jsonl, the console line, W&B offline fallback, failures never fatal."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import sys
import time
from pathlib import Path

import pytest

from pretrain.config.schema import LoggerConfig, WandbConfig
from pretrain.train.loggers import (
    ConsoleLogger,
    Interval,
    JsonlLogger,
    Loggers,
    ProgressBar,
    build_loggers,
    format_line,
    use_progress_bar,
    wandb_key,
)
from tests.train.wandb_records import read_run

METRICS = {
    "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens": 100, "tokens_per_s": 1e4,
    "step_time_s": 0.01,
}  # fmt: skip


def lines_config(mode: str = "offline", **wandb: object) -> LoggerConfig:
    return LoggerConfig(wandb=WandbConfig(mode=mode, **wandb), progress="lines")


class Recorder:
    def __init__(self) -> None:
        self.records: list[tuple[int, dict]] = []

    def log(self, metrics: dict, step: int) -> None:
        self.records.append((step, metrics))

    def close(self) -> None:
        pass


def test_jsonl_has_one_object_per_step(tmp_path: Path) -> None:
    logger = JsonlLogger(tmp_path / "metrics.jsonl")
    for step in (1, 2):
        logger.log(METRICS, step)
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[0]["loss"] == 2.5


def test_console_prints_every_interval_and_the_last_step(caplog: pytest.LogCaptureFixture) -> None:
    logger = Interval(ConsoleLogger(last_step=25), every=10, last_step=25)
    with caplog.at_level(logging.INFO, logger="pretrain"):
        for step in range(1, 26):
            logger.log(METRICS, step)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split()[1] for line in lines] == ["10/25", "20/25", "25/25"]
    assert "loss 2.5000" in lines[0]


def test_interval_averages_times_and_rates_over_its_steps() -> None:
    inner = Recorder()
    logger = Interval(inner, every=2, last_step=5)
    # 1000 tokens per step: 1 s then 3 s -> 2000 tokens in 4 s = 500 tokens/s, not 1000/3.
    for step, seconds in enumerate([1.0, 3.0, 2.0, 2.0, 5.0], start=1):
        logger.log({
            "loss": float(step), "step_time_s": seconds, "data_wait_s": seconds / 4,
            "compute_s": seconds * 3 / 4, "tokens_per_s": 1000 / seconds,
            "tokens_per_s_per_gpu": 500 / seconds, "mfu": 0.8 / seconds,
        }, step)  # fmt: skip
    logger.log({"val_loss": 1.5}, 5)  # a record without step times passes at once
    steps = [step for step, _ in inner.records]
    assert steps == [2, 4, 5, 5]
    first = inner.records[0][1]
    assert first["loss"] == 2.0  # the last step's value
    assert first["step_time_s"] == pytest.approx(2.0)
    assert first["data_wait_s"] == pytest.approx(0.5)
    assert first["compute_s"] == pytest.approx(1.5)
    assert first["tokens_per_s"] == pytest.approx(500.0)
    assert first["tokens_per_s_per_gpu"] == pytest.approx(250.0)
    assert first["mfu"] == pytest.approx(0.4)
    assert inner.records[2][1]["tokens_per_s"] == pytest.approx(200.0)  # step 5 alone: 5 s
    assert inner.records[3][1] == {"val_loss": 1.5}
    # A step with an evaluation is passed on off the interval, its times averaged so far.
    logger = Interval(inner := Recorder(), every=10, last_step=20)
    for step in (1, 2, 3):
        metrics = {"loss": 1.0, "step_time_s": float(step), "tokens_per_s": 100.0 / step}
        logger.log({**metrics, **({"val_loss": 2.0} if step == 2 else {})}, step)
    assert [(s, r["step_time_s"], r["tokens_per_s"]) for s, r in inner.records] == [
        (2, 1.5, 100 / 1.5)
    ]


def test_console_line_holds_throughput_mfu_memory_and_eta() -> None:
    line = format_line(
        {**METRICS, "tokens_per_s": 123456.0, "tokens_per_s_per_gpu": 15432.0, "mfu": 0.4123,
         "step_time_s": 2.0, "data_wait_s": 0.1, "mem_allocated_gib": 10.04,
         "mem_reserved_gib": 12.0, "mem_peak_gib": 20.55, "loss_scale": 65536.0},
        step=100, last_step=1000,
    )  # fmt: skip
    assert line == (
        "step 100/1000 | loss 2.5000 | lr 1.00e-03 | grad_norm 0.500 | 123,456 tok/s "
        "(15,432/dev) | MFU 41.2% | 2.000 s/step (data 5%) | mem 10.0/20.6 GiB | "
        "scale 65536 | ETA 30m00s"
    )
    assert "ETA 2h00m |" not in format_line({**METRICS, "step_time_s": 4.0}, 1, 1801)
    assert format_line({**METRICS, "step_time_s": 4.0}, 1, 1801).endswith("ETA 2h00m")
    assert "ETA" not in format_line(METRICS, step=1000, last_step=1000)


def test_non_tty_output_is_one_plain_line_per_interval(tmp_path: Path) -> None:
    """In a file (a Slurm log) there is no bar: one line per interval, no \\r, no escapes."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("pretrain")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        loggers = build_loggers(
            LoggerConfig(wandb=WandbConfig(mode="disabled"), progress="auto"), "t", tmp_path,
            {}, log_every=5, last_step=12,
        )  # fmt: skip
        for step in range(1, 13):
            loggers.log(METRICS, step)
        loggers.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    out = stream.getvalue()
    assert [line.split()[1] for line in out.splitlines()] == ["5/12", "10/12", "12/12"]
    assert "\r" not in out and "\x1b" not in out


def test_progress_bar_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    parent, child = pty.openpty()
    try:
        with os.fdopen(child, "w", closefd=False) as tty, pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "stderr", tty)
            assert use_progress_bar("auto")
        assert not use_progress_bar("auto")  # pytest's captured stderr is no terminal
        assert use_progress_bar("bar") and not use_progress_bar("lines")
    finally:
        os.close(parent)
        os.close(child)
    bar = ProgressBar(last_step=4)
    for step in range(1, 5):
        bar.log({**METRICS, "mfu": 0.25}, step)
        time.sleep(0.11)  # past tqdm's redraw interval
    bar.close()
    err = capsys.readouterr().err
    assert "\r" in err and "4/4" in err
    assert "loss=2.5000" in err and "MFU=25.0%" in err and "tok/s=10,000" in err


def test_wandb_keys_are_grouped_by_section() -> None:
    assert wandb_key("loss") == "train/loss"
    assert wandb_key("mfu") == "perf/mfu" and wandb_key("data_wait_s") == "perf/data_wait_s"
    assert wandb_key("mem_peak_gib") == "memory/mem_peak_gib"
    assert wandb_key("val_ppl") == "val/ppl" and wandb_key("val_loss") == "val/loss"
    assert wandb_key("data_skipped_shards") == "data/skipped_shards"


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
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_SILENT", "true")
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        loggers = build_loggers(lines_config("online"), "t", tmp_path, {"a": 1}, 1, 1)
        loggers.log(METRICS, 1)
        loggers.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert read_run(run)[2][0]["train/loss"] == 2.5
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "pretrain" and r.levelno >= logging.WARNING]  # fmt: skip
    assert len(warnings) == 1 and "no W&B API key" in warnings[0]


def test_wandb_online_without_network_falls_back_to_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A key but no server (a closed port): after init_timeout_s, one warning, offline."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        loggers = build_loggers(
            lines_config("online", init_timeout_s=2.0), "t", tmp_path, {"a": 1}, 1, 1
        )
        loggers.log(METRICS, 1)
        loggers.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    run_id, config, history = read_run(run)
    assert config == {"a": 1} and history[0]["train/loss"] == 2.5
    assert run.name.endswith(run_id)
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "pretrain" and r.levelno >= logging.WARNING]  # fmt: skip
    assert len(warnings) == 1 and "could not reach its server" in warnings[0]


def test_wandb_run_id_continues_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = build_loggers(lines_config(), "t", tmp_path, {"a": 1}, 1, 4)
    first.log(METRICS, 1)
    run_id = first.wandb_run_id
    first.close()
    assert run_id
    again = build_loggers(lines_config(), "t", tmp_path, {"a": 1}, 1, 4,
                          resume_step=1, wandb_run_id=run_id)  # fmt: skip
    again.log(METRICS, 2)
    assert again.wandb_run_id == run_id
    again.close()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{run_id}" in r.name for r in runs)  # same id, 2 sessions
