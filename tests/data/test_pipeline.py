"""Tokenizer -> shards -> streaming loader: exact round trip, disjoint readers, exact resume,
http, and a clear error for each kind of bad input."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data import shards, tokenizer
from pretrain.data.inputs import read_documents
from pretrain.data.source import DataContext, DataSource
from pretrain.data.stream import (
    DataError,
    Piece,
    TokenLoader,
    build_loader,
    read_members,
    shards_source,
)
from pretrain.data.tokenize import is_validation
from tests.conftest import EXACT, REPO, TINY, curve, launch, train

SEQ = 16


def _corpus(root: Path, n_docs: int = 60) -> list[str]:
    """Distinct documents in plain files, a .jsonl and a .jsonl.gz; returns them in read order."""
    root.mkdir(parents=True, exist_ok=True)
    docs = [
        f"document {i}: " + " ".join(f"d{i}w{j}" for j in range(5 + i % 23)) for i in range(n_docs)
    ]
    third = n_docs // 3
    for i, doc in enumerate(docs[:third]):
        (root / f"a{i:03d}.txt").write_text(doc)
    (root / "b.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in docs[third : 2 * third])
    )
    with gzip.open(root / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[2 * third :])
    return docs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("data")
    docs = _corpus(root / "corpus")
    shards.prepare([root / "corpus"], "bytes", root / "shards", shard_tokens=1000,
                   member_tokens=300, val_fraction=0.1, progress=False)  # fmt: skip
    return root / "shards", docs


def _stream(shard_dir: Path, split: str) -> np.ndarray:
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    parts = [t for s in manifest[split] for t in read_members(str(shard_dir / s["name"]))]
    return np.concatenate(parts)


def _length(pieces: list[Piece]) -> int:
    return sum(len(t) for p in pieces for t in read_members(p.url, p.start, p.stop))


def _covers_every_token_once(pieces: list[Piece], shard_dir: Path) -> None:
    """The pieces tile every train shard of `shard_dir` exactly: no token twice, none left."""
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    by_url: dict[str, list[tuple[int, int]]] = {}
    for p in pieces:
        by_url.setdefault(p.url, []).append((p.start, p.stop))
    assert sorted(by_url) == sorted(str(shard_dir / s["name"]) for s in manifest["train"])
    for shard in manifest["train"]:
        spans = sorted(by_url[str(shard_dir / shard["name"])])
        ends = [0] + [b for _, b in spans]
        assert [a for a, _ in spans] == ends[:-1] and ends[-1] == shard["tokens"]


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus small enough for one train shard (of 22 members), as prepare_data's default
    shard size makes of anything under ~33M tokens."""
    root = tmp_path_factory.mktemp("one")
    _corpus(root / "corpus")
    shards.prepare([root / "corpus"], "bytes", root / "shards", member_tokens=300,
                   val_fraction=0.1, progress=False)  # fmt: skip
    assert len(json.loads((root / "shards" / "manifest.json").read_text())["train"]) == 1
    return root / "shards"


def _shard_dir(request: pytest.FixtureRequest, name: str) -> Path:
    """The shard directory of fixture `name` (`dataset` or `one_shard`)."""
    value = request.getfixturevalue(name)
    return value[0] if isinstance(value, tuple) else value


def _take(loader, n: int) -> list[torch.Tensor]:
    return [next(loader).clone() for _ in range(n)]


def test_round_trip_reproduces_the_token_stream(dataset: tuple[Path, list[str]]) -> None:
    shard_dir, docs = dataset
    tok = tokenizer.byte_tokenizer()
    eos = tokenizer.eos_id(tok)
    expected = {"train": [], "val": []}
    for doc in docs:
        split = "val" if is_validation(doc, 0.1) else "train"
        expected[split] += [*doc.encode(), eos]  # the byte tokenizer: ids are the bytes
    for split in ("train", "val"):
        assert _stream(shard_dir, split).tolist() == expected[split]
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert manifest["dtype"] == "u16" and manifest["vocab_size"] == 259
    assert manifest["documents"] == len(docs) and len(manifest["val"]) >= 1
    assert sum(s["tokens"] for s in manifest["train"] + manifest["val"]) == manifest["tokens"]


