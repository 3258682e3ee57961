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

from pretrain.model.flops import num_params
from pretrain.model.llama import LlamaConfig
from pretrain.model.memory import estimate_memory
from tests.conftest import REPO, compose_config, free_port, subprocess_env

WIDER = "model.d_model=256 model.ffn_hidden=768 model.n_heads=8 model.n_kv_heads=8"


def test_bench_reports_ours_against_plain_and_hf(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "tools/bench_train.py", "--steps", "3", "--warmup", "1",
         "--variant", "sdpa:model.attn_impl=sdpa",
         "--variant", "switched:trainer.activation_checkpointing=selective model.loss_impl=full "
                      "optim.impl=loop",
         "--variant", f"z3:deepspeed.zero_stage=3 deepspeed.reduce_bucket_size=2000000 {WIDER}",
         "--variant", f"z3b:deepspeed.zero_stage=3 deepspeed.reduce_bucket_size=2000000 {WIDER}",
         "--json", str(out), "trainer.device=cpu", "trainer.seq_len=32"],
        cwd=REPO, env={**subprocess_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    results = {r["variant"]: r for r in record["results"]}
    assert list(results) == ["sdpa", "switched", "z3", "z3b", "plain", "hf"]
    assert [results[k]["attn"] for k in results] == ["sdpa"] * 6
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
    # On a CPU memory is measured too (torch.profiler's allocation events): what stays after
    # the warm-up is the states the estimate counts, at ZeRO-0 and at ZeRO-3, whose
    # gradient partitions and reduce bucket stay allocated.
    assert ours["state_mem_gib"] * 2**30 == pytest.approx(12 * num_params(tiny), rel=0.01)
    # ZeRO-3 on a 2M-parameter model, where its states are tens of megabytes: + the fp32
    # master and the gradient partitions (4n each: 7.9 MB) and the bucket (8 MB). Some runs
    # keep 0.4-3.4 MB more after the warm-up, and, twice with the other test worker busy,
    # 11.3 MB (an fp32 copy of the parameters more: a reduction still in flight?), not
    # explained yet (not garbage: collected first). So the row runs twice and the smaller
    # measurement counts, with a tolerance below either term.
    wider = replace(tiny, d_model=256, ffn_hidden=768, n_heads=8, n_kv_heads=8)
    n = num_params(wider)
    z3 = min(results["z3"], results["z3b"], key=lambda r: r["state_mem_gib"])
    est3 = estimate_memory(wider, seq_len=32, micro_batch_size=4, dp=1, zero_stage=3,
                           precision="fp32", reduce_bucket_size=2_000_000)  # fmt: skip
    assert est3.states == 20 * n + 4 * 2_000_000
    assert z3["state_mem_gib"] * 2**30 == pytest.approx(est3.states, abs=5 * 2**20)
    assert z3["est_mem_gib"] == pytest.approx(est3.total / 2**30)
    assert math.isfinite(z3["final_loss"])
    assert all(r["peak_mem_gib"] > r["state_mem_gib"] for r in results.values())


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


def test_check_resolves_every_row_as_on_a_gpu_without_building_one(
    bench: ModuleType, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def main(*args: str) -> str:
        monkeypatch.setattr(sys, "argv", ["bench_train.py", "--check", *args])
        monkeypatch.setattr(bench, "prepare_ours", None)  # building a row would fail
        monkeypatch.setattr(bench, "prepare_loop", None)
        bench.main()
        return capsys.readouterr().out

    out = main("--variant", "c:trainer.compile=true deepspeed.zero_stage=3", "--variant", "s:",
               "model=llama_1b", "trainer.seq_len=4096", "trainer.micro_batch_size=2",
               "trainer.global_batch_size=16")  # fmt: skip
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert list(rows) == ["c", "s", "plain", "hf"]
    # precision=auto and trainer.device=auto resolve as on a GPU, wherever this runs
    assert rows["c"][1:9] == ["cuda", "bf16", "3", "True", "none", "chunked", "4096", "x"]
    assert rows["s"][8:12] == ["x", "2", "x", "8"]  # accumulation 16 / 2
    run = bench.resolve_row("s", ["model=llama_1b", "trainer.seq_len=4096",
                                  "trainer.micro_batch_size=2",
                                  "trainer.global_batch_size=16"], gpu=True)  # fmt: skip
    assert float(rows["s"][-1]) == pytest.approx(bench.estimated_gib(run), abs=0.01)
    assert rows["hf"][-1] == "nan"  # transformers' model: no estimate of ours applies
    with pytest.raises(SystemExit) as exited:
        main("--variant", "ok:", "--variant", "typo:trainer.compil=true")
    assert exited.value.code == 2
    assert "row 'typo'" in capsys.readouterr().err


def test_the_gpu_script_commands_all_resolve(tmp_path: Path) -> None:
    """BENCH_CHECK=1 runs every bench command line of tools/bench_gpu.sh through
    `bench_train.py --check`, so a config error shows here, not in scarce GPU time
    (llama_125m at seq 4096 once exceeded the preset's max_seq_len)."""
    parts = ["small", "large", "zero", "accum", "long:16384"]
    proc = subprocess.run(
        ["bash", "tools/bench_gpu.sh", *parts], cwd=REPO, capture_output=True, text=True,
        env={**subprocess_env(), "PYTHONPATH": str(REPO), "BENCH_CHECK": "1",
             "OUT": str(tmp_path)}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    names = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("== ")]
    assert names == ["small_2048", "small_4096", "large_2048", "large_4096", "zero_4096",
                     "accum_4096", "long_16384_sp1", "long_16384_sp2",
                     "long_16384_sp4"]  # fmt: skip
    assert proc.stdout.count("(exit 0)") == len(names)
    assert "z1big" in proc.stdout and "4096 x 2 x 8" in proc.stdout  # accum: 64K tokens a step
    # long: resolved as on 1, 2 and 4 ranks; the estimate falls as the sequence splits
    long = [float(line.split()[-1]) for line in proc.stdout.splitlines()
            if line.strip().startswith("ours") and "16384 x 1 x 1" in line]  # fmt: skip
    assert len(long) == 3 and long[0] > long[1] > long[2]
    assert not list(tmp_path.glob("*.json"))  # nothing ran
    # BENCH_ARGS reach every bench; a part that fails makes the script fail, after the rest ran.
    bad = subprocess.run(
        ["bash", "tools/bench_gpu.sh", "zero", "small:2048"], cwd=REPO, capture_output=True,
        text=True, env={**subprocess_env(), "PYTHONPATH": str(REPO), "BENCH_CHECK": "1",
                        "OUT": str(tmp_path), "BENCH_ARGS": "trainer.compil=true"},
        timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2, bad.stdout[-3000:]
    assert "== zero_4096 (exit 2)" in bad.stdout and "== small_2048 (exit 2)" in bad.stdout
    assert "Key 'compil' not in 'TrainerConfig'" in bad.stdout


def test_sequence_parallel_rows_under_torchrun_hold_half_the_activations(tmp_path: Path) -> None:
    """The same long-sequence run on 1 rank, and under torchrun on 2 ranks splitting each
    sequence (parallel.sequence=2): rank 0's measured peak, and the estimate, drop toward
    half (the activations halve; the small model's states do not)."""
    args = ["--no-baselines", "--steps", "2", "--warmup", "1", "trainer.device=cpu",
            "precision=fp32", "trainer.seq_len=4096", "model.max_seq_len=4096",
            "trainer.micro_batch_size=1", *WIDER.split()]  # fmt: skip
    env = {**subprocess_env(), "PYTHONPATH": str(REPO)}
    peaks = {}
    for sp, launcher in ((1, [sys.executable]),
                         (2, [sys.executable, "-m", "torch.distributed.run",
                              "--nproc_per_node=2", "--rdzv-backend=c10d",
                              f"--rdzv-endpoint=127.0.0.1:{free_port()}"])):  # fmt: skip
        out = tmp_path / f"sp{sp}.json"
        proc = subprocess.run(
            [*launcher, "tools/bench_train.py", *args, f"parallel.sequence={sp}", "--json",
             str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        (row,) = json.loads(out.read_text())["results"]
        peaks[sp] = row["peak_mem_gib"], row["est_mem_gib"]
        assert row["tokens_per_s"] == pytest.approx(4096 / row["step_time_s"])
    (measured1, est1), (measured2, est2) = peaks[1], peaks[2]
    assert est2 < 0.65 * est1 and measured2 < 0.7 * measured1, peaks
    assert measured2 == pytest.approx(est2, rel=0.25), peaks
