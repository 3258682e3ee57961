"""Stream token shards into packed (B, seq_len + 1) batches, and resume exactly.

Each rank runs W DataLoader workers (W = data.num_workers, or 1 in-process reader when 0).
Every epoch the shard list is shuffled by (seed, epoch), and the shuffled stream of tokens is
cut into `world_size * W` contiguous, equal ranges, one per reader (`deal`): reader g reads
tokens [g N / R, (g + 1) N / R) of the epoch's N. A range may start or end inside a shard, so
one shard serves any number of readers; no token is read by two readers, and the split never
depends on timing. It needs each shard's token count, which the manifest of a
tools/prepare_data.py directory records; shards given as a glob or URLs are dealt whole.

A reader concatenates its pieces' token streams and cuts windows of seq_len + 1 tokens
every seq_len tokens (the last token of one window is the first of the next, so every token
is a target exactly once, as in Megatron-LM). Windows are shuffled within bounded blocks (see
ShardStream). A reader's whole position is (epoch, piece index and token offset where its
current block starts, windows of the block already emitted): each batch travels with the
position after it, the main process keeps the latest position per reader, and `state_dict()` is
those positions plus which reader is next. Restoring seeks every reader there and rotates
the readers so the DataLoader's round-robin continues where it stopped.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import signal
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.shards import MANIFEST
from pretrain.data.source import DataContext
from pretrain.data.tokenizer import check_fits, eos_id, fingerprint
from pretrain.data.tokenizer import load as load_tokenizer

log = logging.getLogger("pretrain")

DTYPES = {"u16": np.dtype("<u2"), "u32": np.dtype("<u4")}


class DataError(ValueError):
    """Bad data: the message names the shard or manifest at fault and what to do."""


class CorruptShard(DataError):
    """A shard whose bytes are wrong (truncated, unreadable, failing a checksum, token ids out
    of range): `data.on_corrupt=skip` skips the rest of it and counts it."""


# ---------------------------------------------------------------------------------------------
# Finding shards


@dataclass(frozen=True)
class ShardSet:
    """The shard URLs of one split, and what the manifest says about them (if any)."""

    urls: list[str]
    tokens: list[int] | None = None
    """Each shard's token count (from the manifest), or None when unknown (globs, URLs)."""
    vocab_size: int | None = None
    tokenizer_sha256: str | None = None
    manifest: str | None = None
    checksums: dict[str, str] | None = None
    """url -> the CRC-32 of the whole shard file, where the manifest records one."""
    eos_id: int | None = None
    """The token that ends each document (the manifest's)."""


def find_shards(path: str, split: str = "train") -> ShardSet:
    """Resolve `data.path`: a directory with a manifest, a glob, a brace pattern or URL(s)."""
    local = Path(path)
    if local.is_dir():
        manifest_path = local / MANIFEST
        if not manifest_path.is_file():
            raise DataError(
                f"data.path={path} is a directory without {MANIFEST}: write shards with "
                "tools/prepare_data.py, or point data.path at the .tar files (a glob)"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
            if split != "train" and not manifest.get(split):
                raise DataError(
                    f"{manifest_path} lists no {split} shards: re-run tools/prepare_data.py "
                    f"with --val-fraction > 0, or set trainer.eval_every_steps=0"
                )
            shards = manifest[split]
            urls = [_inside(local, s["name"], manifest_path) for s in shards]
            tokens = [int(s["tokens"]) for s in shards]
            vocab = int(manifest["vocab_size"])
            sums = {u: str(s["crc32"]) for u, s in zip(urls, shards, strict=True) if "crc32" in s}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{manifest_path} is unreadable or incomplete ({e}): re-run "
                            "tools/prepare_data.py") from e  # fmt: skip
        return ShardSet(urls, tokens, vocab, manifest.get("tokenizer_sha256"), str(manifest_path),
                        sums, manifest.get("eos_id"))  # fmt: skip
    if split != "train":  # a glob or URL list has no splits: never evaluate on training data
        raise DataError(
            f"data.path={path} has no {split} split (only a directory with {MANIFEST} has "
            "one): point data.path at a tools/prepare_data.py output directory, or set "
            "trainer.eval_every_steps=0"
        )
    if "://" in path or path.startswith("pipe:"):
        import braceexpand

        return ShardSet(list(braceexpand.braceexpand(path)))
    import braceexpand

    urls = sorted({f for pattern in braceexpand.braceexpand(path) for f in glob.glob(pattern)})
    if not urls:
        raise DataError(f"data.path={path} matches no shard files: check the path or pattern")
    return ShardSet(urls)


