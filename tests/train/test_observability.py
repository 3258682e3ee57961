"""A real run's observability, end to end: W&B offline run, console, metrics.jsonl, profile.

One run stops at step 3 (as a time-boxed job would) and a second resumes it to step 6 under
torchrun with 2 ranks: the W&B run must continue under the same id, from rank 0 alone.
"""

from __future__ import annotations

import fcntl
import gzip
import json
import math
import os
import pty
import re
import struct
import subprocess
import termios
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from pretrain.config import compose
from pretrain.model.flops import flops_per_token
from tests.conftest import REPO, TINY, command, launch, read_metrics, subprocess_env
from tests.train.wandb_records import payloads, read_run

pytestmark = pytest.mark.multiprocess

COMMON = [
    "trainer.max_steps=6", "trainer.log_every=2", "checkpoint.every_steps=3",
    "logger.wandb.mode=offline", "logger.wandb.log_checkpoints=true",
    "logger.peak_tflops=0.001",  # a CPU has no table entry: give MFU a peak to divide by
    "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
    "trainer.eval_every_steps=3", "trainer.eval_tokens=256",
]  # fmt: skip

WANDB_KEYS = {
    "train/loss", "train/lr", "train/grad_norm", "train/tokens", "train/skipped_steps",
    "perf/tokens_per_s", "perf/tokens_per_s_per_gpu", "perf/tflops_per_gpu", "perf/mfu",
    "perf/step_time_s", "perf/data_wait_s", "perf/compute_s",
}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    run_dir = tmp_path_factory.mktemp("obs") / "run"
    env = {"WANDB_MODE": "offline"}
    overrides = [*TINY, f"run_dir={run_dir}", *COMMON]
    first = launch([*overrides, "trainer.stop_at_step=3", "trainer.profile_steps=[2,3]"], env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    probe = f"trainer.callbacks=[{{_target_:tests.train.callback_probe.HookLog,out:{run_dir}}}]"
    second = launch([*overrides, probe], nproc=2, env=env)
    assert second.returncode == 0, second.stderr[-4000:]
    return {"dir": run_dir, "first": first.stderr, "second": second.stderr}


def offline_runs(run_dir: Path) -> list[tuple[str, dict, list[dict]]]:
    return [read_run(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]


def test_a_callback_from_the_config_alone_sees_every_hook(runs: dict) -> None:
    """trainer.callbacks adds a side effect without touching the loop or run.py: each rank's
    callback is told of the resumed start, each step's full record, the committed
    checkpoint, the end and the close, in that order."""
    for rank in (0, 1):
        calls = json.loads((runs["dir"] / f"hooks_rank{rank}.json").read_text())
        assert [c[:2] for c in calls] == [
            ["fit_start", 3], ["step_end", 4], ["step_end", 5], ["step_end", 6],
            ["checkpoint", 6], ["fit_end", 6], ["close"],
        ]  # fmt: skip
        assert calls[4][2] == "step_6"
        last = set(calls[3][2])  # after the run's own callbacks: their figures are in
        assert {"loss", "tokens_per_s", "mfu", "val_loss"} <= last


def test_wandb_history_config_and_resume(runs: dict) -> None:
    first, second = offline_runs(runs["dir"])  # rank 1 wrote none
    assert first[0] == second[0], "the resumed run must continue the same W&B run id"
    steps = [[row["_step"] for row in run[2]] for run in (first, second)]
    assert steps == [[2, 3], [4, 6]]  # one row per log interval, plus each job's last step
    for run in (first, second):
        for row in run[2]:
            assert set(row) >= WANDB_KEYS, WANDB_KEYS - set(row)
    # Evaluations at steps 3 and 6 (trainer.eval_every_steps=3), 256 tokens on 1 or 2 ranks.
    for row in (first[2][1], second[2][1]):
        assert row["val/ppl"] == pytest.approx(math.exp(row["val/loss"]))
        assert row["val/tokens"] == 256
    assert "val/loss" not in first[2][0] and "val/loss" not in second[2][0]
    assert second[2][0]["perf/tokens_per_s_per_gpu"] == pytest.approx(
        second[2][0]["perf/tokens_per_s"] / 2
    )
    resolved = yaml.safe_load((runs["dir"] / "config.yaml").read_text())
    assert second[1] == resolved  # the whole resolved config, as written to config.yaml
    assert first[1]["derived"]["world_size"] == 1 and resolved["derived"]["world_size"] == 2


def test_checkpoints_are_artifact_references(runs: dict) -> None:
    from wandb.proto import wandb_internal_pb2 as pb

    artifacts = {}  # alias step_N -> the files it references
    for d in sorted((runs["dir"] / "wandb").glob("offline-run-*")):
        (path,) = d.glob("run-*.wandb")
        for payload in payloads(path.read_bytes()):
            record = pb.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "artifact":
                (alias,) = [a for a in record.artifact.aliases if a.startswith("step_")]
                artifacts[alias] = {e.ref for e in record.artifact.manifest.contents}
    assert sorted(artifacts) == ["step_3", "step_6"]
    for alias, refs in artifacts.items():
        ckpt = (runs["dir"] / "checkpoints" / alias).resolve()
        assert f"file://{ckpt}/COMMITTED.json" in refs  # a reference to the complete one
        assert all(r.startswith(f"file://{ckpt}/") for r in refs)


def test_metrics_jsonl_mfu_by_hand(runs: dict) -> None:
    records = read_metrics(runs["dir"])
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    cfg = OmegaConf.to_object(compose(["model=tiny"]).model)
    flops = flops_per_token(cfg, 32)  # TINY's seq_len
    for r in records:
        world = 1 if r["step"] <= 3 else 2
        assert r["tokens_per_s"] == pytest.approx(8 * 32 / r["step_time_s"])
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / world)
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s_per_gpu"] / 1e9)
        assert r["compute_s"] + r["data_wait_s"] == pytest.approx(r["step_time_s"])
        assert 0 <= r["data_wait_s"] < r["step_time_s"]


def test_console_is_one_plain_line_per_interval(runs: dict) -> None:
    for out, steps in ((runs["first"], ["2/3", "3/3"]), (runs["second"], ["4/6", "6/6"])):
        lines = re.findall(r"INFO step (\S+) \| loss", out)
        assert lines == steps
        assert "\r" not in out and "\x1b[" not in out  # no progress bar in a log file
    summary = runs["second"]
    assert "world      2 rank(s) on cpu | ZeRO-0 | fp32" in summary
    assert "batch      256 tokens/step = 8 seqs x 32 (micro 2 x accum 2 x world 2)" in summary
    assert "schedule   steps 4-6 of 6" in summary
    assert "MFU basis  0.001 TFLOP/s per device (logger.peak_tflops)" in summary
    # The default warmup (10 steps) cannot happen in 6 steps: said before the first step.
    warning = "optim.warmup_steps=10 >= trainer.max_steps=6: the learning rate rises"
    assert 0 <= summary.find(warning) < summary.find("INFO step 4/6")
    assert "warmup 10 steps, cosine to 0.1x (warmup >= max_steps: the LR never" in summary
    ckpts = runs["dir"] / "checkpoints"
    saving = f"every 3 steps, on SIGTERM/SIGUSR1/SIGINT -> {ckpts}/step_N (keep last 3)"
    assert f"checkpoint {saving}\n" in summary  # TINY: save_final=false; 6 is a multiple of 3
    assert summary.count("optim.warmup_steps=10 >=") == 1  # rank 0 alone says it
    assert re.search(r"W&B        offline: \S+/wandb/offline-run-\S+ \(`wandb sync`", summary)
    last_line = r"INFO step 6/6 \|.* \| val_loss \d\.\d{4} \| val_ppl \d+\.\d\d$"
    assert re.search(last_line, summary, re.M)


def test_profile_trace_covers_the_requested_steps(runs: dict) -> None:
    (trace,) = (runs["dir"] / "profile").glob("*.json.gz")
    assert trace.name == "rank0_steps2-3.json.gz"
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    spans = sorted({e["name"] for e in events if e.get("name", "").startswith("step ")})
    assert spans == ["step 2", "step 3"]
    assert len(events) > 100  # the steps' operators, not just the two markers


def test_online_without_a_key_trains_with_one_warning_and_logs_offline(tmp_path: Path) -> None:
    # A HOME without ~/.netrc; DeepSpeed's compiled ops stay where they were built.
    built = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/torch_extensions"))
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(tmp_path / "home"),
           "TORCH_EXTENSIONS_DIR": built}  # fmt: skip
    proc = launch([*TINY, f"run_dir={tmp_path / 'run'}", "trainer.max_steps=2",
                   "optim.warmup_steps=1", "logger.wandb.mode=online"], env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("WARNING") == 1 and "no W&B API key" in proc.stderr
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert [row["_step"] for row in read_run(run)[2]] == [1, 2]


def test_a_terminal_gets_a_live_bar_with_the_lines_above_it(tmp_path: Path) -> None:
    """stderr on a pseudo-terminal: logger.progress=auto draws tqdm's bar (redrawn with \\r)
    and still prints each interval's line."""
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 columns
    args = [*TINY, f"run_dir={tmp_path}", "trainer.max_steps=4", "trainer.log_every=2"]
    proc = subprocess.Popen(command(args), cwd=REPO, env=subprocess_env(), stdin=subprocess.DEVNULL,
                            stdout=child, stderr=child)  # fmt: skip
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(parent, 65536)
        except OSError:  # EIO: the child side closed
            break
        if not chunk:
            break
        out += chunk
    os.close(parent)
    assert proc.wait(timeout=120) == 0, out[-3000:]
    text = out.decode(errors="replace")
    assert "\r" in text and "train:" in text and "4/4" in text and "loss=" in text
    assert re.findall(r"INFO step (\d/4) \| loss", text) == ["2/4", "4/4"]
