"""A corpus tokenized as independent tasks, then merged, is the corpus tokenized at once."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from pretrain.data import shards, tasks
from pretrain.data.stream import build_loader


def _corpus(root: Path, n: int = 12) -> list[Path]:
    root.mkdir()
    for i in range(n):  # uneven sizes
        (root / f"{i:02d}.txt").write_text(f"file {i} " + "text " * (20 + 37 * (i % 5)))
    return sorted(root.iterdir())


def _stream(out: Path, split: str) -> bytes:
    """The split's tokens, in manifest order, as one byte string."""
    manifest = json.loads((out / shards.MANIFEST).read_text())
    data = b""
    for shard in manifest[split]:
        with tarfile.open(out / shard["name"]) as tar:
            data += b"".join(tar.extractfile(m).read() for m in tar if m.name.endswith(".u16"))
    return data


def test_shares_are_contiguous_balanced_and_cover_every_file(tmp_path: Path) -> None:
    files = _corpus(tmp_path / "c", 40)
    parts = [tasks.share(files, i, 4) for i in range(4)]
    assert [f for p in parts for f in p] == files  # in order, each file once
    sizes = [sum(f.stat().st_size for f in p) for p in parts]
    assert max(sizes) < 1.6 * min(sizes)


def test_more_tasks_than_files_leaves_a_task_empty_and_the_merge_takes_it(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    files = [tmp_path / "c" / f"{i}.txt" for i in range(2)]
    for f in files:
        f.write_text("same size " * 30)
    assert [tasks.share(files, i, 3) for i in range(3)] == [[files[0]], [], [files[1]]]
    out = tmp_path / "out"
    for i in range(3):
        shards.prepare(tasks.share(files, i, 3), "bytes", tasks.task_dir(out, i, 3),
                       task=(i, 3), progress=False, val_fraction=0.0)  # fmt: skip
    merged = tasks.merge(out)
    assert merged["documents"] == 2 and len(merged["train"]) == 2 and merged["tasks"] == 3


def test_two_tasks_merged_equal_one_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _corpus(tmp_path / "c")
    settings = dict(shard_tokens=400, member_tokens=100, val_fraction=0.2, progress=False)
    one = tmp_path / "one"
    shards.prepare(files, "bytes", one, **settings)
    out = tmp_path / "two"
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    index, count = tasks.task_from_env(None, None)
    assert (index, count) == (1, 2)
    shards.prepare(tasks.share(files, 1, 2), "bytes", tasks.task_dir(out, 1, 2),
                   task=(1, 2), **settings)  # fmt: skip
    with pytest.raises(ValueError, match=r"1 of 2 task\(s\) are missing or unfinished .*: 0\. "
                                         r"Rerun them \(sbatch --array=0 "):  # fmt: skip
        tasks.merge(out)
    shards.prepare(tasks.share(files, 0, 2), "bytes", tasks.task_dir(out, 0, 2),
                   task=(0, 2), **settings)  # fmt: skip
    merged = tasks.merge(out)
    single = json.loads((one / shards.MANIFEST).read_text())
    for key in ("documents", "tokens", "text_bytes", "vocab_size", "tokenizer_sha256"):
        assert merged[key] == single[key], key
    assert [s["path"] for s in merged["sources"]] == [str(f) for f in files]
    for split in ("train", "val"):  # the same documents in the same order
        assert _stream(out, split) == _stream(one, split)
    assert merged["train"][0]["name"].startswith("task-00000-of-00002/train-")
    loader = build_loader(str(out), 259, 16, 2, seed=0, num_workers=0)  # a dataset like any
    assert next(loader).shape == (2, 17) and isinstance(next(loader), torch.Tensor)


def test_a_finished_task_reruns_as_nothing_and_disagreeing_tasks_are_refused(
    tmp_path: Path,
) -> None:
    files = _corpus(tmp_path / "c", 4)
    out = tmp_path / "out"
    for i in range(2):
        shards.prepare(tasks.share(files, i, 2), "bytes", tasks.task_dir(out, i, 2),
                       task=(i, 2), progress=False)  # fmt: skip
    first = tasks.task_dir(out, 0, 2) / shards.MANIFEST
    stamp = first.stat().st_mtime_ns
    shards.prepare(tasks.share(files, 0, 2), "bytes", tasks.task_dir(out, 0, 2),
                   task=(0, 2), progress=False)  # fmt: skip
    assert first.stat().st_mtime_ns == stamp  # up to date: nothing written
    shards.prepare(tasks.share(files, 1, 2), "bytes", tasks.task_dir(out, 1, 2), task=(1, 2),
                   progress=False, val_fraction=0.5)  # fmt: skip
    with pytest.raises(ValueError, match=r"task 1 was made with other settings .*val_fraction"):
        tasks.merge(out)
    tasks.task_dir(out, 0, 3).mkdir()
    with pytest.raises(ValueError, match=r"holds tasks of \[2, 3\] tasks in all"):
        tasks.merge(out)
    with pytest.raises(ValueError, match=r"--task-index must be in 0\.\.--num-tasks - 1"):
        tasks.task_from_env(2, 2)
    assert tasks._ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