def test_same_input_same_shards_and_rerun_skips(tmp_path: Path) -> None:
    _corpus(tmp_path / "corpus", 20)
    digests = []
    for out in ("s1", "s2"):
        shards.prepare([tmp_path / "corpus"], "bytes", tmp_path / out, shard_tokens=500,
                       member_tokens=100, progress=False)  # fmt: skip
        digests.append(sorted(
            hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / out).glob("*.tar")
        ))  # fmt: skip
    assert digests[0] == digests[1]
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "s1").iterdir()}
    shards.prepare([tmp_path / "corpus"], "bytes", tmp_path / "s1", shard_tokens=500,
                   member_tokens=100, progress=False)  # fmt: skip
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "s1").iterdir()} == before


def test_bpe_tokenizer_trains_to_size_and_round_trips(tmp_path: Path) -> None:
    docs = _corpus(tmp_path / "corpus")
    tok = tokenizer.train_bpe(docs * 5, vocab_size=300)
    assert tok.get_vocab_size() == 300
    assert tok.decode(tok.encode(docs[3]).ids) == docs[3]
    tok.save(str(tmp_path / "t.json"))
    loaded = tokenizer.load(tmp_path / "t.json")
    assert tokenizer.fingerprint(loaded) == tokenizer.fingerprint(tok)


@pytest.mark.parametrize("data", ["dataset", "one_shard"])
def test_readers_of_two_ranks_with_two_workers_read_each_window_once(
    data: str, request: pytest.FixtureRequest
) -> None:
    """Each epoch is cut into one token range per reader (2 ranks x 2 workers), however few
    the shards: every window of each reader's range is read, none twice, and the ranges
    tile every shard."""
    shard_dir = _shard_dir(request, data)
    rows: list[bytes] = []
    expected, pieces, lengths = 0, [], []
    for rank in (0, 1):
        loader = build_loader(str(shard_dir), 259, SEQ, 1, seed=3, rank=rank, world_size=2,
                              num_workers=2, epochs=1)  # fmt: skip
        rows += [b.numpy().tobytes() for b in loader]
        for reader in range(2):
            mine = loader.dataset.reader_pieces(reader, epoch=0)
            pieces += mine
            lengths.append(_length(mine))
            expected += (lengths[-1] - 1) // SEQ
    assert len(rows) == expected  # every window of every reader's stream ...
    assert len(set(rows)) == len(rows)  # ... and none twice (the documents are distinct)
    _covers_every_token_once(pieces, shard_dir)
    assert max(lengths) - min(lengths) <= 1  # equal shares, to the token


@pytest.mark.parametrize(
    ("data", "workers", "rank"), [("dataset", 0, 0), ("dataset", 2, 0), ("one_shard", 2, 1)]
)
def test_resume_yields_exactly_the_uninterrupted_batches(
    data: str, workers: int, rank: int, request: pytest.FixtureRequest
) -> None:
    """Stopped after k micro-batches and restored from its state_dict, a loader gives the
    batches of an uninterrupted one; also for rank 1 of 2 with 2 workers on one shard."""
    shard_dir = _shard_dir(request, data)

    def make():
        return build_loader(str(shard_dir), 259, SEQ, 3, seed=5, rank=rank, world_size=rank + 1,
                            num_workers=workers, shuffle_windows=7)  # fmt: skip

    total = 80  # several epochs of this small set: crosses members, shards and epochs
    reference = _take(make(), total)
    for k in (1, 2, 9, 23, 41, 67):
        first = make()
        head = _take(first, k)
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        tail = _take(resumed, total - k)
        assert all(torch.equal(a, b) for a, b in zip(head + tail, reference, strict=True)), k
    state = make().state_dict()
    assert state["readers"] == max(workers, 1)


