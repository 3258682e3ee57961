"""Prepare a parquet corpus of MB megabytes with 2 workers; print the peak resident memory
(VmHWM) of this process and of its largest worker as JSON (tests/data/test_prepare_memory.py).

    python tests/data/prepare_peak.py MB DIR

VmHWM, not getrusage: a process's ru_maxrss starts from its parent's resident size at exec
(pytest's, or this process's for a spawned worker), which would hide a growth under it.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
from pathlib import Path


def write_corpus(path: Path, mb: float) -> None:
    """Rows of ~2 KB of random words in row groups of 500 rows (about 1 MB each)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    words = [f"{rng.getrandbits(24):x}" for _ in range(5000)]
    written, writer = 0, None
    while written < mb * 1e6:
        table = pa.table({"text": [" ".join(rng.choices(words, k=300)) for _ in range(500)]})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
        written += table.nbytes
    writer.close()


def peak_mb(pid: int | str) -> float:
    """The process's peak resident memory so far, MiB (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next(int(line.split()[1]) for line in status.splitlines()
                if line.startswith("VmHWM:")) / 1024  # fmt: skip


def children() -> list[str]:
    """This process's children's pids (the tokenizing workers)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # not a process, or gone
        if entry.name.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == me:
            found.append(entry.name)
    return found


def main() -> None:
    from pretrain.data import shards

    mb, root = float(sys.argv[1]), Path(sys.argv[2])
    write_corpus(root / "corpus.parquet", mb)
    workers, done = {"peak": 0.0}, threading.Event()

    def watch() -> None:  # a worker's peak can only grow: the last reading is within 50 ms
        while not done.wait(0.05):
            workers["peak"] = max([workers["peak"], *map(peak_mb, children())])

    watcher = threading.Thread(target=watch)
    watcher.start()
    manifest = shards.prepare([root / "corpus.parquet"], "bytes", root / "out", progress=False,
                              workers=2)  # fmt: skip
    done.set()
    watcher.join()
    print(json.dumps({"main_mb": peak_mb("self"), "worker_mb": workers["peak"],
                      "tokens": manifest["tokens"]}))  # fmt: skip


if __name__ == "__main__":  # spawned workers import this file as their __main__
    main()
