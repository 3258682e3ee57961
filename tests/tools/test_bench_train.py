"""tools/bench_train.py times our trainer step, a plain PyTorch loop and transformers' Llama
in one run, and reports each against the baselines."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

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


def test_a_row_out_of_gpu_memory_is_reported_not_fatal() -> None:
    import importlib.util

    import torch

    from pretrain.config import resolve

    spec = importlib.util.spec_from_file_location("bench_train", REPO / "tools" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
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
