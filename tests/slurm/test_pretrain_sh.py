"""`sbatch slurm/pretrain.sh` on a real two-node Slurm cluster: rendezvous, training,
preemption and requeue, a node that never joins, a sweep; and slurm/launch_node.sh on two
"nodes" without Slurm. Every run is checked against `torchrun --nproc_per_node=2`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pretrain.data import shards
from tests.conftest import (
    EXACT,
    REPO,
    TINY,
    curve,
    free_port,
    read_metrics,
    subprocess_env,
    train,
)
from tests.slurm.cluster import SlurmCluster

pytestmark = pytest.mark.multiprocess

# Long enough (about 7 s on 2 CPU ranks) for a signal to land mid-run.
STEPS = 200
RUN = [*TINY, *EXACT, f"trainer.max_steps={STEPS}", "trainer.log_every=1"]
# The test nodes have one CPU and no GPU: override the script's GPU-cluster defaults.
SBATCH = ["--cpus-per-task=1", "--gpus-per-node=0", "--job-name=t"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, float, float]]:
    """The same run under plain torchrun, one node with two processes."""
    return curve(train(tmp_path_factory.mktemp("torchrun"), RUN, nproc=2))


def submit(
    slurm: SlurmCluster,
    cwd: Path,
    options: list[str],
    args: list[str],
    script: str = "pretrain.sh",
    env: dict[str, str] | None = None,
) -> int:
    """`sbatch OPTIONS slurm/SCRIPT ARGS` from `cwd`, where the job also runs."""
    (cwd / "logs").mkdir(exist_ok=True)
    return slurm.sbatch(f"--chdir={cwd}", *SBATCH, *options, str(REPO / "slurm" / script),
                        *args, env={**subprocess_env(), **(env or {})}, cwd=cwd)  # fmt: skip


def job_log(cwd: Path, job_id: int | str, name: str = "t") -> str:
    return (cwd / "logs" / f"{name}-{job_id}.out").read_text()


def wait_for_step(run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= step):
        assert time.monotonic() < deadline, f"{run_dir} did not reach step {step}"
        time.sleep(0.2)


def test_two_nodes_train_like_torchrun_on_one(
    slurm: SlurmCluster,
    tmp_path: Path,
    reference: list,
) -> None:
    job = submit(slurm, tmp_path, ["-N2"], RUN)
    state = slurm.wait(job)
    log = job_log(tmp_path, job)
    assert state == "COMPLETED", log[-4000:]
    assert "2 node(s)" in log and "world 2" in log
    # Run dir and W&B id derive from the job name and id.
    run_dir = tmp_path / "runs" / f"t-{job}"
    assert curve(read_metrics(run_dir)) == reference
    config = (run_dir / "config.yaml").read_text()
    assert f"id: t-{job}" in config


@pytest.mark.parametrize(
    ("how", "said"),
    [
        (["scancel", "-s", "USR1", "--full"], "stopped by a signal, checkpoint saved; requeueing"),
        (["scontrol", "requeue"], "SIGTERM (requeue, preemption or cancel)"),
    ],
    ids=["usr1", "scontrol-requeue"],
)
def test_preempted_job_saves_requeues_and_resumes(
    slurm: SlurmCluster,
    tmp_path: Path,
    reference: list,
    how: list[str],
    said: str,
) -> None:
    """USR1 (what --signal sends before the time limit): the script requeues the job.
    `scontrol requeue` (SIGTERM, as preemption sends): Slurm does. Both save first, and
    both starts log to one W&B run (offline here), named after the job."""
    wandb = {"WANDB_MODE": "offline"}
    job = submit(slurm, tmp_path, ["-N2"], [*RUN, "logger.wandb.mode=offline"], env=wandb)
    run_dir = tmp_path / "runs" / f"t-{job}"
    slurm.wait(job, until=("RUNNING",))
    wait_for_step(run_dir, 20)
    slurm.run(*how, str(job))
    state = slurm.wait(job, timeout=300)
    log = job_log(tmp_path, job)
    assert state == "COMPLETED", log[-4000:]
    assert slurm.job(job).get("Restarts") == "1", log[-4000:]
    assert said in log
    assert "(start 2)" in log and f"resumed from runs/t-{job}/checkpoints/step_" in log
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert saved and saved[0] != f"step_{STEPS}", saved
    assert curve(read_metrics(run_dir)) == reference  # as if never stopped


def test_node_that_never_joins_times_out_with_a_message(
    slurm: SlurmCluster,
    tmp_path: Path,
) -> None:
    """One node allocated, two expected: the rendezvous gives up and says where and why."""
    job = submit(slurm, tmp_path, ["-N1", "--export=ALL,NNODES=2,RDZV_TIMEOUT=5"], RUN)
    state = slurm.wait(job, timeout=180)
    log = job_log(tmp_path, job)
    assert state == "FAILED" and slurm.job(job).get("ExitCode") == "124:0", log[-3000:]
    port = 20000 + job % 12000
    assert f"rendezvous at 127.0.0.1:{port} failed: not all 2 nodes joined within 5s" in log
    assert "RDZV_TIMEOUT" in log


def test_sweep_runs_one_job_per_line(slurm: SlurmCluster, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# lr sweep\noptim.lr=1e-3\n\noptim.lr=3e-3\n")
    job = submit(slurm, tmp_path, ["--array=0-1"], [str(sweep), *TINY, "trainer.max_steps=5"],
                 script="sweep.sh")  # fmt: skip
    for task in (0, 1):
        assert slurm.wait(f"{job}_{task}") == "COMPLETED"  # type: ignore[arg-type]
    lrs = {}
    for task in (0, 1):
        config = (tmp_path / "runs" / f"t-{job}_{task}" / "config.yaml").read_text()
        lrs[task] = next(line.split()[-1] for line in config.splitlines() if "  lr:" in line)
    assert lrs == {0: "0.001", 1: "0.003"}


def training_processes(nodes: list[subprocess.Popen]) -> list[int]:
    """The pids under `nodes` that torchrun started (they have LOCAL_RANK set)."""
    found, todo = [], [node.pid for node in nodes]
    while todo:
        pid = todo.pop()
        try:
            if b"\0LOCAL_RANK=" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
                found.append(pid)  # not its own children (data workers inherit LOCAL_RANK)
                continue
            todo += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except FileNotFoundError:  # exited meanwhile
            continue
    assert len(found) == len(nodes), found
    return found


def test_launch_node_on_two_nodes_without_slurm(tmp_path: Path, reference: list) -> None:
    """The documented multi-node command without Slurm: the same script on each "node".
    Stopped by SIGUSR1, each node exits 75 (saved; run again), even the node whose training
    process outlives the first node's torchrun and with it the rendezvous store (made
    certain here by a 3 s sleep at its exit), then the same command resumes the run."""
    slow_exit = tmp_path / "slow_exit"
    slow_exit.mkdir()
    (slow_exit / "sitecustomize.py").write_text(
        "import atexit, os, time\n"
        "if os.environ.get('LOCAL_RANK') is not None:\n"
        "    atexit.register(time.sleep, 3)\n"
    )
    run_dir = tmp_path / "run"
    command = ["bash", str(REPO / "slurm" / "launch_node.sh"), *RUN, f"run_dir={run_dir}"]

    def start_nodes() -> list[subprocess.Popen]:
        env = {**subprocess_env(), "NNODES": "2", "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
               "RDZV_ID": "two", "NPROC_PER_NODE": "1"}  # fmt: skip
        slow = {**env, "PYTHONPATH": os.pathsep.join([str(slow_exit), env.get("PYTHONPATH", "")])}
        return [subprocess.Popen(command, cwd=REPO, env=node_env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
                for node_env in (env, slow)]  # fmt: skip

    def finish(nodes: list[subprocess.Popen]) -> tuple[list[int | None], str]:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
        return [n.returncode for n in nodes], "\n".join(outputs)

    nodes = start_nodes()
    wait_for_step(run_dir, 20)
    for worker in training_processes(nodes):  # as Slurm's --signal does
        os.kill(worker, signal.SIGUSR1)
    codes, output = finish(nodes)
    assert codes == [75, 75], output[-6000:]
    assert output.count("stopped on a signal after saving a checkpoint") == 2, output[-6000:]
    assert "rendezvous at" not in output, output[-6000:]

    codes, output = finish(start_nodes())
    assert codes == [0, 0], output[-6000:]
    assert f"resumed from {run_dir}/checkpoints/step_" in output, output[:6000]
    assert curve(read_metrics(run_dir)) == reference


def test_scripts_refuse_a_launch_that_cannot_work() -> None:
    """Outside a job, and several nodes with no rendezvous endpoint: an error, not a hang."""
    env = {k: v for k, v in subprocess_env().items() if not k.startswith(("SLURM_", "RDZV_"))}
    run = dict(cwd=REPO, capture_output=True, text=True, timeout=60)
    proc = subprocess.run(["bash", "slurm/pretrain.sh"], env=env, **run)
    assert proc.returncode == 2 and "sbatch [options] slurm/pretrain.sh" in proc.stderr
    proc = subprocess.run(["bash", "slurm/launch_node.sh"], env={**env, "NNODES": "2"}, **run)
    assert proc.returncode == 2 and "NNODES=2 needs RDZV_ENDPOINT=" in proc.stderr


def test_prepare_data_array_then_merge(slurm: SlurmCluster, tmp_path: Path) -> None:
    """sbatch --array=0-1 slurm/prepare_data.sh: each task tokenizes its share, the first
    submits the merge, which runs once both ended and writes the one manifest: the same
    documents and tokens as one tools/prepare_data.py run."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(f"document {i} " * (40 + 10 * i))
    out = tmp_path / "shards"
    job = submit(slurm, tmp_path, ["--array=0-1"],
                 ["--input", str(corpus), "--tokenizer", "bytes", "--output", str(out)],
                 script="prepare_data.sh")  # fmt: skip
    for task in (0, 1):
        assert slurm.wait(f"{job}_{task}") == "COMPLETED", job_log(tmp_path, f"{job}_{task}")
    found = re.search(r"merge: job (\d+)", job_log(tmp_path, f"{job}_0"))
    assert found, job_log(tmp_path, f"{job}_0")
    merge = int(found.group(1))
    assert slurm.wait(merge) == "COMPLETED", job_log(tmp_path, merge, "t-merge")
    merged = json.loads((out / "manifest.json").read_text())
    single = shards.prepare([corpus], "bytes", tmp_path / "one", progress=False)
    assert merged["tasks"] == 2 and [len(list(out.glob("task-*")))] == [2]
    assert (merged["documents"], merged["tokens"]) == (single["documents"], single["tokens"])