def test_the_shards_family_builder_takes_one_context(dataset: tuple[Path, list[str]]) -> None:
    """data=shards' builder is `build_loader` for a DataContext: data.split for training,
    the val split for an evaluation context."""
    shard_dir, _ = dataset
    ctx = DataContext(259, SEQ, 2, grad_accum=1, seed=5)
    train = shards_source(ctx, path=str(shard_dir), num_workers=0)
    assert isinstance(train, DataSource) and train.metrics() == {"data_skipped_shards": 0}
    same = build_loader(str(shard_dir), 259, SEQ, 2, seed=5, num_workers=0)
    assert torch.equal(next(train), next(same))
    val = shards_source(ctx.alone("val"), path=str(shard_dir), split="train", num_workers=0)
    held_out = build_loader(str(shard_dir), 259, SEQ, 2, seed=5, split="val", num_workers=0)
    assert torch.equal(next(val), next(held_out))


def test_resume_with_another_worker_count_is_refused(dataset: tuple[Path, list[str]]) -> None:
    shard_dir, _ = dataset
    a = build_loader(str(shard_dir), 259, SEQ, 2, seed=5, num_workers=0)
    _take(a, 3)
    b = build_loader(str(shard_dir), 259, SEQ, 2, seed=5, num_workers=2)
    with pytest.raises(DataError, match=r"data\.num_workers"):
        b.load_state_dict(a.state_dict())


def test_http_shards_stream_like_local_files(dataset: tuple[Path, list[str]]) -> None:
    shard_dir, _ = dataset
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shard_dir))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        n = len(list(shard_dir.glob("train-*.tar")))
        url = f"http://127.0.0.1:{server.server_port}/train-{{000000..{n - 1:06d}}}.tar"
        remote = build_loader(url, 259, SEQ, 2, seed=1, num_workers=0)
        local = build_loader(str(shard_dir / "train-*.tar"), 259, SEQ, 2, seed=1, num_workers=0)
        for a, b in zip(_take(remote, 20), _take(local, 20), strict=True):
            assert torch.equal(a, b)
    finally:
        server.shutdown()


# --- bad input ---------------------------------------------------------------------------