def _inside(directory: Path, name: object, manifest: Path) -> str:
    """The path of shard `name` of a manifest, which must be a file name inside `directory`:
    a manifest must not make the loader open files elsewhere (`../x.tar`, `/etc/passwd`)."""
    if (
        not isinstance(name, str)
        or not name
        or Path(name).is_absolute()
        or ".." in Path(name).parts
    ):
        raise DataError(
            f"{manifest} names shard {name!r}, which is not inside {directory}: a manifest "
            "lists shards by their names in its own directory. Re-run tools/prepare_data.py, "
            "or point data.path at the shards you mean (a glob or URLs)"
        )
    return str(directory / name)


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _open(url: str) -> io.BufferedIOBase:
    if _is_remote(url):
        import webdataset as wds

        return wds.gopen(url, "rb")
    try:
        return open(url, "rb")
    except OSError as e:
        raise DataError(f"shard {url} cannot be opened ({e.strerror}): is the path right?") from e


_GAP = 1 << 16
"""Bytes a seek may pass over that the checksum still reads (tar padding, small members)."""


class _Hashing(io.RawIOBase):
    """A read-only stream that computes the CRC-32 of the bytes read through it, in order;
    `crc()` is None once a seek has jumped over bytes that were never read."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self.raw, self.pos, self.hashed, self._crc = raw, 0, 0, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.raw.seekable()

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = self.raw.seek(offset, whence)
        return self.pos

    def read(self, size: int = -1) -> bytes:
        if self.hashed is not None and 0 < self.pos - self.hashed <= _GAP and self.seekable():
            self.raw.seek(self.hashed)  # tar padding a seek passed over: hash it too
            self._crc = zlib.crc32(self.raw.read(self.pos - self.hashed), self._crc)
            self.hashed = self.raw.tell()
        data = self.raw.read(size)
        if self.hashed is not None:
            if self.pos > self.hashed:
                self.hashed = None  # a gap: the whole-file checksum cannot be had
            elif self.pos + len(data) > self.hashed:
                self._crc = zlib.crc32(data[self.hashed - self.pos :], self._crc)
                self.hashed = self.pos + len(data)
        self.pos += len(data)
        return data

    def crc(self) -> str | None:
        """The whole file's CRC-32 after reading what is left; None after a gap."""
        while self.hashed is not None and self.read(1 << 20):
            pass
        return None if self.hashed is None else f"{self._crc:08x}"

    def close(self) -> None:
        self.raw.close()
        super().close()


def read_members(
    url: str, start: int = 0, stop: int | None = None, crc32: str | None = None
) -> Iterator[np.ndarray]:
    """Tokens [start, stop) of one shard (stop None: to its end), a member at a time.

    Members wholly before `start` are passed over by their tar headers: a local file seeks
    past them, a stream reads through them. When `stop` is given the shard must reach it.
    Every member read is checked against its `.crc32` member, where the shard has them; a
    read of the whole shard also against `crc32`, the manifest's checksum of the file.
    """
    raw = _open(url)
    hashing = crc32 is not None and start == 0  # only a whole-shard read can check the file
    stream = _Hashing(raw) if hashing else raw
    at = 0  # shard token offset of the next member
    sums: dict[str, str] = {}
    try:
        # "r:" seeks over the data of the members it passes; "r|" reads a stream through.
        mode = "r|" if _is_remote(url) else "r:"
        with tarfile.open(fileobj=stream, mode=mode) as tar:
            for info in tar:
                key, _, suffix = info.name.rpartition(".")
                if info.isfile() and suffix == "crc32" and info.size <= 16:
                    sums[key] = tar.extractfile(info).read().decode("ascii", "replace").strip()
                    continue
                if not info.isfile() or suffix not in DTYPES:
                    continue
                itemsize = DTYPES[suffix].itemsize
                n = info.size // itemsize
                if stop is not None and at >= stop:
                    break
                if at + n <= start:
                    at += n
                    continue
                data = tar.extractfile(info).read()
                if len(data) != info.size or len(data) % itemsize:
                    raise tarfile.ReadError(f"member {info.name} is truncated")
                expected = sums.pop(key, None)
                if expected is not None and f"{zlib.crc32(data):08x}" != expected:
                    raise tarfile.ReadError(f"member {info.name} fails its checksum")
                tokens = np.frombuffer(data, dtype=DTYPES[suffix])
                yield tokens[max(start - at, 0) : None if stop is None else stop - at]
                at += n
        if stop is not None and at < stop:
            raise tarfile.ReadError(f"it ends at token {at:,}, the manifest says {stop:,} or more")
        whole = start == 0 and (stop is None or stop == at)
        if hashing and whole and stream.crc() not in (None, crc32):
            raise tarfile.ReadError(f"the file fails the manifest's checksum (crc32 {crc32})")
    except tarfile.TarError as e:
        raise CorruptShard(f"shard {url} is corrupt or truncated ({e}): re-create it with "
                           "tools/prepare_data.py, or set data.on_corrupt=skip") from e  # fmt: skip
    except OSError as e:  # an I/O error, or a pipe: command that failed
        raise CorruptShard(f"shard {url} could not be read ({e}): check the file system or "
                           "the URL, or set data.on_corrupt=skip") from e  # fmt: skip
    finally:
        stream.close()


