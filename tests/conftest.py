"""Shared fixtures: compose configs in-process, and launch real training runs as subprocesses.

Training runs go through the real entry points (`python -m pretrain`, `torchrun`), each in
its own process, so process groups and DeepSpeed's global state never leak between tests.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from pretrain.checkpoint import export, manager
from pretrain.config import compose
from pretrain.model.family import family_of, model_fields

REPO = Path(__file__).resolve().parent.parent

# Small and fast, but large enough that accumulation and sharding are exercised. CPU even on
# a GPU machine, so the suite means the same everywhere (GPU tests ask for cuda themselves).
TINY = [
    "trainer.device=cpu",
    "model=tiny",
    "data=synthetic",
    "logger.wandb.mode=disabled",
    "trainer.seq_len=32",
    "trainer.log_every=1",
    # Tests save only where they test saving: a final save costs every run a second or so.
    "checkpoint.save_final=false",
]

# fp32, accumulation 4 on 1 rank (2 on 2), a warm-up then cosine: the checkpoint tests' run.
EXACT = [
    "precision=fp32", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
    "optim.lr=3e-3", "optim.warmup_steps=2",
]  # fmt: skip

# The equivalence runs (tests/train): 6 steps of EXACT, a high lr so steps differ a lot.
EQUIV = [*EXACT, "trainer.max_steps=6"]

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The composed Hydra config for `overrides`, as `python -m pretrain` would see it."""
    return compose(overrides)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    # This venv's programs first (torchrun for the launch scripts, and ninja: DeepSpeed's JIT
    # ops rebuild from scratch whenever another ninja than the last one looks at their cache).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        WANDB_MODE=env.get("WANDB_MODE", "disabled"),
        WANDB_SILENT="true",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def command(args: list[str], nproc: int = 1) -> list[str]:
    """`python -m pretrain ARGS`, or under torchrun with `nproc` processes (gloo)."""
    if nproc == 1:
        return [sys.executable, "-m", "pretrain", *args]
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "-m", "pretrain", *args,
    ]  # fmt: skip


def launch(
    args: list[str], nproc: int = 1, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m pretrain ARGS` (or under torchrun) to the end; capture its output."""
    return subprocess.run(
        command(args, nproc), cwd=REPO, env={**subprocess_env(), **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def start(
    args: list[str], output: Path, nproc: int = 1, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `python -m pretrain ARGS` (or torchrun) in the background, output to a file."""
    with output.open("w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            command(args, nproc), cwd=REPO, env={**subprocess_env(), **(env or {})}, stdout=out,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip


TEARDOWN_PROBE = """\
import atexit, os, sys

def _record(what):
    open(os.path.join({directory!r}, f"{{what}}.{{os.getpid()}}"), "w").close()

def _teardown():  # a training process (not torchrun, not a tool) that ran the teardown
    if sys.argv[0].endswith(os.path.join("pretrain", "__main__.py")):
        _record("teardown")

if "RANK" in os.environ:  # a process torchrun started: the probe is in place
    _record("loaded")
atexit.register(_teardown)
"""


def teardown_probe(directory: Path) -> dict[str, str]:
    """The environment for a launch whose `python -m pretrain` processes each leave
    DIRECTORY/teardown.<pid> if they run the interpreter's teardown (atexit), which
    `dist.finish` skips: a sitecustomize module on PYTHONPATH."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(TEARDOWN_PROBE.format(directory=str(directory)))
    path = [str(directory), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path)}


def tore_down(directory: Path, ranks: int) -> list[str]:
    """The pids that `teardown_probe(directory)` saw run the interpreter's teardown, once it
    is sure the probe was loaded in the `ranks` processes torchrun started."""
    loaded = list(directory.glob("loaded.*"))
    assert len(loaded) >= ranks, f"the teardown probe loaded in {len(loaded)} of {ranks}"
    return sorted(p.name.removeprefix("teardown.") for p in directory.glob("teardown.*"))


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int) -> None:
    """Wait until `proc` itself has logged `step` (not a killed predecessor's records)."""
    started = time.time()
    deadline = time.monotonic() + 120
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            fresh = metrics.stat().st_mtime > started
            lines = metrics.read_text().splitlines()
        except FileNotFoundError:
            fresh, lines = False, []
        if fresh and lines and json.loads(lines[-1])["step"] >= step:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach step {step} (exit {proc.poll()})")


def newest_checkpoint(run_dir: Path) -> int | None:
    ckpts = manager.complete_checkpoints(run_dir / "checkpoints")
    return int(ckpts[-1].name.removeprefix("step_")) if ckpts else None


def train(
    run_dir: Path, overrides: list[str], nproc: int = 1, env: dict[str, str] | None = None
) -> list[dict]:
    """Train with TINY + overrides into run_dir; return metrics.jsonl's records."""
    proc = launch([*TINY, f"run_dir={run_dir}", *overrides], nproc=nproc, env=env)
    if proc.returncode != 0:
        raise AssertionError(
            f"training failed (exit {proc.returncode})\nstdout:\n{proc.stdout[-4000:]}\n"
            f"stderr:\n{proc.stderr[-6000:]}"
        )
    return read_metrics(run_dir)


def loss_list(metrics: list[dict]) -> list[float]:
    return [m["loss"] for m in metrics]


def assert_close(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        assert math.isclose(x, y, rel_tol=rel), f"step {step}: {x} vs {y}"


def curve(metrics: list[dict]) -> list[tuple[int, float, float]]:
    """(step, loss, grad norm) per step: what exact-resume tests compare bit for bit."""
    return [(m["step"], m["loss"], m["grad_norm"]) for m in metrics]


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def export_and_compare(run_dir: Path, weights: dict, out: Path) -> object:
    """tools/export_hf.py RUN OUT, then transformers' logits against ours with `weights`."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), str(run_dir),
                           str(out)], capture_output=True, text=True, cwd=REPO,
                          env=subprocess_env(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    model = manager.read_client_state(export.find_checkpoint(run_dir))["config"]["model"]
    ours = family_of(model).build(model_fields(model))
    ours.load_state_dict(weights)
    tokens = torch.randint(0, model["vocab_size"], (2, 17))
    with torch.no_grad():
        assert (hf(tokens).logits - ours.eval()(tokens)).abs().max().item() < 1e-5
    return hf
