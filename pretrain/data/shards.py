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

import io
import json
import logging
import os
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data import tokenizer as tokenizers
from pretrain.data.inputs import NOT_TEXT_FRACTION, ReadReport, find_inputs, read_documents
from pretrain.data.tokenize import Job, Tokenized, tokenized

log = logging.getLogger("pretrain")

MANIFEST = "manifest.json"
BATCH_CHARS = 1 << 18
"""Characters per batch of documents handed to a tokenizing worker (about 256 KB)."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def dtype_suffix(dtype: np.dtype) -> str:
    return {"<u2": "u16", "<u4": "u32"}[np.dtype(dtype).str]


# ---------------------------------------------------------------------------------------------
# Writing shards


class _TarWriter:
    """A plain tar of members, each with mtime 0 (byte-identical reruns), mode 0444 and the
    owner webdataset's writer gives (so shards are the bytes it wrote); tarfile alone, since
    importing webdataset imports torch (a second per tokenizing worker)."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w|")  # noqa: SIM115 (closed in close)

    def write(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0.0, 0o444
        info.uname = info.gname = "bigdata"
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()
        self._file.close()


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
        self._pending.append(ids.copy())  # not a view, which would keep its whole batch alive
        self._pending_len += len(ids)
        while self._pending_len >= self.member_tokens:
            self._flush_member(self.member_tokens)

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = self.out / f".{name}.tmp"
        self._writer = _TarWriter(self._tmp)
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
        self._writer.write(f"{key}.crc32", crc)
        self._writer.write(f"{key}.{dtype_suffix(self.dtype)}", data)
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

    `workers` > 1 processes tokenize batches of `batch_docs` documents (or ~BATCH_CHARS
    characters) while this one reads and writes, in input order (1: this process does it
    all): the shards and the manifest are the same bytes for any number of workers, and at
    most a few batches per worker are in memory at once. Skips all work
    when `output` already holds a manifest for the same inputs, tokenizer and settings. The
    manifest is written last, atomically: shards without one are not a finished dataset.
    `task` = (index, count): this is one task's share of a corpus (data/tasks.py), which
    may be empty, recorded in the manifest for the merge.
    """
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1 (1: tokenize in this process)")
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
    docs = read_documents(files, text_field, on_bad_record, report)
    job = Job(str(tokenizer_path), int(eos), dtype.str, val_fraction)
    batches = tokenized(_batches(docs, batch_docs, BATCH_CHARS), job, workers)
    total_bytes = sum(src["bytes"] for src in settings["sources"])
    bar = Progress(total_bytes, report) if progress else None
    totals = _write_tokenized(batches, writers, bar)
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


def _batches(docs: Iterator[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    """Documents in batches of up to `max_docs` documents or about `max_chars` characters
    (whichever comes first: many batches, for the workers, even of a few large files)."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_tokenized(
    batches: Iterator[Tokenized], writers: dict[str, SplitWriter], bar: Progress | None
) -> dict[str, int]:
    """Append each document to its split's writer, in order; the totals."""
    docs = tokens = text_bytes = 0
    for flat, lengths, val, n_bytes in batches:
        for ids, to_val in zip(np.split(flat, np.cumsum(lengths)[:-1]), val, strict=True):
            writers["val" if to_val else "train"].add(ids)
        docs, tokens, text_bytes = docs + len(lengths), tokens + len(flat), text_bytes + n_bytes
        if bar is not None:
            bar.show(docs, tokens, text_bytes)
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
    parts = []
    if report.rejected:
        parts.append(f"{report.rejected} rejected as not text, first "
                     f"{report.rejected_examples[0]}")  # fmt: skip
    if report.bad_records:
        parts.append(f"{report.bad_records} bad record(s), first {report.bad_examples[0]}")
    return f" ({'; '.join(parts)})" if parts else ""


class Progress:
    """A bar over the input's bytes on disk (so its ETA is the corpus's), moved as the input
    is read (`ReadReport.bytes_done`), with documents, tokens, tokens/s and MB/s of text."""

    def __init__(self, total_bytes: int, report: ReadReport) -> None:
        from tqdm import tqdm

        self.report, self.t0 = report, time.perf_counter()
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing",
                        dynamic_ncols=True)  # fmt: skip

    def show(self, docs: int, tokens: int, text_bytes: int) -> None:
        self.bar.update(self.report.bytes_done - self.bar.n)
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix(docs=f"{docs:,}", tokens=f"{tokens:,}",
                             tok_per_s=f"{tokens / elapsed:,.0f}",
                             MB_per_s=f"{text_bytes / elapsed / 1e6:.1f}")  # fmt: skip

    def close(self) -> None:
        self.bar.update(self.report.bytes_done - self.bar.n)
        self.bar.close()
