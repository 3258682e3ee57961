"""Runs that are interrupted: stop signals, a second signal, and `kill -9` at random moments.

Each interrupted run is restarted with the same command and must end exactly where an
uninterrupted run ends: the same losses at every step, bit for bit (fp32, CPU).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.checkpoint import export, manager
from pretrain.data.synthetic import SyntheticStream
from pretrain.train.signals import EXIT_PREEMPTED
from tests.conftest import (
    EXACT,
    REPO,
    TINY,
    curve,
    export_and_compare,
    newest_checkpoint,
    read_metrics,
    start,
    subprocess_env,
    teardown_probe,
    tore_down,
    train,
    wait_for_step,
)

pytestmark = pytest.mark.multiprocess

RUN = [*EXACT, "trainer.max_steps=30", "checkpoint.save_final=true"]


@pytest.fixture(scope="module")
def straight_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    run_dir = tmp_path_factory.mktemp("straight")
    train(run_dir, RUN)
    return run_dir


@pytest.fixture(scope="module")
def straight(straight_dir: Path) -> list[tuple[int, float, float]]:
    return curve(read_metrics(straight_dir))


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return export.consolidated_state_dict(run_dir / "checkpoints" / "step_30")


def test_sigterm_saves_that_step_exits_75_and_resume_continues(
    tmp_path: Path, straight: list, straight_dir: Path
) -> None:
    """SIGTERM here; SIGUSR1 (Slurm's --signal) in the two-rank test below. Timed
    checkpoints too: every 6 ms is every step."""
    timed = [*RUN, "checkpoint.every_minutes=0.0001", "checkpoint.keep_last=2"]
    proc = start([*TINY, f"run_dir={tmp_path}", *timed], tmp_path / "out.log")
    wait_for_step(tmp_path, proc, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, (tmp_path / "out.log").read_text()[-3000:]
    stopped_at = read_metrics(tmp_path)[-1]["step"]
    assert 3 <= stopped_at < 30
    assert newest_checkpoint(tmp_path) == stopped_at  # saved at the step it stopped after
    kept = [p.name for p in manager.complete_checkpoints(tmp_path / "checkpoints")]
    assert kept == [f"step_{stopped_at - 1}", f"step_{stopped_at}"]  # the clock saved too
    assert "checkpoint saved; run the same command to resume" in (tmp_path / "out.log").read_text()
    assert curve(train(tmp_path, RUN)) == straight
    final, reference = _final_weights(tmp_path), _final_weights(straight_dir)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in final)  # the weights, bit for bit

    # The final checkpoint (ZeRO-0) exports to transformers with our logits, and a new run
    # with model.init_from (ZeRO-3: sharded at birth) starts from those weights.
    hf = export_and_compare(straight_dir, reference, tmp_path / "hf")
    started = train(tmp_path / "init", [*RUN, "trainer.max_steps=1",
                                        f"model.init_from={tmp_path / 'hf'}",
                                        "deepspeed.zero_stage=3"])  # fmt: skip
    with torch.no_grad():  # its first loss is the exported weights' loss on batch 1
        batch = next(SyntheticStream(512, 32, 8, 1, seed=1234))
        logits = hf(batch[:, :-1]).logits
        expected = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    assert started[0]["loss"] == pytest.approx(expected, rel=1e-4)
    assert started[0]["loss"] < straight[0][1] - 0.1  # far from a fresh model's


def test_a_stop_signal_to_every_process_spares_the_data_workers(tmp_path: Path) -> None:
    """SIGTERM to the whole process group, as Slurm signals a whole job step and a terminal's
    Ctrl-C its foreground group: the DataLoader workers get it too and ignore it, and the
    run saves and exits 75 (a worker killed by it crashed the run, unsaved)."""
    from pretrain.data import shards

    (tmp_path / "corpus").mkdir()
    for i in range(20):
        (tmp_path / "corpus" / f"{i}.txt").write_text(f"text number {i}. " * 200)
    shards.prepare([tmp_path / "corpus"], "bytes", tmp_path / "shards", shard_tokens=20_000,
                   progress=False)  # fmt: skip
    args = [*[a for a in TINY if a != "data=synthetic"], "data=shards",
            f"data.path={tmp_path / 'shards'}", "data.num_workers=2",
            f"run_dir={tmp_path / 'run'}", "trainer.max_steps=100000"]  # fmt: skip
    with (tmp_path / "out.log").open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pretrain", *args], cwd=REPO,
                                env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        wait_for_step(tmp_path / "run", proc, 3)
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    log = (tmp_path / "out.log").read_text()
    assert code == EXIT_PREEMPTED, log[-3000:]
    assert newest_checkpoint(tmp_path / "run") == read_metrics(tmp_path / "run")[-1]["step"]
    assert log.count("SIGTERM received") == 1, log[-3000:]  # the training process's alone


def test_stop_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """SIGUSR1 to rank 1 of 2 (ZeRO-2); then the resumed run is bit-exact. The stopped ranks
    leave through dist.finish, without the interpreter's teardown."""
    probe = tmp_path / "probe"
    proc = start([*TINY, f"run_dir={tmp_path}", *RUN, "deepspeed.zero_stage=2"],
                 tmp_path / "out.log", nproc=2, env=teardown_probe(probe))  # fmt: skip
    wait_for_step(tmp_path, proc, 3)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(workers) == 2
    subprocess.run(["kill", "-USR1", workers[-1]], check=True)  # one rank only
    proc.wait(timeout=120)
    out = (tmp_path / "out.log").read_text()
    # torchrun reports each worker's exit code (75) and itself exits 1, as for any failure.
    assert len(re.findall(rf"exitcode\s*: {EXIT_PREEMPTED}\b", out)) >= 1, out[-3000:]
    assert tore_down(probe, ranks=2) == [], out[-3000:]
    stopped_at = read_metrics(tmp_path)[-1]["step"]
    ckpt = manager.complete_checkpoints(tmp_path / "checkpoints")[-1]
    assert ckpt.name == f"step_{stopped_at}"
    files = {p.name for p in ckpt.iterdir()}
    assert {"rank_0.pt", "rank_1.pt", "COMMITTED.json", "client_state.json"} <= files
    assert sum("optim_states" in f for f in files) == 2  # one optimizer shard per rank
    # Resumed on 2 ranks with ZeRO-2, the run ends exactly as an uninterrupted one.
    straight = curve(train(tmp_path / "straight", [*RUN, "deepspeed.zero_stage=2"], nproc=2))
    assert curve(train(tmp_path, [*RUN, "deepspeed.zero_stage=2"], nproc=2)) == straight


def test_second_signal_aborts_without_saving(tmp_path: Path) -> None:
    """The handler on its own, in a child process: copies of the first signal, as launchers
    deliver them, are one request; a signal after the repeat window ends the process at once."""
    script = (
        "import os, signal, time\n"
        "from pretrain.train.signals import REPEAT_WINDOW_S, StopSignals\n"
        "with StopSignals() as s:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # Slurm's copy and torchrun's\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)\n"
        "    assert s.received == signal.SIGTERM\n"
        "    time.sleep(REPEAT_WINDOW_S + 0.1)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(10)\n"
        "raise SystemExit(0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 128 + signal.SIGINT  # not SIGTERM's: its copies did not abort
    assert "second stop signal (SIGINT): aborting now" in proc.stderr


def test_kill_9_at_random_moments_then_the_run_finishes_as_if_never_killed(
    tmp_path: Path, straight: list
) -> None:
    """Saves every step, so kills land in steps and in saves alike; three trials."""
    args = [*TINY, f"run_dir={tmp_path}", *RUN, "checkpoint.every_steps=1"]
    rng = random.Random(4)
    for trial in range(3):
        before = newest_checkpoint(tmp_path)
        proc = start(args, tmp_path / f"kill{trial}.log")
        wait_for_step(tmp_path, proc, (before or 0) + 1)
        time.sleep(rng.uniform(0.0, 0.6))
        proc.kill()
        proc.wait(timeout=60)
        out = (tmp_path / f"kill{trial}.log").read_text()
        if before is not None:  # the restart resumed from the newest complete checkpoint
            assert f"resumed from {tmp_path / 'checkpoints' / f'step_{before}'} " in out
        assert newest_checkpoint(tmp_path) is not None
        for ckpt in manager.complete_checkpoints(tmp_path / "checkpoints"):
            assert manager.read_client_state(ckpt)["trainer"]["step"] == int(ckpt.name[5:])
    assert curve(train(tmp_path, [*RUN, "checkpoint.every_steps=1"])) == straight
