"""No hang: a rank that stops making progress ends the job within trainer.hang_timeout_s,
naming the rank that stopped reporting; a stop signal during a wait that may never end is
acted on within seconds. The watchdog's rules in-process, then real runs: a SIGSTOPped rank
of two (through slurm/launch_node.sh, which passes the hang's exit code on) and a SIGTERM
while the data source never delivers."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.train import watchdog as wd
from pretrain.train.signals import StopSignals
from tests.conftest import REPO, TINY, free_port, subprocess_env

pytestmark = pytest.mark.multiprocess


def _wait_for(codes: list[int], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not codes and time.monotonic() < deadline:
        time.sleep(0.05)


def test_no_progress_in_a_watched_phase_ends_the_rank(caplog: pytest.LogCaptureFixture) -> None:
    codes: list[int] = []
    with caplog.at_level(logging.ERROR, "pretrain"), wd.Watchdog(1.0, codes.append) as dog:
        dog.at(11, "compute")  # the process's first step is not watched (compilation)
        dog.at(11, "sync")
        time.sleep(2.5)
        assert codes == []
        dog.at(12, "save")  # nor are saves
        time.sleep(2.5)
        assert codes == []
        dog.at(13, "sync")
        _wait_for(codes, 5)
    assert codes[0] == wd.EXIT_HUNG
    assert "rank 0 made no progress for 1 s (trainer.hang_timeout_s=1) in step 13, waiting for " \
           "the step's collective" in caplog.text  # fmt: skip


@pytest.mark.parametrize(
    ("phase", "said"), [("data", "waiting for data"), ("sync", "waiting for the step's collective")]
)
def test_a_stop_signal_during_a_wait_exits_without_saving(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, phase: str, said: str
) -> None:
    monkeypatch.setattr(wd, "STOP_WAIT_S", 1.0)
    codes: list[int] = []
    with StopSignals(), wd.Watchdog(0, codes.append) as dog:
        dog.at(4, "compute")  # a step being computed ends by itself: the stop waits for it
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2.5)
        assert codes == []
        dog.at(4, phase)
        started = time.monotonic()
        _wait_for(codes, 5)
        assert 0.9 < time.monotonic() - started < 3
    assert codes[0] == 128 + signal.SIGTERM
    assert f"SIGTERM received while {said} in step 4" in caplog.text


def _workers(parent: int) -> dict[int, int]:
    """{RANK: pid} of the training processes under `parent` (not their data workers)."""
    found, todo = {}, [parent]
    while todo:
        pid = todo.pop()
        try:
            env = dict(
                e.split(b"=", 1)
                for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if b"=" in e
            )
            if b"LOCAL_RANK" in env:
                found[int(env[b"RANK"])] = pid
                continue
            todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while text not in path.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, path.read_text()[-4000:]
        time.sleep(0.2)


def test_a_stopped_rank_ends_the_job_within_the_timeout(tmp_path: Path) -> None:
    """SIGSTOP freezes rank 1 (its watchdog thread too) mid-run; rank 0's watchdog ends the
    job after hang_timeout_s naming rank 1, and launch_node.sh exits with the hang's code.
    (torchrun SIGKILLs the frozen rank after a 30 s grace; the test does it at once.)"""
    run_dir, timeout = tmp_path / "run", 6
    env = {**subprocess_env(), "NPROC_PER_NODE": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}"}
    args = [*TINY, f"run_dir={run_dir}", "trainer.max_steps=100000",
            f"trainer.hang_timeout_s={timeout}"]  # fmt: skip
    output = tmp_path / "out.txt"
    with output.open("w") as out:
        node = subprocess.Popen(["bash", "slurm/launch_node.sh", *args], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_for_text(output, "step 5/", node)
        frozen = _workers(node.pid)[1]
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.time()
        _wait_for_text(output, "made no progress", node, timeout + 30)
        time.sleep(1)
        os.kill(frozen, signal.SIGKILL)  # what torchrun does after its 30 s grace: save them
        rc = node.wait(timeout=60)
    finally:
        node.kill()
    text = output.read_text()
    assert rc == wd.EXIT_HUNG, text[-4000:]
    found = re.search(r"(\d\d):(\d\d):(\d\d) ERROR rank 0 made no progress for (\d+) s", text)
    assert found, text[-4000:]
    assert re.search(r"rank 1: step \d+, .*stopped reporting", text), text[-4000:]
    h, m, s, _ = map(int, found.groups())
    said = time.localtime(stopped)
    delay = (h * 3600 + m * 60 + s) - (said.tm_hour * 3600 + said.tm_min * 60 + said.tm_sec)
    assert timeout - 1 <= delay <= timeout + 4, text[-4000:]


def test_sigterm_while_the_data_never_arrives_exits_within_seconds(tmp_path: Path) -> None:
    """A pipe: shard whose command never writes: step 1 waits for data forever. SIGTERM
    cannot finish the step, so the run exits 143 a few seconds later, saving nothing."""
    args = [*[a for a in TINY if not a.startswith("data=")], "data=shards",
            "data.path=pipe:sleep 600", "data.num_workers=1",
            f"run_dir={tmp_path / 'run'}"]  # fmt: skip
    output = tmp_path / "out.txt"
    with output.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pretrain", *args], cwd=REPO,
                                env=subprocess_env(), stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait_for_text(output, "W&B ", proc)  # the summary: set-up done, step 1 begins
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        proc.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    time.sleep(1)  # its data worker died with it (PR_SET_PDEATHSIG), not blocked in the read
    workers = subprocess.run(["pgrep", "-f", f"run_dir={tmp_path / 'run'}"], capture_output=True,
                             text=True).stdout.split()  # fmt: skip
    subprocess.run(["pkill", "-f", "^sleep 600$"], check=False)  # the orphaned pipe command
    assert workers == [], "a data worker outlived its training process"
    text = output.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "SIGTERM received while waiting for data in step 1" in text, text[-3000:]
    assert took < wd.STOP_WAIT_S + 4, took
    assert not (tmp_path / "run" / "checkpoints").exists()
