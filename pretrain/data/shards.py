"""Corpus -> tokenized webdataset `.tar` shards + `manifest.json`.

Each shard is a tar of members `<n>.u16` (or `.u32` when the vocabulary exceeds 65,536):
raw little-endian token ids, a contiguous piece of the stream of EOS-separated documents.
Members hold ~64K tokens, so reading is a few large sequential reads rather than one small
read per document. Each member `<n>.u16` is preceded by `<n>.crc32`, the CRC-32 of its bytes
(8 hex digits), and the manifest records each shard's token count and the CRC-32 of the whole
file: the loader checks every member it reads, and a whole shard when it reads one.
Packing into training windows happens in the loader, so a new `seq_len` needs no
re-sharding. A document goes to the validation split when its hash says so, which
keeps the split stable as the corpus grows. The same input gives the same shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from pretrain.data import tokenizer as tokenizers
from pretrain.data.inputs import NOT_TEXT_FRACTION, ReadReport, find_inputs, read_documents

log = logging.getLogger("pretrain")

MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def dtype_suffix(dtype: np.dtype) -> str:
    return {"<u2": "u16", "<u4": "u32"}[np.dtype(dtype).str]


def is_validation(doc: str, fraction: float) -> bool:
    """Stable split by content hash: the same document always lands in the same split."""
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8", "replace"), digest_size=8).digest())
    return h % 1_000_000 < fraction * 1_000_000


# ---------------------------------------------------------------------------------------------
# Writing shards


@dataclass
class SplitWriter:
    """Accumulates one split's token stream into members and members into shards."""

    out: Path
    prefix: str
    dtype: np.dtype
    member_tokens: int
    shard_tokens: int
    shards: list[dict[str, Any]] = field(default_factory=list)
    _pending: list[np.ndarray] = field(default_factory=list)
    _pending_len: int = 0
    _writer: Any = None
    _tmp: Path | None = None
    _shard: dict[str, Any] | None = None

    def add(self, ids: np.ndarray) -> None:
        if self._shard is None:
            self._open()
        self._shard["documents"] += 1  # counted in the shard where the document begins
        self._pending.append(ids)
        self._pending_len += len(ids)
        while self._pending_len >= self.member_tokens:
            self._flush_member(self.member_tokens)

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = self.out / f".{name}.tmp"
        self._writer = wds.TarWriter(str(self._tmp), mtime=0.0)  # mtime 0: byte-identical reruns
        self._shard = {"name": name, "documents": 0, "tokens": 0, "members": 0}

    def _flush_member(self, n: int) -> None:
        if self._shard is None:  # the previous shard filled up mid-document
            self._open()
        stream = np.concatenate(self._pending)
        member, rest = stream[:n], stream[n:]
        self._pending, self._pending_len = [rest], len(rest)
        key = f"{self._shard['members']:08d}"
        data = member.tobytes()
        crc = f"{zlib.crc32(data):08x}".encode()
        self._writer.write({"__key__": key, "crc32": crc, dtype_suffix(self.dtype): data})
        self._shard["members"] += 1
        self._shard["tokens"] += len(member)
        if self._shard["tokens"] >= self.shard_tokens:
            self._close()

    def _close(self) -> None:
        self._writer.close()
        self._shard["crc32"] = file_crc32(self._tmp)
        os.replace(self._tmp, self.out / self._shard["name"])
        self.shards.append(self._shard)
        self._writer = self._shard = None

    def finish(self) -> list[dict[str, Any]]:
        if self._pending_len:
            self._flush_member(self._pending_len)
        if self._shard is not None:
            self._close()
        return self.shards


