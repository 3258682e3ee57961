"""Process group from the launcher's environment, rank helpers, seeding and a rank-0 logger.

The package never spawns processes: torchrun (or Slurm via torchrun) sets RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Run without a launcher, `init()` fills in a
single-process group on a free local port, so `python -m pretrain` just works.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import random
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as tdist

from pretrain.config.parallel import ParallelDims

log = logging.getLogger("pretrain")


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return (
        tdist.get_world_size() if tdist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    )


_PARALLEL: ParallelDims | None = None
_GROUPS: dict[str, tdist.ProcessGroup] = {}


def init_parallel(dims: ParallelDims) -> None:
    """Arrange the ranks in `dims` (after `init`); called once, by every rank. With data
    parallelism alone the data dimension's group is the default group, so no group is
    built. With sequence parallelism, consecutive ranks form a sequence group (rank //
    sequence is the data rank), and the ranks at the same place of every sequence group
    form a data group."""
    global _PARALLEL
    if dims.world_size != world_size():
        raise ValueError(f"{dims} does not cover the {world_size()} ranks")
    _PARALLEL = dims
    _GROUPS.clear()
    n = dims.sequence
    if n > 1:  # every rank creates every group, in the same order
        for first in range(0, world_size(), n):
            group = tdist.new_group(list(range(first, first + n)))
            if first <= rank() < first + n:
                _GROUPS["sequence"] = group
        for place in range(n):
            group = tdist.new_group(list(range(place, world_size(), n)))
            if rank() % n == place:
                _GROUPS["data"] = group


def parallel() -> ParallelDims:
    """The ranks' arrangement: `init_parallel`'s, else every rank on the data dimension."""
    return _PARALLEL or ParallelDims.for_world(world_size())


def data_rank() -> int:
    """This rank's index on the data dimension: which share of each batch it takes (the
    ranks of a sequence group take the same)."""
    return rank() // parallel().sequence


def data_size() -> int:
    """Ranks on the data dimension: how many shares each batch is split into."""
    return parallel().data


def data_group() -> tdist.ProcessGroup | None:
    """The data dimension's process group (None: the default group, all ranks)."""
    return _GROUPS.get("data")


def sequence_size() -> int:
    """Ranks that split each sequence (parallel.sequence)."""
    return parallel().sequence


def sequence_rank() -> int:
    """This rank's index in its sequence group: which slice of each sequence it holds."""
    return rank() % parallel().sequence


def sequence_group() -> tdist.ProcessGroup | None:
    """This rank's sequence group (None without sequence parallelism)."""
    return _GROUPS.get("sequence")


def is_main() -> bool:
    return rank() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROCESS_GROUP_SLACK_S = 120.0
"""The process group's timeout is trainer.hang_timeout_s plus this: the watchdog, which names
the stuck rank, speaks first; the timeout bounds the collectives it does not watch (set-up)."""


def process_group_timeout(hang_timeout_s: float) -> float:
    """Seconds any collective may wait: hang_timeout_s + slack, or torch's 30 min when off."""
    return hang_timeout_s + PROCESS_GROUP_SLACK_S if hang_timeout_s else 1800.0


def init(device_type: str, timeout_s: float = 600.0) -> torch.device:
    """Join (or, without a launcher, create) the default process group; return this rank's device.

    gloo on CPU, nccl on CUDA; a collective that waits `timeout_s` raises. Safe to call twice.
    """
    if "RANK" not in os.environ:  # plain `python -m pretrain`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not tdist.is_initialized():
        tdist.init_process_group(
            backend="nccl" if device_type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
        )
    return device


def write_exit_code(code: int) -> None:
    """Write `code` to $PRETRAIN_EXIT_DIR/rank<RANK> when that is set. slurm/launch_node.sh
    reads it there: torchrun's own report of its processes' codes is lost when it loses the
    rendezvous store first (the first node's torchrun exits as soon as its processes do,
    while another node's are still exiting)."""
    directory = os.environ.get("PRETRAIN_EXIT_DIR")
    if directory:
        Path(directory, f"rank{os.environ.get('RANK', '0')}").write_text(f"{code}\n")


def destroy(finished: bool = False) -> None:
    """Tear the process group down. `finished`: every rank got here normally, so first wait
    for all of them (`_all_left_the_barrier`). Not on an error path, where a rank that died
    would leave the others waiting."""
    if not tdist.is_initialized():
        return
    if finished:
        barrier()
        _all_left_the_barrier()
    tdist.destroy_process_group()


def finish(code: int = 0) -> NoReturn:
    """End a rank whose work is all done and whose files are closed: wait for every rank and
    tear the process group down (`destroy(finished=True)`), flush the logs and standard
    streams, then leave with `code` through os._exit, skipping the interpreter's teardown.
    Call it once the data loader is gone (its workers shut down with it; a worker left
    behind dies with its parent, data/stream.py's PR_SET_PDEATHSIG) and every callback
    closed: threads, atexit handlers and finalizers do not run after it. If the barrier
    fails (a peer or the store gone), it still leaves with `code`.

    Why: in CI, finished 2-rank runs sometimes aborted after their last line ("terminate
    called without an active exception", SIGABRT), failing the launcher and, under Slurm,
    marking a finished run failed. destroy_process_group does not free the groups while
    DeepSpeed holds them, so gloo's threads live on into interpreter finalization; which
    teardown step aborted is unknown (it never reproduced here), and a process that never
    finalizes runs none of them. What is left (sockets, memory, threads) the kernel frees."""
    try:
        destroy(finished=True)
    except Exception as e:  # a peer or the store gone: the work is done, leave all the same
        log.warning("leaving without the final barrier (%s: %s)", type(e).__name__, e)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a broken pipe
            stream.flush()
    with contextlib.suppress(OSError, AttributeError):  # C stdio (NCCL's, C++ logging)
        ctypes.CDLL(None).fflush(None)
    os._exit(code)


def _all_left_the_barrier(timeout_s: float = 60.0) -> None:
    """Wait, through the launcher's key-value store rather than gloo, until every rank has
    returned from the last barrier: a rank leaves a gloo barrier once it has heard from the
    others, possibly before its own last message reached them, and shutting down then could
    cut that message off. Gives up after `timeout_s`: the run's work is done by then."""
    if tdist.get_world_size() == 1:
        return
    store = tdist.distributed_c10d._get_default_store()
    # Per restart of torchrun's (--max-restarts), whose store outlives the attempt.
    key = f"pretrain/left_final_barrier/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    left = store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while left < tdist.get_world_size():
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
        left = store.add(key, 0)


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over ranks (gloo has no AVG op, so sum and divide)."""
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        x = x.clone()
        tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
        x /= tdist.get_world_size()
    return x


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) identically on all ranks."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA


def setup_logging(level: int = logging.INFO) -> None:
    """Rank 0 logs at `level`; other ranks only warnings and errors, tagged with their rank."""
    handler = logging.StreamHandler()
    prefix = "" if is_main() else f"[rank {rank()}] "
    handler.setFormatter(
        logging.Formatter(f"{prefix}%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    )
    log.handlers[:] = [handler]
    log.setLevel(level if is_main() else logging.WARNING)
    log.propagate = False
