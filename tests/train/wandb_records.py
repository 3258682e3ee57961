"""Read an offline W&B run's `.wandb` file: the run record (config) and history rows.

The file is W&B's transaction log: a 7-byte header (":W&B", magic, version), then
LevelDB-style log records (4-byte CRC, 2-byte length, 1-byte type; 32 KiB blocks) that
each hold one protobuf `Record`. wandb 0.31 ships the protobufs but no Python reader.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def payloads(data: bytes) -> list[bytes]:
    assert data[:4] == b":W&B", f"not a W&B transaction log: {data[:7]!r}"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
        else:  # zero padding at the end of the file
            break
    return out


def read_run(
    run_dir: Path, timeout: float = 30.0
) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """(run id, config, history rows) of the offline run in `run_dir` (offline-run-*).

    W&B's service process may still be writing the file after `finish()` returned (seen in
    CI: no history row at first, the row there later), so this waits, up to `timeout`
    seconds, for a history row and a file that stopped growing.
    """
    (path,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    data = path.read_bytes()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        again = path.read_bytes()
        if again == data and _parse(data)[2]:
            break
        data = again
    return _parse(path.read_bytes())


def _parse(data: bytes) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    from wandb.proto import wandb_internal_pb2 as pb

    run_id, config, history = "", {}, []
    for payload in payloads(data):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                   for i in record.history.item}  # fmt: skip
            history.append(row)
    config.pop("_wandb", None)
    return run_id, config, history