def file_crc32(path: Path) -> str:
    """The CRC-32 of a file's bytes, as 8 hex digits (what the manifest records per shard)."""
    crc = 0
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def prepare(
    inputs: list[str | Path],
    tokenizer_path: str | Path,
    output: str | Path,
    shard_tokens: int = 2**25,
    member_tokens: int = 2**16,
    val_fraction: float = 0.005,
    batch_docs: int = 512,
    progress: bool = True,
    text_field: str = "text",
    on_bad_record: str = "error",
    workers: int = 1,
    task: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Tokenize `inputs` into shards under `output`; returns (and writes) the manifest.
    `inputs`, `text_field` and `on_bad_record` are read as `pretrain.data.inputs` reads them.

    `workers` processes tokenize batches of `batch_docs` documents while this one reads and
    writes, in input order: the shards and the manifest are the same bytes for any number
    of workers, and at most a few batches per worker are in memory at once. Skips all work
    when `output` already holds a manifest for the same inputs, tokenizer and settings. The
    manifest is written last, atomically: shards without one are not a finished dataset.
    `task` = (index, count): this is one task's share of a corpus (data/tasks.py), which
    may be empty, recorded in the manifest for the merge.
    """
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    out = Path(output)
    member_tokens = min(member_tokens, shard_tokens)  # a shard holds at least one member
    files = find_inputs(list(inputs))
    tok = tokenizers.load(tokenizer_path)
    vocab, eos = tok.get_vocab_size(), tokenizers.eos_id(tok)
    dtype = token_dtype(vocab)
    settings = {
        "sources": [
            {"path": str(p), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
            for p in files
        ],
        "tokenizer_sha256": tokenizers.fingerprint(tok),
        "shard_tokens": shard_tokens,
        "member_tokens": member_tokens,
        "val_fraction": val_fraction,
        "text_field": text_field,
        **({"task": {"index": task[0], "count": task[1]}} if task else {}),
    }
    existing = out / MANIFEST
    if existing.is_file():
        old = json.loads(existing.read_text())
        if {k: old.get(k) for k in settings} == settings:
            log.info("%s is up to date; nothing to do", existing)
            return old
    out.mkdir(parents=True, exist_ok=True)
    writers = {
        split: SplitWriter(out, split, dtype, member_tokens, shard_tokens)
        for split in ("train", "val")
    }
    report = ReadReport()
    batches = _batches(read_documents(files, text_field, on_bad_record, report), batch_docs)
    job = (str(tokenizer_path), int(eos), dtype.str, val_fraction)
    totals = _write_tokenized(_tokenized(batches, job, workers), writers, progress)
    _warn_skipped(report)
    if totals["documents"] == 0 and task is None:
        raise ValueError(f"the corpus {[str(i) for i in inputs]} holds no documents"
                         f"{_skipped_text(report)}")  # fmt: skip
    manifest = {
        **settings,
        "format": "pretrain-shards/1",
        "vocab_size": vocab,
        "eos_id": eos,
        "dtype": dtype_suffix(dtype),
        **totals,
        "rejected_documents": report.rejected,
        "rejected_examples": report.rejected_examples,
        "bad_records": report.bad_records,
        "bad_record_examples": report.bad_examples,
        "train": writers["train"].finish(),
        "val": writers["val"].finish(),
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, existing)
    return manifest


def _batches(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


_Job = tuple[str, int, str, float]
"""(tokenizer path, EOS id, token dtype, val fraction): what a tokenizing process needs."""
_Tokenized = tuple[np.ndarray, np.ndarray, np.ndarray, int]
"""A batch as (all its token ids with an EOS after each document, each document's length,
whether each goes to val, its UTF-8 bytes)."""

_worker_tokenizer: Any = None
_worker_job: _Job | None = None


def _tokenize_batch(batch: list[str], tok: Any, job: _Job) -> _Tokenized:
    _, eos, dtype, val_fraction = job
    docs = [np.asarray([*enc.ids, eos], dtype=dtype) for enc in tok.encode_batch(batch)]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    val = np.array([is_validation(text, val_fraction) for text in batch], dtype=bool)
    n_bytes = sum(len(text.encode("utf-8", "replace")) for text in batch)
    return np.concatenate(docs), lengths, val, n_bytes


def _init_worker(job: _Job) -> None:
    global _worker_tokenizer, _worker_job
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core per worker: the workers are the parallelism
    _worker_tokenizer, _worker_job = tokenizers.load(job[0]), job


def _worker_tokenize(batch: list[str]) -> _Tokenized:
    return _tokenize_batch(batch, _worker_tokenizer, _worker_job)


def _tokenized(batches: Iterator[list[str]], job: _Job, workers: int) -> Iterator[_Tokenized]:
    """Each batch tokenized, in order: here, or by `workers` processes with at most two
    batches per worker in flight (memory stays bounded whatever the corpus size)."""
    if workers == 1:
        tok = tokenizers.load(job[0])
        for batch in batches:
            yield _tokenize_batch(batch, tok, job)
        return
    import multiprocessing
    from collections import deque

    context = multiprocessing.get_context("spawn")  # no forked tokenizer thread pools
    with context.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_worker_tokenize, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _write_tokenized(
    tokenized: Iterator[_Tokenized], writers: dict[str, SplitWriter], progress: bool
) -> dict[str, int]:
    """Append each document to its split's writer, in order; the totals."""
    docs = tokens = text_bytes = 0
    t0 = time.perf_counter()
    bar = _progress(progress)
    for flat, lengths, val, n_bytes in tokenized:
        for ids, to_val in zip(np.split(flat, np.cumsum(lengths)[:-1]), val, strict=True):
            writers["val" if to_val else "train"].add(ids)
        docs, tokens, text_bytes = docs + len(lengths), tokens + len(flat), text_bytes + n_bytes
        if bar is not None:
            bar.update(len(lengths))
            elapsed = time.perf_counter() - t0
            bar.set_postfix(
                tok_per_s=f"{tokens / elapsed:,.0f}", MB_per_s=f"{text_bytes / elapsed / 1e6:.1f}"
            )
    if bar is not None:
        bar.close()
    return {"documents": docs, "tokens": tokens, "text_bytes": text_bytes}


def _warn_skipped(report: ReadReport) -> None:
    if report.rejected:
        log.warning(
            "skipped %d document(s) that are not text (more than %.0f%% invalid UTF-8, or NUL "
            "characters), first: %s", report.rejected, 100 * NOT_TEXT_FRACTION,
            report.rejected_examples[0],
        )  # fmt: skip
    if report.bad_records:
        log.warning("skipped %d bad record(s) (on_bad_record=skip), first: %s",
                    report.bad_records, report.bad_examples[0])  # fmt: skip


def _skipped_text(report: ReadReport) -> str:
    """' (what was skipped)' for a message about an empty corpus."""
    parts = [f"{report.rejected} rejected as not text, first {report.rejected_examples[0]}"
             for _ in range(bool(report.rejected))]  # fmt: skip
    parts += [f"{report.bad_records} bad record(s), first {report.bad_examples[0]}"
              for _ in range(bool(report.bad_records))]  # fmt: skip
    return f" ({'; '.join(parts)})" if parts else ""


def _progress(enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit="doc", desc="tokenizing", dynamic_ncols=True)
