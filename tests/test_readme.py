"""The README, followed as a new user would: every command of its fenced shell blocks, as
written and in order, in a fresh copy of the checkout installed exactly as the Quickstart's
first command says (`pip install -e .`, no extras), with a fresh home directory.

A command that needs GPUs, a cluster or the network is not run here: NOT_RUN names it with
the reason and the test that covers it instead. Commands documented to need an extra are
run and must exit 2 naming the `pip install` that fixes it (the base install lacks it).
Every other command must exit 0; some results are checked further (CHECKS). A README edit
that breaks a command, or adds one that fails, fails this test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.M | re.S)

# Command prefix -> (why it is not run here, the test that runs it instead).
NOT_RUN = {
    "python3 -m venv .venv && .venv/bin/pip install -q -c .ci/torch-cpu.txt -e '.[dev]'": (
        "the test suite itself (it would run this test again)",
        ".ci/run, which runs exactly this command on every submission",
    ),
    "torchrun --nproc_per_node=8 -m pretrain parallel.sequence=4": (
        "needs 8 GPUs",
        "tests/train/test_sequence_parallel.py on 2 and 4 CPU ranks (ZeRO 0-3, the document "
        "mask, the tiled MLP), and the README's 2-rank parallel.sequence line",
    ),
    "torchrun --nproc_per_node=8 -m pretrain model=olmoe_1b_7b": (
        "needs 8 GPUs",
        "tests/train/test_expert_parallel.py (parallel.expert=2 on 2 CPU ranks equals 1 at "
        "ZeRO 0-3, resume, export), tests/train/test_moe_training.py and "
        "tests/tools/test_moe_tools.py, with the README's 2-rank parallel.expert line",
    ),
    "torchrun --nproc_per_node=8": (
        "needs 8 GPUs",
        "tests/train/test_gpu.py (GPU) and, on 2 CPU ranks, the README's torchrun line before it",
    ),
    "sbatch -N 4": (
        "needs a Slurm cluster of GPU nodes",
        "tests/slurm/test_pretrain_sh.py::test_two_nodes_train_like_torchrun_on_one",
    ),
    "NNODES=2 RDZV_ENDPOINT=node0:29500": (
        "needs a second node named node0",
        "tests/slurm/test_pretrain_sh.py::test_launch_node_on_two_nodes_without_slurm",
    ),
    "sbatch --array=0-2": (
        "needs a Slurm cluster of GPU nodes",
        "tests/slurm/test_pretrain_sh.py::test_sweep_runs_one_job_per_line",
    ),
    "sbatch --array=0-63 slurm/prepare_data.sh": (
        "needs a Slurm cluster and a corpus",
        "tests/slurm/test_pretrain_sh.py::test_prepare_data_array_then_merge",
    ),
}

# Command prefix -> what its exit-2 message must say in the base install (no [eval] extra).
NEEDS_EXTRA = {
    "python tools/eval_harness.py": "pip install -e '.[eval]'",
    "python tools/eval_generate.py": "pip install -e '.[eval]'",
    "python tools/quantize.py": "pip install -e '.[quant]'",
}
# The test that runs each of them with its extra installed (the dev install has them all).
EXTRA_COVERED_BY = {
    "eval_harness": "tests/tools/test_eval_tools.py",
    "eval_generate": "tests/tools/test_eval_tools.py",
    "quantize": "tests/tools/test_compress_tools.py",
}


def readme_commands(text: str) -> list[str]:
    """The commands of the README's shell blocks, continuation lines joined."""
    commands = []
    for block in SHELL_BLOCK.findall(text):
        for line in block.replace("\\\n", "").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def _checkout_copy(dst: Path) -> Path:
    """The checkout's files as a fresh clone would have them (tracked and not ignored)."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            (dst / name).write_bytes(src.read_bytes())
    return dst


def _user_env(home: Path, venv: Path) -> dict[str, str]:
    """A new user's shell: a fresh HOME, no virtualenv of the test suite's on PATH, and, once
    the Quickstart made it, the README's venv activated (`source .venv/bin/activate`)."""
    ours = str(Path(sys.executable).parent)
    keep = {k: v for k, v in os.environ.items()
            if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PRETRAIN_DATA_DIR")}  # fmt: skip
    path = [p for p in keep.get("PATH", "").split(os.pathsep) if p and p != ours]
    if (venv / "bin" / "python").is_file():
        path.insert(0, str(venv / "bin"))
        keep["VIRTUAL_ENV"] = str(venv)
    pip_cache = os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    return {
        **keep,
        "PATH": os.pathsep.join(path),
        "HOME": str(home),
        "PIP_CACHE_DIR": pip_cache,  # the same downloads as the suite's own install
        "HF_HUB_OFFLINE": "1",  # nothing here reads the Hub; never wait on it
        "WANDB_SILENT": "true",
    }


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _demo_trained(cwd: Path, out: str) -> None:
    records = _metrics(cwd / "runs" / "demo")
    assert [r["step"] for r in records if "loss" in r][-1] == 200
    assert records[-1]["loss"] < records[0]["loss"] - 1.5, "the demo's loss should fall"
    assert (cwd / "runs/demo/checkpoints/step_200/COMMITTED.json").is_file()  # save_final
    # The README's sample of the start-up summary: every label is there, in that order.
    sample = re.search(r"^```\n(run {8}demo.*?)^```", README_TEXT, re.M | re.S)
    assert sample, "the README's start-up summary sample is gone"
    printed = [re.sub(r"^\S+ INFO ", "", line) for line in out.splitlines()]
    labels = [line[:11] for line in sample.group(1).splitlines()]
    found = [line[:11] for line in printed if line[:11] in labels]
    assert found[: len(labels)] == labels, (labels, found)
    for line in sample.group(1).splitlines():  # all but the W&B run's random id, verbatim
        assert "offline-run-" in line or line in printed, f"the demo no longer prints {line!r}"


def _one_shard_trained(cwd: Path, out: str) -> None:
    manifest = json.loads((cwd / "shards" / "manifest.json").read_text())
    assert len(manifest["train"]) == 1  # a small corpus: one shard, two default workers
    assert [r["step"] for r in _metrics(cwd / "runs" / "docs")][-1] == 100
    assert (cwd / "runs/docs/checkpoints/step_100/COMMITTED.json").is_file()


def _sft_demo_trained(cwd: Path, out: str) -> None:
    records = [r for r in _metrics(cwd / "runs" / "sft_demo") if "loss" in r]
    assert records[-1]["step"] == 300 and records[-1]["loss"] < records[0]["loss"] - 1.0
    assert records[-1]["data_loss_tokens"] > 0 and records[-1]["data_ignored_tokens"] > 0
    config = json.loads((cwd / "runs/sft_demo/hf/tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]


CHECKS: dict[str, Callable[[Path, str], None]] = {
    "python3 -m venv .venv && .venv/bin/pip install -c": _demo_trained,
    "python tools/export_hf.py runs/demo hf/demo": lambda cwd, out: (
        json.loads((cwd / "hf/demo/config.json").read_text())["architectures"]
        == ["LlamaForCausalLM"]
    ),
    "python tools/export_hf.py runs/demo_moe hf/demo_moe": lambda cwd, out: (
        json.loads((cwd / "hf/demo_moe/config.json").read_text())["architectures"]
        == ["Qwen3MoeForCausalLM"]
    ),
    'python -c "import transformers as t; m =': lambda cwd, out: out.strip().startswith("def"),
    "pretrain experiment=sft_demo": _sft_demo_trained,
    "python tools/generate.py runs/sft_demo/hf --chat": lambda cwd, out: out.startswith(
        "from "
    ),  # the form the demo conversations teach: from json import dumps
    'python -c "import transformers as t; tok =': lambda cwd, out: (
        out.strip() == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant"
    ),
    "python tools/plot_metrics.py": lambda cwd, out: (cwd / "curves.png").stat().st_size > 0,
    "python tools/generate.py runs/demo --prompt-file": lambda cwd, out: (
        len((cwd / "completions.jsonl").read_text().splitlines()) == 3
    ),
    "python tools/inspect_ckpt.py runs/demo": lambda cwd, out: "step_200" in out,
    "python -m pretrain data=shards": _one_shard_trained,
    "python tools/eval_ppl.py runs/demo": lambda cwd, out: "ppl" in out,
}

README_TEXT = (REPO / "README.md").read_text()


def _prefix(command: str, table: dict) -> str | None:
    return next((k for k in table if command.startswith(k)), None)


def test_every_table_entry_names_a_readme_command_and_a_real_test() -> None:
    """No stale entry: each exception matches a README command, each covering test exists."""
    commands = readme_commands(README_TEXT)
    for command in commands:  # each runs in a shell of its own: no state carries over
        assert not re.match(r"(cd|export|pushd) ", command) and "<<" not in command, command
    for prefix in [*NOT_RUN, *NEEDS_EXTRA, *CHECKS]:
        assert any(c.startswith(prefix) for c in commands), f"no README command {prefix!r}"
    for _, covered in NOT_RUN.values():
        path, _, name = covered.partition("::")
        if path.startswith("tests/"):
            text = (REPO / path.split()[0]).read_text()
            assert not name or f"def {name}(" in text, covered
    for tool, test in EXTRA_COVERED_BY.items():
        assert f'"{tool}.py"' in (REPO / test).read_text(), (tool, test)


@pytest.mark.timeout(2400)
def test_readme_walkthrough(tmp_path: Path) -> None:
    cwd = _checkout_copy(tmp_path / "pretrain")
    home = tmp_path / "home"
    home.mkdir()
    commands = readme_commands(README_TEXT)
    assert commands[0].startswith("python3 -m venv .venv && .venv/bin/pip install -c")
    timings = []
    for command in commands:
        if _prefix(command, NOT_RUN):
            continue
        env = _user_env(home, cwd / ".venv")
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=1200, stdin=subprocess.DEVNULL)  # fmt: skip
        timings.append((time.perf_counter() - t0, command))
        out = proc.stdout + proc.stderr
        said = f"README command failed: {command}\nexit {proc.returncode}\n{out[-5000:]}"
        extra = _prefix(command, NEEDS_EXTRA)
        if extra:
            assert proc.returncode == 2 and NEEDS_EXTRA[extra] in proc.stderr, said
            assert "Traceback" not in out, said
            continue
        assert proc.returncode == 0, said
        check = _prefix(command, CHECKS)
        if check:
            assert CHECKS[check](cwd, out) is not False, f"{said}\n(check {check!r} failed)"
    for seconds, command in sorted(timings, reverse=True)[:5]:
        print(f"{seconds:6.1f} s  {command[:100]}")