# ---------------------------------------------------------------------------------------------
# Dealing an epoch out to the readers


@dataclass(frozen=True)
class Piece:
    """Tokens [start, stop) of one shard (stop None: to its end, length unknown)."""

    url: str
    start: int = 0
    stop: int | None = None

    def to_list(self) -> list[Any]:
        return [self.url, self.start, self.stop]

    @classmethod
    def from_saved(cls, saved: list[Any]) -> Piece:
        """A piece as state_dict() keeps it: [url, start, stop]."""
        return cls(*saved)

    def head(self, n: int) -> Piece:
        """Its first n tokens (the whole piece when its length is unknown)."""
        return self if self.stop is None else Piece(self.url, self.start, self.start + n)


Shard = tuple[str, "int | None"]
"""(url, token count or None when unknown)."""


def _free_spans(
    url: str, n: int | None, done: Sequence[Piece]
) -> list[tuple[str, int, int | None]]:
    """The parts of shard `url` (n tokens) that no piece in `done` covers."""
    if n is None:  # unknown length: whole or nothing
        return [] if done else [(url, 0, None)]
    spans, at = [], 0
    for a, b in sorted((p.start, n if p.stop is None else p.stop) for p in done):
        if a > at:
            spans.append((url, at, a))
        at = max(at, b)
    return spans + ([(url, at, n)] if at < n else [])


def _share(total: int, reader: int, readers: int) -> tuple[int, int]:
    """Reader `reader`'s [lo, hi) of `total` units cut into `readers` equal ranges."""
    return total * reader // readers, total * (reader + 1) // readers


def deal(
    shards: Sequence[Shard], seed: int, source: int, epoch: int, reader: int, readers: int,
    done: frozenset[Piece] = frozenset(),
) -> list[Piece]:  # fmt: skip
    """Global reader `reader`'s share (of `readers`) of a source in `epoch`.

    The shards are permuted by (seed, source, epoch) and what `done` does not cover is cut
    into `readers` contiguous ranges of equal token count; shards of unknown length count
    as one unit each and are dealt whole.
    """
    order = np.random.default_rng([seed, source, epoch]).permutation(len(shards))
    by_url: dict[str, list[Piece]] = {}
    for piece in done:
        by_url.setdefault(piece.url, []).append(piece)
    spans = [span for i in order for span in _free_spans(*shards[i], by_url.get(shards[i][0], []))]
    if any(stop is None for _, _, stop in spans):
        return [Piece(*span) for span in spans[slice(*_share(len(spans), reader, readers))]]
    lo, hi = _share(sum(b - a for _, a, b in spans), reader, readers)
    pieces, at = [], 0
    for url, a, b in spans:
        first, last = max(lo, at), min(hi, at + b - a)
        if first < last:
            pieces.append(Piece(url, a + first - at, a + last - at))
        at += b - a
    return pieces


# ---------------------------------------------------------------------------------------------
# One reader's stream


@dataclass(frozen=True)
class Position:
    """Where a reader is in one source: the block of windows it is in (epoch, index into its
    list of pieces, token offset in that piece where the block starts) and how many of the
    block's windows were emitted. (The field keeps its saved name, `shard`.)"""

    epoch: int = 0
    shard: int = 0
    offset: int = 0
    emitted: int = 0