def test_empty_corpus_is_refused(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds no documents"):
        shards.prepare([tmp_path / "corpus"], "bytes", tmp_path / "out", progress=False)


def test_missing_corpus_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        shards.prepare([tmp_path / "nope"], "bytes", tmp_path / "out", progress=False)


def test_directory_without_manifest_and_empty_glob(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"without manifest\.json"):
        build_loader(str(tmp_path), 259, SEQ, 1, seed=0)
    with pytest.raises(DataError, match="matches no shard files"):
        build_loader(str(tmp_path / "*.tar"), 259, SEQ, 1, seed=0)


def test_a_val_split_must_exist(dataset: tuple[Path, list[str]], tmp_path: Path) -> None:
    """Evaluation reads split=val: a glob has none (never score the training files), and a
    manifest without val shards is named with the fix."""
    val = build_loader(str(dataset[0]), 259, SEQ, 1, seed=0, split="val", num_workers=0)
    assert next(val).shape[1] == SEQ + 1
    with pytest.raises(DataError, match=r"has no val split .* trainer\.eval_every_steps=0"):
        build_loader(str(dataset[0] / "*.tar"), 259, SEQ, 1, seed=0, split="val")
    no_val = tmp_path / "no_val"
    shutil.copytree(dataset[0], no_val)
    manifest = json.loads((no_val / "manifest.json").read_text())
    manifest["val"] = []
    (no_val / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"lists no val shards: .*--val-fraction > 0"):
        build_loader(str(no_val), 259, SEQ, 1, seed=0, split="val", num_workers=0)


def test_evaluation_without_a_val_split_fails_before_training(
    dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    proc = launch([*TINY, "data=shards", f"data.path={dataset[0]}/*.tar", "model.vocab_size=259",
                   "trainer.eval_every_steps=5", f"run_dir={tmp_path}"])  # fmt: skip
    assert proc.returncode == 4, proc.stderr[-2000:]  # a data error: one message, its own code
    assert "has no val split" in proc.stderr and "trainer.eval_every_steps=0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()  # no step ran


def test_data_that_runs_out_before_the_last_step_is_named(
    dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """data.epochs=1 holds a few steps of this small set; asked for 1000, the run stops with
    exit 4 and the fix, not a bare StopIteration (2 DataLoader workers)."""
    proc = launch([*TINY, "data=shards", f"data.path={dataset[0]}", "model.vocab_size=259",
                   "data.epochs=1", "trainer.max_steps=1000", f"run_dir={tmp_path}"])  # fmt: skip
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "the data ran out during step" in proc.stderr and "Raise data.epochs" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_model_vocab_smaller_than_the_tokenizer_is_refused(dataset: tuple[Path, list[str]]) -> None:
    with pytest.raises(ValueError, match=r"vocab_size=256: set model.vocab_size=259 \(or more"):
        build_loader(str(dataset[0]), 256, SEQ, 1, seed=0)


def test_tokens_outside_the_vocabulary_are_caught(dataset: tuple[Path, list[str]]) -> None:
    loader = build_loader(str(dataset[0] / "train-*.tar"), 100, SEQ, 1, seed=0, num_workers=0)
    with pytest.raises(DataError, match=r"token id \d+ >= model.vocab_size=100"):
        next(loader)


def test_too_little_data_for_ranks_times_workers(dataset: tuple[Path, list[str]]) -> None:
    """A manifest directory is split among readers by tokens: only less than one window per
    reader is refused. Shards of unknown length (a glob) are dealt whole, one per reader."""
    shard_dir = dataset[0]
    total = json.loads((shard_dir / "manifest.json").read_text())["tokens"]
    readers = total // (SEQ + 1) // 4 * 4 + 4  # just too many for a window each
    build_loader(str(shard_dir), 259, SEQ, 1, seed=0, world_size=readers // 8, num_workers=4)
    with pytest.raises(DataError, match=r"num_workers.*each reader needs at least one window of"):
        build_loader(str(shard_dir), 259, SEQ, 1, seed=0, world_size=readers // 4, num_workers=4)
    n = len(list(shard_dir.glob("train-*.tar")))
    with pytest.raises(DataError, match=rf"{n} train shard\(s\) of unknown length .* manifest"):
        build_loader(str(shard_dir / "train-*.tar"), 259, SEQ, 1, seed=0, world_size=n,
                     num_workers=2)  # fmt: skip


def _copy_with_truncated_shard(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    victim = sorted(dst.glob("train-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:700])  # cut inside the second member
    return victim


def test_truncated_shard_is_named(dataset: tuple[Path, list[str]], tmp_path: Path) -> None:
    victim = _copy_with_truncated_shard(dataset[0], tmp_path / "s")
    loader = build_loader(str(tmp_path / "s"), 259, SEQ, 1, seed=0, num_workers=0, epochs=1)
    with pytest.raises(DataError, match=f"shard {victim} is corrupt or truncated"):
        list(loader)


def test_on_corrupt_skip_counts_and_goes_on(
    dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    _copy_with_truncated_shard(dataset[0], tmp_path / "s")
    loader = build_loader(str(tmp_path / "s"), 259, SEQ, 1, seed=0, num_workers=0, epochs=1,
                          on_corrupt="skip")  # fmt: skip
    assert len(list(loader)) > 0
    assert loader.dataset.skipped_shards == 1


def test_a_pass_without_a_window_stops_instead_of_looping(
    dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """Every train shard corrupt and skipped (data.on_corrupt=skip), epochs unlimited: the
    reader would pass over its shards forever; it stops at the first empty pass, naming them."""
    shutil.copytree(dataset[0], tmp_path / "s")
    for shard in (tmp_path / "s").glob("train-*.tar"):
        shard.write_bytes(bytes(1024))  # zeroed headers: a tar with no member
    loader = build_loader(str(tmp_path / "s"), 259, SEQ, 1, seed=0, num_workers=0,
                          on_corrupt="skip")  # fmt: skip
    with pytest.raises(DataError, match=r"whole share of epoch 0 without one window.*train-0"):
        next(loader)


def _first_train_shard(src: Path, dst: Path) -> tuple[Path, dict]:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    return dst / manifest["train"][0]["name"], manifest["train"][0]


def _member_offsets(shard: Path) -> list[int]:
    """Byte offsets of the token members' data in a shard."""
    import tarfile

    with tarfile.open(shard) as tar:
        return [m.offset_data for m in tar.getmembers() if m.name.endswith(".u16")]


def _read_all(shard_dir: Path, **kwargs: object) -> TokenLoader:
    loader = build_loader(str(shard_dir), 259, SEQ, 1, seed=0, num_workers=0, epochs=1,
                          **kwargs)  # fmt: skip
    list(loader)
    return loader


def test_every_member_and_shard_carries_a_checksum(dataset: tuple[Path, list[str]]) -> None:
    """The writer's records: a crc32 per shard in the manifest, one per member in the tar."""
    import tarfile

    manifest = json.loads((dataset[0] / "manifest.json").read_text())
    for entry in manifest["train"] + manifest["val"]:
        path = dataset[0] / entry["name"]
        assert entry["crc32"] == shards.file_crc32(path)
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert sorted(n for n in names if n.endswith(".crc32")) == sorted(
            n.replace(".u16", ".crc32") for n in names if n.endswith(".u16")
        )


def test_zeroed_body_bytes_fail_the_member_checksum(
    dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """Zeros written over token bytes (same size, valid tar): named as corrupt, or skipped
    and counted under data.on_corrupt=skip."""
    shard, _ = _first_train_shard(dataset[0], tmp_path / "s")
    data = bytearray(shard.read_bytes())
    at = _member_offsets(shard)[1]
    data[at + 10 : at + 50] = bytes(40)
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard {shard} is corrupt.*fails its checksum"):
        _read_all(tmp_path / "s")
    assert _read_all(tmp_path / "s", on_corrupt="skip").dataset.skipped_shards == 1


def test_a_zeroed_first_header_is_caught_by_the_token_count(
    dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """The tar reads as empty: the manifest's token count tells, instead of a silent
    shorter epoch."""
    shard, _ = _first_train_shard(dataset[0], tmp_path / "s")
    data = bytearray(shard.read_bytes())
    data[:512] = bytes(512)
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard {shard} is corrupt.*the manifest says"):
        _read_all(tmp_path / "s")
    assert _read_all(tmp_path / "s", on_corrupt="skip").dataset.skipped_shards == 1


def test_random_bytes_are_corrupt_not_a_bigger_tokenizer(
    dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """Random bytes over a member (ids past the vocabulary, a tar without member checksums,
    as older shards are): the message offers both causes, and skip skips the shard."""
    import tarfile

    shard, _ = _first_train_shard(dataset[0], tmp_path / "s")
    members = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            if m.name.endswith(".u16"):
                members[m.name] = tar.extractfile(m).read()
    first = sorted(members)[0]
    members[first] = np.random.default_rng(0).bytes(len(members[first]))
    with tarfile.open(shard, "w") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    del manifest["train"][0]["crc32"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    both = r"token id \d+ >= model.vocab_size=259. Either the shard is corrupt .* or it was "
    with pytest.raises(DataError, match=both + "made with another, larger tokenizer"):
        _read_all(tmp_path / "s")
    assert _read_all(tmp_path / "s", on_corrupt="skip").dataset.skipped_shards == 1


def test_a_same_size_change_fails_the_whole_shard_checksum(
    dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """A changed byte outside any member and header (the padding after a member) passes
    every other check; the manifest's checksum of the file catches it when the shard is
    read whole."""
    import tarfile

    shard, _ = _first_train_shard(dataset[0], tmp_path / "s")
    with tarfile.open(shard) as tar:
        first = tar.getmembers()[0]  # 00000000.crc32: 8 bytes, then 504 of padding
    data = bytearray(shard.read_bytes())
    data[first.offset_data + 100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"fails the manifest's checksum"):
        _read_all(tmp_path / "s")


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "sub/../../x.tar"])
def test_a_shard_name_outside_the_dataset_is_refused(
    dataset: tuple[Path, list[str]], tmp_path: Path, name: str
) -> None:
    shutil.copytree(dataset[0], tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["train"][0]["name"] = name
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"names shard .* which is not inside"):
        build_loader(str(tmp_path / "s"), 259, SEQ, 1, seed=0, num_workers=0)


def test_missing_shard_listed_in_the_manifest_is_named(
    dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    victim = _copy_with_truncated_shard(dataset[0], tmp_path / "s")
    victim.unlink()
    with pytest.raises(DataError, match=f"missing or not files, first {victim}"):  # at start
        build_loader(str(tmp_path / "s"), 259, SEQ, 1, seed=0, num_workers=0)


def test_unreadable_shard_is_named(dataset: tuple[Path, list[str]], tmp_path: Path) -> None:
    victim = _copy_with_truncated_shard(dataset[0], tmp_path / "s")
    victim.unlink()
    victim.mkdir()  # a directory where a shard should be
    with pytest.raises(DataError, match=f"missing or not files, first {victim}"):
        build_loader(str(tmp_path / "s" / "train-*.tar"), 259, SEQ, 1, seed=0, num_workers=0)
    # A shard that vanishes after the start is named when it is opened.
    loader = build_loader(str(dataset[0] / "train-*.tar"), 259, SEQ, 1, seed=0, num_workers=0)
    loader.dataset.sources[0][0] = (str(tmp_path / "gone.tar"), None)
    with pytest.raises(DataError, match=r"gone\.tar cannot be opened"):
        for _ in range(500):
            next(loader)


def test_large_vocabularies_are_stored_as_uint32(tmp_path: Path) -> None:
    assert shards.token_dtype(65536) == np.dtype("<u2")
    assert shards.token_dtype(65537) == np.dtype("<u4")
    writer = shards.SplitWriter(tmp_path, "train", np.dtype("<u4"), 100, 1000)
    ids = np.arange(70_000, 70_250, dtype=np.uint32)
    writer.add(ids)
    (shard,) = writer.finish()
    assert shard["name"].endswith(".tar")
    members = list(read_members(str(tmp_path / shard["name"])))
    assert np.concatenate(members).tolist() == ids.tolist()


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Source A holds only the byte 'a' (and EOS), source B only 'b'."""
    root = tmp_path_factory.mktemp("mix")
    for name in ("a", "b"):
        (root / f"corpus_{name}").mkdir()
        for i in range(40):
            (root / f"corpus_{name}" / f"{i:03d}.txt").write_text(name * (50 + 13 * i))
        shards.prepare([root / f"corpus_{name}"], "bytes", root / name, shard_tokens=800,
                       member_tokens=200, val_fraction=0.0, progress=False)  # fmt: skip
    return root / "a", root / "b"


def _mixed(two_sources: tuple[Path, Path], workers: int) -> TokenLoader:
    a, b = two_sources
    return build_loader(
        None, 259, SEQ, 4, seed=2, num_workers=workers,
        sources=[{"path": str(a), "weight": 0.7}, {"path": str(b), "weight": 0.3}],
    )  # fmt: skip


def test_mixing_weights_are_honoured(two_sources: tuple[Path, Path]) -> None:
    loader = _mixed(two_sources, workers=0)
    rows = torch.cat(_take(loader, 500))  # 2,000 rows
    from_a = (rows == ord("a")).any(dim=1)
    from_b = (rows == ord("b")).any(dim=1)
    assert not (from_a & from_b).any()  # a row never mixes sources
    assert abs(from_a.float().mean().item() - 0.7) < 0.04


@pytest.mark.parametrize("workers", [0, 2])
def test_mixed_sources_resume_exactly(two_sources: tuple[Path, Path], workers: int) -> None:
    reference = _take(_mixed(two_sources, workers), 60)
    for k in (3, 17, 38):
        first = _mixed(two_sources, workers)
        head = _take(first, k)
        resumed = _mixed(two_sources, workers)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        tail = _take(resumed, 60 - k)
        assert all(torch.equal(a, b) for a, b in zip(head + tail, reference, strict=True)), k


def test_path_and_sources_are_exclusive(two_sources: tuple[Path, Path]) -> None:
    with pytest.raises(DataError, match=r"exactly one of data\.path and data\.sources"):
        build_loader(str(two_sources[0]), 259, SEQ, 1, seed=0, sources=[{"path": "x"}])
    with pytest.raises(DataError, match="weights must be > 0"):
        build_loader(
            None, 259, SEQ, 1, seed=0, sources=[{"path": str(two_sources[0]), "weight": 0}]
        )


def test_sources_compose_from_the_command_line(two_sources: tuple[Path, Path]) -> None:
    from hydra.utils import instantiate

    from pretrain.config import compose

    a, b = two_sources
    cfg = compose(["data=shards", f"data.sources=[{{path: {a}, weight: 0.7}}, {{path: {b}}}]",
                   "data.num_workers=0"])  # fmt: skip
    assert cfg.data.sources[1].weight == 1.0
    loader = instantiate(cfg.data, DataContext(512, SEQ, 2, grad_accum=1, seed=0))
    assert next(loader).shape == (2, SEQ + 1)


def test_skipped_shards_are_counted_in_the_loader_metrics_and_state(
    dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    _copy_with_truncated_shard(dataset[0], tmp_path / "s")
    loader = build_loader(str(tmp_path / "s"), 259, SEQ, 1, seed=0, num_workers=0,
                          on_corrupt="skip")  # fmt: skip
    for _ in range(400):  # more than an epoch: the corrupt shard has been met
        next(loader)
    assert loader.metrics()["data_skipped_shards"] >= 1
    assert loader.state_dict()["positions"][0]["skipped_shards"] >= 1


def test_shards_from_another_tokenizer_are_refused(
    dataset: tuple[Path, list[str]], tmp_path: Path
) -> None:
    other = tokenizer.train_bpe(["some other text"] * 10, vocab_size=270)
    other.save(str(tmp_path / "other.json"))
    with pytest.raises(DataError, match=r"re-run tools/prepare_data\.py with that tokenizer"):
        build_loader(str(dataset[0]), 512, SEQ, 1, seed=0, tokenizer=str(tmp_path / "other.json"))
    build_loader(str(dataset[0]), 512, SEQ, 1, seed=0, tokenizer="bytes")  # the right one


@pytest.fixture(scope="module")
def bpe_dataset(dataset: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same documents as `dataset`, tokenized by a 300-token BPE instead of bytes."""
    root = tmp_path_factory.mktemp("bpe")
    docs = dataset[1]
    tokenizer.train_bpe(docs * 3, vocab_size=300).save(str(root / "bpe.json"))
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    shards.prepare([root / "corpus.jsonl"], root / "bpe.json", root / "shards",
                   shard_tokens=1000, member_tokens=300, val_fraction=0.1,
                   progress=False)  # fmt: skip
    return root / "shards"


def test_sources_of_different_tokenizers_are_not_mixed(
    dataset: tuple[Path, list[str]], bpe_dataset: Path
) -> None:
    sources = [{"path": str(dataset[0])}, {"path": str(bpe_dataset)}]
    with pytest.raises(DataError, match=r"2 different tokenizers.*allow_tokenizer_change"):
        build_loader(None, 300, SEQ, 1, seed=0, sources=sources, num_workers=0)
    mixed = build_loader(None, 300, SEQ, 1, seed=0, sources=sources, num_workers=0,
                         allow_tokenizer_change=True)  # fmt: skip
    assert mixed.tokenizer_sha256 is None  # no one tokenizer to hold a resume to
    alone = build_loader(str(bpe_dataset), 300, SEQ, 1, seed=0, num_workers=0)
    manifest = json.loads((bpe_dataset / "manifest.json").read_text())
    assert alone.tokenizer_sha256 == manifest["tokenizer_sha256"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_resume_on_another_tokenizers_data_is_refused_unless_allowed(
    dataset: tuple[Path, list[str]], bpe_dataset: Path, tmp_path: Path
) -> None:
    """data.tokenizer unset: the checkpoint keeps the fingerprint its data's manifest names,
    and resuming on shards of another tokenizer exits 4, unless the change is allowed."""
    run = [*TINY, "data=shards", "model.vocab_size=300", "trainer.max_steps=4",
           f"run_dir={tmp_path}"]  # fmt: skip
    train(tmp_path, [*run, f"data.path={dataset[0]}", "trainer.stop_at_step=2",
                     "checkpoint.save_final=true"])  # fmt: skip
    proc = launch([*run, f"data.path={bpe_dataset}"])
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "was trained on data tokenized by sha256" in proc.stderr
    assert "data.allow_tokenizer_change=true" in proc.stderr and "Traceback" not in proc.stderr
    allowed = launch([*run, f"data.path={bpe_dataset}", "data.allow_tokenizer_change=true"])
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "going on anyway (data.allow_tokenizer_change=true)" in allowed.stderr
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()] == [
        1,
        2,
        3,
        4,
    ]
    # Scoring it on the other tokenizer's shards: refused too, though the checkpoint carries
    # no tokenizer.json (data.tokenizer unset), unless allowed.
    ckpt = tmp_path / "checkpoints" / "step_2"
    assert not (ckpt / "tokenizer.json").exists()
    ppl = [sys.executable, str(REPO / "tools" / "eval_ppl.py"), str(ckpt), "--data",
           str(bpe_dataset), "--tokens", "64"]  # fmt: skip
    refused = subprocess.run(ppl, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "was trained on data tokenized by sha256" in refused.stderr
    assert "--allow-tokenizer-change" in refused.stderr
    scored = subprocess.run([*ppl, "--allow-tokenizer-change"], capture_output=True, text=True,
                            cwd=REPO, timeout=300)  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout)["tokens"] >= 64


def test_zstd_jsonl_corpus(tmp_path: Path) -> None:
    zstandard = pytest.importorskip("zstandard")
    lines = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)).encode()
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    docs = list(read_documents([tmp_path / "c.jsonl.zst"]))
    assert docs == [f"doc {i}" for i in range(5)]


@pytest.mark.parametrize("data", ["dataset", "one_shard"])
def test_resume_on_another_number_of_ranks_reads_no_window_twice(
    data: str, request: pytest.FixtureRequest
) -> None:
    """2 ranks x 1 reader stop; 1 rank x 2 workers take over the rest of the epoch. What is
    set aside is what the old readers had begun: at most their current shuffle block each,
    to the token, however few the shards."""
    shard_dir = _shard_dir(request, data)

    def loader(rank: int, world: int, workers: int) -> TokenLoader:
        return build_loader(str(shard_dir), 259, SEQ, 1, seed=3, rank=rank, world_size=world,
                            num_workers=workers, epochs=1, shuffle_windows=7)  # fmt: skip

    before, states = [], []
    for rank in (0, 1):
        old = loader(rank, 2, 0)
        before += [b.numpy().tobytes() for b in _take(old, 5)]
        states.append(json.loads(json.dumps(old.state_dict())))  # as a checkpoint keeps it
    new = loader(0, 1, 2)
    new.load_resharded_state(states, step=5)
    head = [b.numpy().tobytes() for b in _take(new, 3)]
    saved = json.loads(json.dumps(new.state_dict()))
    resumed = loader(0, 1, 2)  # and the new layout itself resumes exactly
    resumed.load_state_dict(saved)
    after = head + [b.numpy().tobytes() for b in resumed]

    assert set(before).isdisjoint(after) and len(set(after)) == len(after)
    begun = sorted(new.dataset.done[(0, 0)], key=str)
    assert len(begun) >= 2 and _length(begun) <= 2 * (7 * SEQ + 1)  # 2 readers, 1 block each
    # Every token not begun before the stop is read by the new readers, none twice.
    expected, pieces = 0, list(begun)
    for reader in range(2):
        mine = resumed.dataset.reader_pieces(reader, epoch=0)
        pieces += mine
        expected += (_length(mine) - 1) // SEQ
    _covers_every_token_once(pieces, shard_dir)
    assert len(after) == expected


@pytest.mark.slow
@pytest.mark.multiprocess
def test_one_shard_trains_with_default_workers_on_one_and_two_ranks(
    one_shard: Path, tmp_path: Path
) -> None:
    """A one-shard corpus with the default data.num_workers=2 trains on 1 rank and on 2
    (4 readers), and a 2-rank run stopped at step 3 and resumed equals the straight run."""
    data = ["data=shards", f"data.path={one_shard}", "model.vocab_size=259", *EXACT,
            "trainer.max_steps=6"]  # fmt: skip
    assert len(curve(train(tmp_path / "one", data))) == 6
    straight = curve(train(tmp_path / "two", data, nproc=2))
    run_dir = tmp_path / "resumed"
    train(run_dir, [*data, "trainer.stop_at_step=3", "checkpoint.save_final=true"], nproc=2)
    assert curve(train(run_dir, data, nproc=2)) == straight
