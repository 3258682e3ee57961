"""A real Slurm cluster on this machine: slurmctld and two slurmd emulating nodes n1, n2.

Debian's Slurm (22.05) runs with `auth/none`, so no munge; both nodes are 127.0.0.1 with
their own ports. The packages are installed when missing and we are root with apt-get;
otherwise the tests that need the cluster skip and say why (the `slurm` fixture, in
conftest.py beside this file).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

from tests.conftest import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client"]
PROGRAMS = ["slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue"]


def ensure_slurm() -> str | None:
    """None when Slurm's programs are here (installing them if we can), else why not."""
    if all(shutil.which(p) for p in PROGRAMS):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and cannot be (needs root and apt-get): " + " ".join(
            PACKAGES
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    for attempt in (install, ["apt-get", "update", "-q"], install):
        proc = subprocess.run(attempt, env=env, capture_output=True, text=True, timeout=600)
        if attempt is install and proc.returncode == 0:
            break
    if all(shutil.which(p) for p in PROGRAMS):
        return None
    return f"installing Slurm failed: {proc.stderr.strip()[-500:]}"


CONF = """\
ClusterName=ci
SlurmctldHost=localhost
# Job ids (and so slurm/pretrain.sh's rendezvous ports) apart from another cluster's here.
FirstJobId={first_job_id}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job may start again cred_expire + 1 s later (default 121 s).
AuthInfo=cred_expire=5
SlurmctldPort={ctld_port}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/slurmd-%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
# Seconds between SIGTERM and SIGKILL when a job is cancelled or requeued: the save's time.
KillWait=30
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1_port} CPUs=1 RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2_port} CPUs=1 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""  # noqa: E501


class SlurmCluster:
    """Start with `start()`, stop with `stop()`; `env` is what every client command needs."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.conf = directory / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[subprocess.Popen] = []

    def start(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            CONF.format(d=self.dir, ctld_port=free_port(), n1_port=free_port(),
                        n2_port=free_port(), first_job_id=random.randrange(1000, 19000, 100))
        )  # fmt: skip
        daemons = {"slurmctld": ["slurmctld", "-D"], "n1": ["slurmd", "-D", "-N", "n1"],
                   "n2": ["slurmd", "-D", "-N", "n2"]}  # fmt: skip
        for name, argv in daemons.items():
            log = (self.dir / "log" / f"{name}.out").open("w")
            self._daemons.append(
                subprocess.Popen(
                    [*argv, "-f", str(self.conf)],
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + 60
        while self.run("sinfo", "-h", "-t", "idle", "-o", "%D", check=False).stdout.strip() != "2":
            if time.monotonic() > deadline:
                raise RuntimeError(f"Slurm nodes not idle after 60 s; see {self.dir}/log")
            time.sleep(0.5)

    def stop(self) -> None:
        self.run("scontrol", "shutdown", check=False)
        for proc in self._daemons:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run(self, *argv: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True,
                              timeout=120, **kw)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed: {proc.stderr}")
        return proc

    def sbatch(self, *argv: str, env: dict[str, str], cwd: Path) -> int:
        """Submit; return the job id."""
        proc = self.run("sbatch", "--parsable", *argv, env={**env, "SLURM_CONF": str(self.conf)},
                        cwd=cwd)  # fmt: skip
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as key=value pairs ({} once Slurm has forgotten the job)."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        fields = (item.partition("=") for item in proc.stdout.split())
        return {k: v for k, _, v in fields if k}

    def wait(self, job_id: int | str, timeout: float = 300, until: tuple[str, ...] = ()) -> str:
        """Wait until the job's state is in `until` (default: any finished state)."""
        done = until or ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")  # fmt: skip
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.job(job_id).get("JobState", "")
            if state in done:
                return state
            time.sleep(0.5)
        self.run("scancel", str(job_id), check=False)
        raise AssertionError(f"job {job_id} still {state or 'unknown'} after {timeout} s")
