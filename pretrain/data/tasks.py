"""A corpus tokenized as N independent tasks (Slurm array tasks, or any N processes on any
machines), then merged: each task writes a complete shard set of its own share of the
input files under `<output>/task-<I>-of-<N>/`, and `merge` writes the one `manifest.json`
that lists every task's shards, in task order, once all are done.

A task's share is a contiguous run of the input files (in their sorted order), balanced by
bytes: the same inputs and N always give each task the same files, so a failed task can be
rerun alone, and a finished one's rerun does nothing (its manifest is up to date). Merged,
the documents are in input order, as one task would have written them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pretrain.data.shards import MANIFEST

TASK_DIR = re.compile(r"^task-(\d{5})-of-(\d{5})$")
SAME = ("format", "vocab_size", "eos_id", "dtype", "tokenizer_sha256", "shard_tokens",
        "member_tokens", "val_fraction", "text_field")  # fmt: skip
"""What every task's manifest must agree on."""
EXAMPLES = 10


def task_dir(output: Path, index: int, count: int) -> Path:
    return Path(output) / f"task-{index:05d}-of-{count:05d}"


def task_from_env(num_tasks: int | None, task_index: int | None) -> tuple[int, int]:
    """(index, count): the arguments, else Slurm's array variables, else the one task."""
    if num_tasks is None:
        num_tasks = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    if task_index is None:
        task_index = int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)) if num_tasks > 1 else 0
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(
            f"task {task_index} of {num_tasks}: --task-index must be in 0..--num-tasks - 1 "
            "(a Slurm array of N tasks: --array=0-<N-1>)"
        )
    return task_index, num_tasks


def share(files: list[Path], index: int, count: int) -> list[Path]:
    """Task `index`'s files of `count`: each file goes to the task whose byte range holds
    the file's middle byte, so shares are contiguous and balanced by bytes."""
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    mine, start = [], 0
    for f, size in zip(files, sizes, strict=True):
        task = min(int((start + size / 2) * count / total), count - 1) if total else 0
        if task == index:
            mine.append(f)
        start += size
    return mine


def merge(output: Path) -> dict[str, Any]:
    """Write `output/manifest.json` over the finished tasks under `output`; refuses, naming
    them, while a task is missing or unfinished, or when tasks disagree."""
    output = Path(output)
    counts = {int(m[2]) for d in output.glob("task-*") if (m := TASK_DIR.match(d.name))}
    if not counts:
        raise ValueError(
            f"{output} holds no task-<I>-of-<N> directories: run the tasks first "
            "(tools/prepare_data.py --num-tasks N --task-index I, or slurm/prepare_data.sh)"
        )
    if len(counts) > 1:
        raise ValueError(
            f"{output} holds tasks of {sorted(counts)} tasks in all: remove the directories "
            "of the split you no longer mean, then merge"
        )
    count = counts.pop()
    dirs = [task_dir(output, i, count) for i in range(count)]
    missing = [i for i, d in enumerate(dirs) if not (d / MANIFEST).is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} of {count} task(s) are missing or unfinished (no {MANIFEST}): "
            f"{_ranges(missing)}. Rerun them (sbatch --array={_ranges(missing)} "
            f"slurm/prepare_data.sh --num-tasks {count} ..., or tools/prepare_data.py "
            f"--num-tasks {count} --task-index I ...), then merge"
        )
    parts = [json.loads((d / MANIFEST).read_text()) for d in dirs]
    _check_agree(parts, dirs, count)
    merged = _merged(parts, dirs)
    tmp = output / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(merged, indent=1))
    os.replace(tmp, output / MANIFEST)
    return merged


def _check_agree(parts: list[dict], dirs: list[Path], count: int) -> None:
    for i, (part, d) in enumerate(zip(parts, dirs, strict=True)):
        if part.get("task") != {"index": i, "count": count}:
            raise ValueError(f"{d / MANIFEST} is not task {i} of {count} ({part.get('task')})")
        diff = [k for k in SAME if part.get(k) != parts[0].get(k)]
        if diff:
            raise ValueError(
                f"task {i} was made with other settings than task 0 ({', '.join(diff)}): "
                f"rerun it with the same --tokenizer and options"
            )


def _merged(parts: list[dict], dirs: list[Path]) -> dict[str, Any]:
    first = parts[0]

    def shards(split: str) -> list[dict]:
        return [{**s, "name": f"{d.name}/{s['name']}"}
                for part, d in zip(parts, dirs, strict=True) for s in part[split]]  # fmt: skip

    def examples(key: str) -> list[str]:
        return [e for part in parts for e in part.get(key, [])][:EXAMPLES]

    documents = sum(p["documents"] for p in parts)
    if documents == 0:
        raise ValueError(f"the {len(parts)} task(s) hold no documents together")
    return {
        **{k: first[k] for k in SAME},
        "sources": [s for p in parts for s in p["sources"]],
        "tasks": len(parts),
        "documents": documents,
        "tokens": sum(p["tokens"] for p in parts),
        "text_bytes": sum(p["text_bytes"] for p in parts),
        "rejected_documents": sum(p.get("rejected_documents", 0) for p in parts),
        "rejected_examples": examples("rejected_examples"),
        "bad_records": sum(p.get("bad_records", 0) for p in parts),
        "bad_record_examples": examples("bad_record_examples"),
        "train": shards("train"),
        "val": shards("val"),
    }


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (Slurm's --array syntax)."""
    out, start = [], None
    for i, n in enumerate(indices):
        if start is None:
            start = n
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(out)
