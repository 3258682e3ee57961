"""tools/estimate.py sizes a run: every figure checked against arithmetic done by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, subprocess_env

LLAMA_7B = ["model=llama_7b", "trainer.seq_len=4096", "trainer.global_batch_tokens=4194304",
            "trainer.micro_batch_size=1", "deepspeed.zero_stage=3"]  # fmt: skip


def estimate(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "estimate.json"
    proc = subprocess.run(
        [sys.executable, "tools/estimate.py", "--json", str(out), *args],
        cwd=REPO, env={**subprocess_env(), "PYTHONPATH": str(REPO)}, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    return proc, json.loads(out.read_text()) if proc.returncode == 0 else {}


def test_llama_7b_on_64_h100s_by_hand(tmp_path: Path) -> None:
    proc, e = estimate(tmp_path, "--tokens", "1e12", "--nodes", "8", "--gpus-per-node", "8",
                       "--gpu", "H100", "--mfu", "0.45", *LLAMA_7B)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    n = 6_738_415_616  # Llama 2 7B's published count
    assert e["params"] == n
    # Matmul weights: all but the 32000 x 4096 input embedding and the 65 norm gains.
    assert e["matmul_params"] == n - 32000 * 4096 - 65 * 4096 == 6_607_077_376
    # 6 N_matmul + 12 L T d (attention over the full score matrix).
    flops = 6 * 6_607_077_376 + 12 * 32 * 4096 * 4096
    assert e["flops_per_token"] == flops == 46_084_915_200
    assert (e["global_batch_size"], e["grad_accum"], e["gpus"]) == (1024, 16, 64)
    assert e["steps"] == 238_419  # ceil(1e12 / 4,194,304)
    tokens_per_s = 0.45 * 989e12 * 64 / flops  # about 618.1K tokens/s
    assert e["tokens_per_s"] == pytest.approx(tokens_per_s)
    hours = 238_419 * 4_194_304 / tokens_per_s / 3600  # about 449 h
    assert e["hours"] == pytest.approx(hours) and e["gpu_hours"] == pytest.approx(64 * hours)
    # ZeRO-3 on 64 ranks: every state divided by 64; bf16 activations of one 4096-token
    # sequence: 32 blocks x 186,368 B + final norm 32,768 B per token, and the chunked loss:
    # dL/dx (2 x 4096 B per token), dL/dW in bf16 and its fp32 accumulator (6 x 32000 x
    # 4096 B) and one 2048-token chunk's logits in fp32 and bf16 (6 x 2048 x 32000 B).
    z3 = e["memory"]["3"]
    assert (z3["weights"], z3["grads"], z3["optimizer"]) == (2 * n // 64, 2 * n // 64, 12 * n // 64)
    loss = 4096 * 2 * 4096 + 6 * 32000 * 4096 + 6 * 2048 * 32000
    assert z3["activations"] == 4096 * (32 * 186_368 + 32_768) + loss
    # ZeRO-3 keeps its gradient partitions, beside the activations, and a reduce bucket of
    # deepspeed.reduce_bucket_size (5e8) bf16 elements.
    assert z3["buffers"] == 2 * 500_000_000
    assert z3["total"] == (z3["weights"] + z3["grads"] + z3["optimizer"] + z3["buffers"]
                           + z3["activations"])  # fmt: skip
    assert "1" in e["memory"] and e["memory"]["1"]["buffers"] == 0
    assert "0.93 GiB reduce bucket" in proc.stdout
    assert e["memory"]["0"]["optimizer"] == 12 * n  # unsharded: 75 GiB, more than an H100 holds
    assert "0   " in proc.stdout and "too big" in proc.stdout and "<- configured" in proc.stdout


def test_bad_input_is_named(tmp_path: Path) -> None:
    proc, _ = estimate(tmp_path, "--tokens", "1e9", "--gpus-per-node", "1", "--gpu", "V100",
                       "model=llama_1b")  # fmt: skip
    assert proc.returncode == 2 and "--gpu V100" in proc.stderr and "--peak-tflops" in proc.stderr
    proc, _ = estimate(tmp_path, "--tokens", "1e9", "--gpus-per-node", "3", "model=llama_1b",
                       "trainer.global_batch_size=8", "trainer.micro_batch_size=1")  # fmt: skip
    assert proc.returncode == 2 and "trainer.global_batch_size=8 is not divisible" in proc.stderr
    proc, _ = estimate(tmp_path, "--tokens", "1e9", "--gpus-per-node", "1", "model=lstm")
    assert proc.returncode == 2 and "model=llama_*" in proc.stderr


def test_a_mixture_of_experts_model_is_sized_by_its_active_weights(tmp_path: Path) -> None:
    """OLMoE-1B-7B on 8 H100s: FLOPs from the 1.18B weights a token goes through, memory
    from all 6.9B (every rank holds every expert: no expert parallelism yet)."""
    proc, e = estimate(tmp_path, "--tokens", "1e11", "--gpus-per-node", "8", "--gpu", "H100",
                       "model=olmoe_1b_7b", "trainer.seq_len=4096",
                       "trainer.global_batch_tokens=4194304", "trainer.micro_batch_size=1",
                       "deepspeed.zero_stage=3")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    n, active = 6_919_161_856, 1_178_861_568
    assert (e["params"], e["matmul_params"]) == (n, active)
    assert e["flops_per_token"] == 6 * active + 12 * 16 * 4096 * 2048
    assert "the top-k experts a token goes through" in proc.stdout
    z3 = e["memory"]["3"]
    assert (z3["weights"], z3["optimizer"]) == (2 * n // 8, 12 * n // 8)
    # parallel.expert=8: ZeRO-1 holds an eighth of the experts' weights per rank, as ZeRO-3
    # shards them; the dense ones whole.
    experts = 16 * 64 * 3 * 2048 * 1024
    _, ep = estimate(tmp_path, "--tokens", "1e11", "--gpus-per-node", "8", "--gpu", "H100",
                     "model=olmoe_1b_7b", "trainer.seq_len=4096", "parallel.expert=8",
                     "trainer.global_batch_tokens=4194304", "trainer.micro_batch_size=1",
                     "deepspeed.zero_stage=1")  # fmt: skip
    z1 = ep["memory"]["1"]
    assert z1["weights"] == 2 * (n - experts) + 2 * experts // 8
    assert z1["optimizer"] == 12 * n // 8


def test_which_sequence_parallel_size_fits_a_long_context(tmp_path: Path) -> None:
    """llama_7b at seq 131072 on 8 H100s, ZeRO-3, no activation checkpointing: one GPU per
    sequence is far too big; the table names the parallel.sequence sizes that fit, each
    holding seq / N tokens (activations divide by N; ZeRO still shards over all 8)."""
    proc, e = estimate(tmp_path, "--tokens", "1e9", "--nodes", "1", "--gpus-per-node", "8",
                       "--gpu", "H100", "model=llama_7b", "trainer.seq_len=131072",
                       "model.max_seq_len=131072", "trainer.global_batch_size=8",
                       "trainer.micro_batch_size=1", "deepspeed.zero_stage=3",
                       "parallel.sequence=4", "model.mlp_chunk_tokens=8192")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        e["sequence_parallel"] == 4 and "data-parallel size 2 x sequence parallel 4" in proc.stdout
    )
    by = {int(n): total for n, total in e["by_sequence_parallel"].items()}
    assert sorted(by) == [1, 2, 4, 8]  # 8 GPUs; 32 heads and 32 key/value heads divide
    assert by[4] == e["memory"]["3"]["total"]
    # The same ZeRO-3 states at every N (sharded over all 8); the activations are per token
    # (split ranks add the exchanged attention output o_proj keeps), so from N = 2 on, going
    # to 2N saves half of what the step before saved.
    assert by[1] > by[2] and by[2] - by[4] == 2 * (by[4] - by[8]) > 0
    lines = proc.stdout.split("with parallel.sequence=N")[1].splitlines()
    assert any(line.split()[0] == "1" and "too big" in line for line in lines[1:])
    assert any(line.split()[0] == "8" and "fits" in line for line in lines[1:])
    assert any("<- configured" in line and line.split()[0] == "4" for line in lines[1:])
