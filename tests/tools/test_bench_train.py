"""tools/bench_train.py times our trainer step, a plain PyTorch loop and transformers' Llama
in one run, and reports each against the baselines."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

from pretrain.engine.memory import estimate_memory
from pretrain.model.llama import LlamaConfig
from tests.conftest import REPO, compose_config, subprocess_env


def test_bench_reports_ours_against_plain_and_hf(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "tools/bench_train.py", "--steps", "3", "--warmup", "1",
         "--variant", "sdpa:model.attn_impl=sdpa",
         "--variant", "switched:trainer.activation_checkpointing=selective model.loss_impl=full "
                      "optim.impl=loop",
         "--json", str(out), "trainer.device=cpu", "trainer.seq_len=32"],
        cwd=REPO, env={**subprocess_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    results = {r["variant"]: r for r in record["results"]}
    assert list(results) == ["sdpa", "switched", "plain", "hf"]
    assert [results[k]["attn"] for k in results] == ["sdpa"] * 4
    for r in results.values():  # micro-batch 4 (the default; global = micro) x 32 tokens
        assert r["tokens_per_s"] == pytest.approx(4 * 32 / r["step_time_s"])
        assert math.isfinite(r["final_loss"])
    ours, plain, hf = results["sdpa"], results["plain"], results["hf"]
    assert ours["vs_plain"] == pytest.approx(ours["tokens_per_s"] / plain["tokens_per_s"])
    assert hf["vs_hf"] == 1.0 and plain["vs_plain"] == 1.0
    lines = proc.stdout.rstrip().splitlines()
    assert lines[-1] == f"ours/hf tokens-per-s ratio: {ours['vs_hf']:.3f}"
    assert lines[-2] == f"ours/plain tokens-per-s ratio: {ours['vs_plain']:.3f}"
    # The same model, data, optimizer and schedule: the plain loop's 4th loss is ours.
    assert plain["final_loss"] == pytest.approx(ours["final_loss"], rel=1e-4)
    # Each row names its switches; the speed switches do not change the numbers either.
    switched = results["switched"]
    assert (ours["ac"], ours["loss"], ours["optim"]) == ("none", "chunked", "auto")
    assert (switched["ac"], switched["loss"], switched["optim"]) == ("selective", "full", "loop")
    assert switched["final_loss"] == pytest.approx(ours["final_loss"], rel=1e-4)
    # Beside the measured peak (a GPU's), the estimate for the row's own configuration.
    tiny = LlamaConfig(**{k: v for k, v in compose_config(["model=tiny"]).model.items()
                          if k in LlamaConfig.__dataclass_fields__})  # fmt: skip
    for row, ac in [(ours, "none"), (switched, "selective")]:
        est = estimate_memory(replace(tiny, loss_impl=row["loss"]), seq_len=32,
                              micro_batch_size=4, dp=1, zero_stage=0, precision="fp32",
                              activation_checkpointing=ac)  # fmt: skip
        assert row["est_mem_gib"] == pytest.approx(est.total / 2**30)


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """tools/bench_train.py as a module (tools/ on sys.path, as when run as a script)."""
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    yield importlib.import_module("bench_train")
    sys.modules.pop("bench_train")


def test_a_row_out_of_gpu_memory_is_reported_not_fatal(bench: ModuleType) -> None:
    import torch

    from pretrain.config import resolve

    run = resolve(compose_config(["trainer.activation_checkpointing=selective"]), world_size=1,
                  cuda_available=False)  # fmt: skip

    def out_of_memory() -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    row = bench.measured("big", out_of_memory, run)
    assert row["oom"] and row["variant"] == "big" and row["ac"] == "selective"
    assert math.isnan(row["tokens_per_s"]) and math.isnan(bench.ratio(row, row))
    assert bench.measured("ok", lambda: {"tokens_per_s": 5.0}, run) == {
        "variant": "ok", "tokens_per_s": 5.0,
    }  # fmt: skip


def test_interleaved_rounds_step_every_row_in_turn(bench: ModuleType) -> None:
    """--rounds N: each row warms up, then the timed steps go round the rows N times, so
    every row gets the same share of each stretch of machine time."""
    calls: list[str] = []

    def row(name: str) -> object:
        def finish(times: list[float]) -> dict[str, float]:
            return {"steps": len(times), "peak_mem_gib": 1.0, "state_mem_gib": 1.0}

        return bench.Row(lambda: calls.append(name), finish)

    results = bench.bench_interleaved([row("a"), row("b")], steps=5, warmup=1, rounds=2,
                                      cuda=False)  # fmt: skip
    assert "".join(calls) == "ab" + "aaabbb" + "aabb"  # warm-up; rounds of 3 and 2 steps
    assert [r["steps"] for r in results] == [5, 5]
    assert all(math.isnan(r["peak_mem_gib"]) for r in results)  # not per row when interleaved


def test_interleaved_rows_train_as_they_do_alone(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "tools/bench_train.py", "--steps", "4", "--warmup", "1", "--rounds", "2",
         "--json", str(out), "trainer.device=cpu", "trainer.seq_len=32"],
        cwd=REPO, env={**subprocess_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "median of 4 steps after 1, in 2 interleaved rounds" in proc.stdout
    ours, plain, hf = json.loads(out.read_text())["results"]
    assert [ours["variant"], plain["variant"], hf["variant"]] == ["ours", "plain", "hf"]
    # Each row keeps its own model, optimizer and data position between rounds.
    assert plain["final_loss"] == pytest.approx(ours["final_loss"], rel=1e-4)
    assert math.isfinite(hf["final_loss"]) and hf["final_loss"] != ours["final_loss"]
    assert proc.stdout.rstrip().splitlines()[-1] == (
        f"ours/hf tokens-per-s ratio: {ours['vs_hf']:.3f}"
    )