@dataclass(frozen=True)
class ReaderState:
    """A reader's whole state: its position in every source, and rows emitted so far (which
    fixes the next source choice when several sources are mixed)."""

    sources: tuple[Position, ...]
    rows: int = 0
    skipped_shards: int = 0
    """Corrupt shards this reader skipped (data.on_corrupt=skip), over the whole run."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": [vars(p) for p in self.sources],
            "rows": self.rows,
            "skipped_shards": self.skipped_shards,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReaderState:
        sources = tuple(Position(**p) for p in d["sources"])
        return cls(sources, int(d["rows"]), int(d.get("skipped_shards", 0)))


class ShardStream(IterableDataset):
    """Yields chunks of micro-batches with each reader's state after every micro-batch.

    Windows are shuffled within blocks of `shuffle_windows` consecutive windows, by a
    permutation that depends only on (seed, source, epoch, reader, block start): batches mix
    many documents, yet a restored reader rebuilds the same block and skips what it had
    emitted, so no shuffle buffer's content is lost on restart. With several sources, each
    row's source is drawn with the given weights by an RNG keyed on the row's index.
    """

    def __init__(
        self,
        sources: list[list[Shard]],
        weights: list[float],
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        readers_per_rank: int,
        vocab_size: int,
        epochs: int | None = None,
        on_corrupt: str = "error",
        shuffle_windows: int = 512,
        checksums: Mapping[str, str] | None = None,
    ) -> None:
        """`checksums`: shard url -> the CRC-32 of its file (the manifests' records)."""
        self.sources, self.seq_len, self.micro = sources, seq_len, micro_batch_size
        self.checksums = dict(checksums or {})
        total = float(sum(weights))
        self.weights = np.asarray([w / total for w in weights])
        self.seed, self.rank, self.world, self.readers = seed, rank, world_size, readers_per_rank
        self.vocab_size, self.epochs, self.on_corrupt = vocab_size, epochs, on_corrupt
        self.shuffle_windows = max(shuffle_windows, 1)
        self.start: dict[int, ReaderState] = {}
        self.skipped_shards = 0
        self.rotation = 0  # physical worker w plays reader (w + rotation) % readers
        self.chunk = 1  # micro-batches per transfer from a worker (IPC cost is per transfer)
        self.first_chunk = 0  # after a restore: what was left of the interrupted chunk
        self.done: dict[tuple[int, int], frozenset[Piece]] = {}
        """(source, epoch) -> pieces read before a resume on another number of ranks; the
        new layout deals out only the rest of that epoch."""

    def initial_state(self) -> ReaderState:
        return ReaderState(tuple(Position() for _ in self.sources))

    def reader_pieces(self, reader: int, epoch: int, source: int = 0) -> list[Piece]:
        """What reader `reader` of this rank reads of `source` in `epoch`."""
        return deal(self.sources[source], self.seed, source, epoch,
                    self.rank * self.readers + reader, self.world * self.readers,
                    self.done.get((source, epoch), frozenset()))  # fmt: skip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, list[ReaderState]]]:
        """Chunks of micro-batches: (K, B, T + 1), reader id, the state after each one."""
        info = get_worker_info()
        physical = info.id if info is not None else 0
        reader = (physical + self.rotation) % self.readers
        state = self.start.get(reader, self.initial_state())
        self.skipped_shards = state.skipped_shards  # this process's copy counts on from there
        batches = self._batches(reader, state)
        size = self.first_chunk if physical == 0 and self.first_chunk else self.chunk
        while items := list(itertools.islice(batches, size)):
            yield torch.stack([b for b, _ in items]), reader, [p for _, p in items]
            size = self.chunk

    def _batches(
        self, reader: int, state: ReaderState
    ) -> Iterator[tuple[torch.Tensor, ReaderState]]:
        streams = [
            self._shuffled_rows(reader, s, pos) for s, pos in enumerate(state.sources)
        ]  # fmt: skip
        positions, n = list(state.sources), state.rows
        rows: list[np.ndarray] = []
        while True:
            source = self._source_of_row(reader, n)
            try:
                row, positions[source] = next(streams[source])
            except StopIteration:  # finite epochs: a source ran out; the partial batch is dropped
                return
            n += 1
            rows.append(row)
            if len(rows) == self.micro:
                after = ReaderState(tuple(positions), n, self.skipped_shards)
                yield torch.from_numpy(np.stack(rows)), after
                rows = []

    def _source_of_row(self, reader: int, n: int, block: int = 4096) -> int:
        if len(self.sources) == 1:
            return 0
        cached = self.__dict__.get("_choices")
        if cached is None or cached[0] != (reader, n // block):
            key = [self.seed, 0xC401CE, self.rank * self.readers + reader, n // block]
            picks = np.random.default_rng(key).choice(len(self.sources), block, p=self.weights)
            cached = self.__dict__["_choices"] = ((reader, n // block), picks)
        return int(cached[1][n % block])

    def _shuffled_rows(
        self, reader: int, source: int, pos: Position
    ) -> Iterator[tuple[np.ndarray, Position]]:
        """One source's windows for one reader, block-shuffled, each with the position after it."""
        global_reader = self.rank * self.readers + reader
        epoch, block_start, skip = pos.epoch, (pos.shard, pos.offset), pos.emitted
        while self.epochs is None or epoch < self.epochs:
            pieces = self.reader_pieces(reader, epoch, source)
            whole = block_start == (0, 0) and not skip and (source, epoch) not in self.done
            windows = self._windows(pieces, *block_start)
            if whole:  # a whole pass that yields nothing would loop over epochs forever
                windows = self._nonempty(windows, pieces, epoch)
            while block := list(itertools.islice(windows, self.shuffle_windows)):
                next_start = block[-1][1]
                key = [self.seed, source, epoch, global_reader, *block_start]
                order = np.random.default_rng(key).permutation(len(block))
                for emitted in range(skip + 1, len(block) + 1):
                    if emitted < len(block):
                        after = Position(epoch, *block_start, emitted)
                    else:
                        after = Position(epoch, *next_start, 0)
                    yield block[order[emitted - 1]][0], after
                skip, block_start = 0, next_start
            epoch, block_start = epoch + 1, (0, 0)

    def _nonempty(
        self, windows: Iterator[tuple[np.ndarray, tuple[int, int]]], pieces: list[Piece],
        epoch: int,
    ) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:  # fmt: skip
        """`windows`, or a DataError naming the pieces when a whole epoch of them yields none."""
        first = next(windows, None)
        if first is None:
            names = ", ".join(str(p.url) for p in pieces[:3]) + (", ..." if len(pieces) > 3 else "")
            skipped = " (data.on_corrupt=skip skipped them)" if self.skipped_shards else ""
            raise DataError(
                f"a data reader read its whole share of epoch {epoch} without one window of "
                f"seq_len + 1 = {self.seq_len + 1} tokens, from {names}: the shards are empty "
                f"or corrupt{skipped}. Check them, or re-create them with tools/prepare_data.py"
            )
        yield first
        yield from windows

    def _windows(
        self, pieces: list[Piece], piece_i: int, offset: int
    ) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
        """Windows of seq_len + 1 tokens every seq_len tokens, from (piece_i, offset) on,
        each with the (piece, offset) where the next window starts."""
        window, stride = self.seq_len + 1, self.seq_len
        buf = np.empty(0, dtype=np.int64)
        at = (piece_i, offset)  # where buf[0] sits in this reader's stream
        for i in range(piece_i, len(pieces)):
            for tokens in self._piece_tokens(pieces[i], offset if i == piece_i else 0):
                buf = np.concatenate([buf, tokens.astype(np.int64)])
                while len(buf) >= window:
                    row, buf = buf[:window], buf[stride:]
                    at = self._advance(pieces, *at, stride, i)
                    yield row, at

    def _advance(
        self, pieces: list[Piece], piece: int, offset: int, n: int, current: int
    ) -> tuple[int, int]:
        """Move a stream position n tokens on, across the (fully read) pieces before `current`."""
        offset += n
        while piece < current and offset >= self.piece_length(pieces[piece]):
            offset -= self.piece_length(pieces[piece])
            piece += 1
        return piece, offset

    def _read_lengths(self) -> dict[Piece, int]:
        """Lengths learnt by reading: pieces of unknown length, and pieces a skipped
        corruption cut short (data.on_corrupt=skip)."""
        return self.__dict__.setdefault("_lengths", {})

    def piece_length(self, piece: Piece) -> int:
        lengths = self._read_lengths()
        if piece in lengths:
            return lengths[piece]
        if piece.stop is not None:
            return piece.stop - piece.start
        lengths[piece] = sum(len(t) for t in read_members(piece.url))
        return lengths[piece]

    def _piece_tokens(self, piece: Piece, skip: int) -> Iterator[np.ndarray]:
        """The piece's tokens from offset `skip`, checked against the vocabulary."""
        read = skip
        try:
            crc = self.checksums.get(piece.url)
            for tokens in read_members(piece.url, piece.start + skip, piece.stop, crc):
                read += len(tokens)
                if tokens.size and int(tokens.max()) >= self.vocab_size:
                    raise CorruptShard(
                        f"shard {piece.url} holds token id {int(tokens.max())} >= "
                        f"model.vocab_size={self.vocab_size}. Either the shard is corrupt "
                        "(re-create it with tools/prepare_data.py, or set data.on_corrupt=skip) "
                        "or it was made with another, larger tokenizer (re-tokenize with the "
                        "model's tokenizer, or raise model.vocab_size for a new run)"
                    )
                yield tokens
        except CorruptShard as e:
            if self.on_corrupt != "skip":
                raise
            log.warning("skipping the rest of shard %s (data.on_corrupt=skip): %s", piece.url, e)
            self.skipped_shards += 1
        if piece.stop is None or read < piece.stop - piece.start:  # a skipped corruption
            self._read_lengths()[piece] = read


DEALING = "token-ranges/1"
"""How an epoch is dealt to readers (`deal`); positions saved under another way mean other
tokens, so they are refused rather than silently read as these."""


def _check_dealing(state: Mapping[str, Any]) -> None:
    if state.get("dealing") != DEALING:
        raise DataError(
            "the checkpoint's data position was saved by a loader that dealt whole shards to "
            "readers (an older pretrain); this one deals token ranges, so that position means "
            "other data. Resume it with the version that wrote it, or start a new run_dir from "
            "its weights (tools/export_hf.py, then model.init_from=...)"
        )


def _saved_done(state: Mapping[str, Any]) -> Iterator[tuple[tuple[int, int], frozenset[Piece]]]:
    for source, epoch, pieces in state.get("done", []):
        yield (int(source), int(epoch)), frozenset(Piece.from_saved(p) for p in pieces)


def _no_op(signum: int, frame: object) -> None:
    del signum, frame


def _worker_init(worker_id: int) -> None:
    """DataLoader workers ignore the stop signals and die with their training process.

    Launchers signal every process of a job (Slurm a whole job step, a terminal's Ctrl-C its
    foreground group): the training process acts on the stop and shuts its workers down
    itself, while a worker killed by the signal would crash the run before it could save.
    And however the training process ends (the hang watchdog's exit, SIGKILL), the kernel
    then kills its workers (Linux's PR_SET_PDEATHSIG), which could otherwise sit blocked in
    a read for ever."""
    del worker_id
    signal.set_wakeup_fd(-1)  # the training process's watchdog pipe, inherited by the fork
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        # A handler that does nothing, not SIG_IGN: an ignored signal stays ignored across
        # exec, so a `pipe:` command the worker starts could not be stopped by it.
        signal.signal(signum, _no_op)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers end at their next check
        pass


class TokenLoader:
    """This rank's micro-batches, with `state_dict()` / `load_state_dict()` for exact resume:
    the `DataSource` (data/source.py) of data=shards and data=demo.

    Workers send `chunk_batches` micro-batches per transfer, since each transfer between
    processes costs about as much as reading one. The DataLoader takes chunks from the
    workers in turn; if a run stops mid-chunk, the restored reader first sends the rest of
    that chunk, so the order of micro-batches is the same as without the stop.
    """

    def __init__(
        self,
        dataset: ShardStream,
        num_workers: int,
        pin_memory: bool,
        prefetch_factor: int = 4,
        chunk_batches: int = 8,
        tokenizer: str | None = None,
    ) -> None:
        self.dataset, self.num_workers = dataset, num_workers
        self.tokenizer = tokenizer
        """The tokenizer file (or `bytes`) the shards were made with, when known: checkpoints
        carry a copy, so an exported model comes with its tokenizer."""
        self.tokenizer_sha256: str | None = None
        """The fingerprint of the tokenizer the shards were made with (their manifests', or
        data.tokenizer's; None when neither says): checkpoints keep it, and a resume on data
        of another tokenizer is refused."""
        self.allow_tokenizer_change = False
        """data.allow_tokenizer_change: resume on data of another tokenizer (warned about)."""
        self.eos_id: int | None = None
        """The token that ends each document: the manifests' (when they agree) or
        data.tokenizer's; None when unknown."""
        self.chat_template: str | None = None  # text, not conversations
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.dataset.chunk = chunk_batches if num_workers > 0 else 1
        self.positions: dict[int, ReaderState] = {}
        self.next_reader = 0
        self.chunk_left = 0
        self._pending: list[tuple[torch.Tensor, int, ReaderState, int]] = []
        self._it: Iterator[Any] | None = None

    def _iterator(self) -> Iterator[Any]:
        self.dataset.start = dict(self.positions)
        self.dataset.rotation = self.next_reader
        self.dataset.first_chunk = self.chunk_left
        if self.num_workers == 0:
            return iter(self.dataset)
        return iter(
            DataLoader(
                self.dataset,
                batch_size=None,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor,
                persistent_workers=False,
                worker_init_fn=_worker_init,
            )
        )

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if not self._pending:
            if self._it is None:
                self._it = self._iterator()
            chunk, reader, positions = next(self._it)
            n = len(positions)
            self._pending = [(chunk[i], int(reader), positions[i], n - 1 - i) for i in range(n)]
        batch, reader, position, left = self._pending.pop(0)
        self.positions[reader] = position
        self.chunk_left = left
        self.next_reader = reader if left else (reader + 1) % self.dataset.readers
        return batch

    def metrics(self) -> dict[str, float]:
        """Data-side numbers for the step's metrics record."""
        return {"data_skipped_shards": sum(s.skipped_shards for s in self.positions.values())}

    def state_dict(self) -> dict[str, Any]:
        return {
            "dealing": DEALING,
            "readers": self.dataset.readers,
            "chunk_batches": self.dataset.chunk,
            "next_reader": self.next_reader,
            "chunk_left": self.chunk_left,
            "positions": {r: p.to_dict() for r, p in self.positions.items()},
            "done": [
                [s, e, [p.to_list() for p in sorted(pieces, key=str)]]
                for (s, e), pieces in self.dataset.done.items()
            ],
        }

    def load_resharded_state(self, states: list[dict[str, Any]], step: int) -> None:
        """Continue from the states of every rank of a run with another number of ranks (or
        readers per rank), at shard granularity.

        Per source, the new readers restart the earliest epoch any old reader was in, with
        the shards that any old reader had begun in that epoch set aside: no window is read
        twice within the epoch. The unread rest of the shards under each old reader's current
        shuffle block is skipped (data.shuffle_windows x seq_len tokens span a shard or two),
        and what old readers had already read of the next epoch is read again then.
        """
        del step  # positions say more than the step count
        for state in states:
            _check_dealing(state)
        ds = self.dataset
        old_readers = [(r, k) for r, st in enumerate(states) for k in range(int(st["readers"]))]
        total = len(old_readers)
        done_before = {key: pieces for st in states[:1] for key, pieces in _saved_done(st)}
        starts = []
        for source, shards in enumerate(ds.sources):
            positions = []
            for g, (r, k) in enumerate(old_readers):
                saved = states[r]["positions"].get(k, states[r]["positions"].get(str(k)))
                pos = ReaderState.from_dict(saved).sources[source] if saved else Position()
                positions.append((g, pos))
            epoch = min(p.epoch for _, p in positions)
            before = done_before.get((source, epoch), frozenset())
            done = set(before)
            for g, pos in positions:
                if pos.epoch < epoch:
                    continue
                mine = deal(shards, ds.seed, source, epoch, g, total, before)
                done.update(mine if pos.epoch > epoch else self._begun(mine, pos))
            ds.done[(source, epoch)] = frozenset(done)
            starts.append(Position(epoch=epoch))
        fresh = ReaderState(tuple(starts))
        self.positions = dict.fromkeys(range(ds.readers), fresh)
        self.next_reader, self.chunk_left = 0, 0
        self._pending, self._it = [], None

    def _begun(self, pieces: list[Piece], pos: Position) -> list[Piece]:
        """What of a reader's `pieces` it had begun at `pos`: all before its current shuffle
        block, and, once the block has emitted a window, all that the block spans
        (shuffle_windows x seq_len + 1 tokens from its start), to the token where lengths
        are known."""
        ds = self.dataset
        span = ds.shuffle_windows * ds.seq_len + 1 if pos.emitted else 0
        begun, left, i = list(pieces[: pos.shard]), pos.offset + span, pos.shard
        while i < len(pieces) and left > 0:
            length = ds.piece_length(pieces[i])
            begun.append(pieces[i] if left >= length else pieces[i].head(left))
            left -= length
            i += 1
        return begun

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_dealing(state)
        saved = (state["readers"], state["chunk_batches"])
        if saved != (self.dataset.readers, self.dataset.chunk):
            raise DataError(
                f"the checkpoint's data loader ran {state['readers']} reader(s) per rank sending "
                f"{state['chunk_batches']} micro-batch(es) per transfer, this run "
                f"{self.dataset.readers} and {self.dataset.chunk}: set data.num_workers and "
                "data.chunk_batches as in the saved run to resume exactly"
            )
        self.positions = {int(r): ReaderState.from_dict(p) for r, p in state["positions"].items()}
        self.dataset.done = dict(_saved_done(state))
        self.next_reader = int(state["next_reader"])
        self.chunk_left = int(state["chunk_left"])
        self._pending, self._it = [], None


def build_loader(
    path: str | None,
    vocab_size: int,
    seq_len: int,
    micro_batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    split: str = "train",
    num_workers: int = 2,
    prefetch_factor: int = 4,
    epochs: int | None = None,
    on_corrupt: str = "error",
    shuffle_windows: int = 512,
    chunk_batches: int = 8,
    sources: Sequence[Mapping[str, Any]] = (),
    tokenizer: str | None = None,
    pin_memory: bool | None = None,
    allow_tokenizer_change: bool = False,
) -> TokenLoader:
    """data=shards: check each shard set against the model and the world, then stream them.

    Either `path` (one source) or `sources` ([{path, weight}, ...], mixed by weight). With
    `tokenizer`, every manifest must name that tokenizer (by its SHA-256).
    """
    if on_corrupt not in ("error", "skip"):
        raise DataError(f"data.on_corrupt={on_corrupt!r}: choose error or skip")
    if bool(path) == bool(sources):
        raise DataError("set exactly one of data.path and data.sources=[{path: ..., weight: ...}]")
    specs = [(str(s["path"]), float(s.get("weight", 1.0))) for s in sources] or [(path, 1.0)]
    readers = max(num_workers, 1)
    expected_tokenizer = fingerprint(load_tokenizer(tokenizer)) if tokenizer is not None else ""
    sets: list[list[Shard]] = []
    fingerprints: dict[str, str] = {}  # tokenizer sha256 -> a source made with it
    checksums: dict[str, str] = {}
    eos: set[int | None] = set()
    for src, weight in specs:
        if weight <= 0:
            raise DataError(f"data.sources: {src} has weight {weight}; weights must be > 0")
        shard_set = find_shards(src, split)
        if shard_set.vocab_size is not None:
            check_fits(shard_set.vocab_size, vocab_size, f"data.path={src} ({shard_set.manifest})")
        if tokenizer is not None and shard_set.tokenizer_sha256 != expected_tokenizer:
            raise DataError(
                f"{shard_set.manifest or src} was tokenized with tokenizer sha256 "
                f"{str(shard_set.tokenizer_sha256)[:12]}, not data.tokenizer={tokenizer} "
                f"({expected_tokenizer[:12]}): re-run tools/prepare_data.py with that tokenizer"
            )
        if shard_set.tokenizer_sha256:
            fingerprints.setdefault(shard_set.tokenizer_sha256, src)
        _check_enough(shard_set, src, split, world_size * readers, seq_len, world_size)
        missing = [u for u in shard_set.urls if not _is_remote(u) and not Path(u).is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} shard(s) of data.path={src} are missing or not files, first "
                f"{missing[0]}: restore them or re-run tools/prepare_data.py"
            )
        tokens = shard_set.tokens or [None] * len(shard_set.urls)
        sets.append(list(zip(shard_set.urls, tokens, strict=True)))
        checksums.update(shard_set.checksums or {})
        eos.add(shard_set.eos_id)
    dataset = ShardStream(
        sets, [w for _, w in specs], seq_len, micro_batch_size, seed, rank, world_size, readers,
        vocab_size, epochs, on_corrupt, shuffle_windows, checksums,
    )  # fmt: skip
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if len(fingerprints) > 1 and not allow_tokenizer_change:
        raise DataError(
            f"data.sources were tokenized by {len(fingerprints)} different tokenizers "
            f"({', '.join(f'{v}: {k[:12]}' for k, v in fingerprints.items())}): the same token "
            "id would mean different text. Re-tokenize them with one tokenizer, or set "
            "data.allow_tokenizer_change=true if that is meant"
        )
    loader = TokenLoader(
        dataset, num_workers, pin_memory, prefetch_factor, chunk_batches, tokenizer
    )
    one = next(iter(fingerprints)) if len(fingerprints) == 1 else None
    loader.tokenizer_sha256 = one or expected_tokenizer or None  # a glob: data.tokenizer's
    loader.allow_tokenizer_change = allow_tokenizer_change
    if tokenizer is not None:
        loader.eos_id = eos_id(load_tokenizer(tokenizer))
    elif len(eos) == 1:  # every manifest says the same (a glob's shards: unknown)
        loader.eos_id = eos.pop()
    return loader


def shards_source(ctx: DataContext, split: str = "train", **fields: Any) -> TokenLoader:
    """data=shards: `build_loader` for `ctx`. `split` (data.split) is what training reads;
    a context for evaluation (ctx.split=val) reads the val split."""
    return build_loader(
        vocab_size=ctx.vocab_size, seq_len=ctx.seq_len, micro_batch_size=ctx.micro_batch_size,
        seed=ctx.seed, rank=ctx.data_rank, world_size=ctx.data_size,
        split=split if ctx.split == "train" else ctx.split, **fields,
    )  # fmt: skip


def _check_enough(
    shard_set: ShardSet, src: str, split: str, readers: int, seq_len: int, world_size: int
) -> None:
    """Every reader (ranks x workers) must get at least one window of every epoch: a token
    range of seq_len + 1 tokens, or, for shards of unknown length, a shard of its own."""
    fewer = ("Lower data.num_workers (0 reads in the training process)" if readers > world_size
             else "Use fewer ranks")  # fmt: skip
    fix = f"{world_size} rank(s) x {readers // world_size} reader(s) = {readers}. {fewer}"
    if shard_set.tokens is None:
        if len(shard_set.urls) < readers:
            raise DataError(
                f"data.path={src} has {len(shard_set.urls)} {split} shard(s) of unknown length "
                f"for {fix}, or point data.path at the tools/prepare_data.py directory itself: "
                f"its {MANIFEST} records each shard's tokens, so shards can be split among "
                "readers"
            )
        return
    total = sum(shard_set.tokens)
    if total // readers < seq_len + 1:
        raise DataError(
            f"data.path={src} holds {total:,} {split} tokens: {total // readers:,} for each of "
            f"{fix}, or trainer.seq_len={seq_len}, or use more data: each reader needs at "
            f"least one window of seq_len + 1 = {seq_len + 1} tokens"
        )
