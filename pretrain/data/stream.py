"""Stream token shards into packed (B, seq_len + 1) batches, and resume exactly.

Each rank runs W DataLoader workers (W = data.num_workers, or 1 in-process reader when 0).
Every epoch the shard list is shuffled by (seed, epoch) and dealt out to the world's
`world_size * W` readers: reader g reads shards order[g], order[g + R], ... So no token is
read twice, and the split never depends on timing.

A reader concatenates its shards' token streams and cuts windows of seq_len + 1 tokens
every seq_len tokens (the last token of one window is the first of the next, so every token
is a target exactly once, as in Megatron-LM). Windows are shuffled within bounded blocks (see
ShardStream). A reader's whole position is (epoch, shard index and token offset where its
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
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.shards import MANIFEST
from pretrain.data.tokenizer import check_fits, fingerprint
from pretrain.data.tokenizer import load as load_tokenizer

log = logging.getLogger("pretrain")

DTYPES = {"u16": np.dtype("<u2"), "u32": np.dtype("<u4")}


class DataError(ValueError):
    """Bad data: the message names the shard or manifest at fault and what to do."""


# ---------------------------------------------------------------------------------------------
# Finding shards


@dataclass(frozen=True)
class ShardSet:
    """The shard URLs of one split, and what the manifest says about them (if any)."""

    urls: list[str]
    vocab_size: int | None = None
    tokenizer_sha256: str | None = None
    manifest: str | None = None


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
            urls = [str(local / s["name"]) for s in shards]
            vocab = int(manifest["vocab_size"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{manifest_path} is unreadable or incomplete ({e}): re-run "
                            "tools/prepare_data.py") from e  # fmt: skip
        return ShardSet(urls, vocab, manifest.get("tokenizer_sha256"), str(manifest_path))
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


def _open(url: str) -> io.BufferedIOBase:
    if "://" in url or url.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(url, "rb")
    try:
        return open(url, "rb")
    except OSError as e:
        raise DataError(f"shard {url} cannot be opened ({e.strerror}): is the path right?") from e


def read_members(url: str) -> Iterator[np.ndarray]:
    """The token arrays of one shard, member by member, in tar order."""
    stream = _open(url)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                suffix = info.name.rsplit(".", 1)[-1]
                if not info.isfile() or suffix not in DTYPES:
                    continue
                data = tar.extractfile(info).read()
                if len(data) != info.size or len(data) % DTYPES[suffix].itemsize:
                    raise tarfile.ReadError(f"member {info.name} is truncated")
                yield np.frombuffer(data, dtype=DTYPES[suffix])
    except tarfile.TarError as e:
        raise DataError(f"shard {url} is corrupt or truncated ({e}): re-create it with "
                        "tools/prepare_data.py, or set data.on_corrupt=skip") from e  # fmt: skip
    finally:
        stream.close()


# ---------------------------------------------------------------------------------------------
# One reader's stream


@dataclass(frozen=True)
class Position:
    """Where a reader is in one source: the block of windows it is in (epoch, shard index into
    its list, token offset where the block starts) and how many of its windows were emitted."""

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


def deal_shards(
    urls: list[str], seed: int, source: int, epoch: int, reader: int, readers: int,
    done: frozenset[str] = frozenset(),
) -> list[str]:  # fmt: skip
    """Global reader `reader`'s share (of `readers`) of a source's shards in `epoch`: a
    permutation keyed on (seed, source, epoch), dealt out round-robin, minus `done`."""
    order = np.random.default_rng([seed, source, epoch]).permutation(len(urls))
    return [u for u in (urls[i] for i in order) if u not in done][reader::readers]


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
        sources: list[list[str]],
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
    ) -> None:
        self.sources, self.seq_len, self.micro = sources, seq_len, micro_batch_size
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
        self.done: dict[tuple[int, int], frozenset[str]] = {}
        """(source, epoch) -> shards read before a resume on another number of ranks; the
        new layout deals out only the rest of that epoch."""

    def initial_state(self) -> ReaderState:
        return ReaderState(tuple(Position() for _ in self.sources))

    def reader_shards(self, reader: int, epoch: int, source: int = 0) -> list[str]:
        """The shards of `source` that reader `reader` of this rank reads in `epoch`."""
        return deal_shards(self.sources[source], self.seed, source, epoch,
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
            shards = self.reader_shards(reader, epoch, source)
            windows = self._windows(shards, *block_start)
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

    def _windows(
        self, shards: list[str], shard_i: int, offset: int
    ) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
        """Windows of seq_len + 1 tokens every seq_len tokens, from (shard_i, offset) on,
        each with the (shard, offset) where the next window starts."""
        window, stride = self.seq_len + 1, self.seq_len
        buf = np.empty(0, dtype=np.int64)
        at = (shard_i, offset)  # where buf[0] sits in this reader's stream
        for i in range(shard_i, len(shards)):
            for tokens in self._shard_tokens(shards[i], offset if i == shard_i else 0):
                buf = np.concatenate([buf, tokens.astype(np.int64)])
                while len(buf) >= window:
                    row, buf = buf[:window], buf[stride:]
                    at = self._advance(shards, *at, stride, i)
                    yield row, at

    def _advance(
        self, shards: list[str], shard: int, offset: int, n: int, current: int
    ) -> tuple[int, int]:
        """Move a stream position n tokens on, across the (fully read) shards before `current`."""
        offset += n
        while shard < current and offset >= self._shard_length(shards[shard]):
            offset -= self._shard_length(shards[shard])
            shard += 1
        return shard, offset

    def _shard_length(self, url: str) -> int:
        lengths = self.__dict__.setdefault("_lengths", {})
        if url not in lengths:
            lengths[url] = sum(len(t) for t in read_members(url))
        return lengths[url]

    def _shard_tokens(self, url: str, skip: int) -> Iterator[np.ndarray]:
        """The shard's tokens from offset `skip`, checked against the vocabulary."""
        lengths = self.__dict__.setdefault("_lengths", {})
        total = 0
        try:
            for tokens in read_members(url):
                total += len(tokens)
                if tokens.size and int(tokens.max()) >= self.vocab_size:
                    raise DataError(
                        f"shard {url} holds token id {int(tokens.max())} >= model.vocab_size="
                        f"{self.vocab_size}: the shards were made with a larger tokenizer; "
                        "raise model.vocab_size or re-tokenize"
                    )
                if skip >= len(tokens):
                    skip -= len(tokens)
                    continue
                yield tokens[skip:]
                skip = 0
        except DataError as e:
            if self.on_corrupt != "skip" or "corrupt" not in str(e):
                raise
            log.warning("skipping the rest of corrupt shard %s (data.on_corrupt=skip)", url)
            self.skipped_shards += 1
        lengths[url] = total


class TokenLoader:
    """This rank's micro-batches, with `state_dict()` / `load_state_dict()` for exact resume.

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
            "readers": self.dataset.readers,
            "chunk_batches": self.dataset.chunk,
            "next_reader": self.next_reader,
            "chunk_left": self.chunk_left,
            "positions": {r: p.to_dict() for r, p in self.positions.items()},
            "done": [[s, e, sorted(urls)] for (s, e), urls in self.dataset.done.items()],
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
        ds = self.dataset
        old_readers = [(r, k) for r, st in enumerate(states) for k in range(int(st["readers"]))]
        total = len(old_readers)
        done_before = {(int(s), int(e)): frozenset(urls) for st in states[:1]
                       for s, e, urls in st.get("done", [])}  # fmt: skip
        starts = []
        for source, urls in enumerate(ds.sources):
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
                mine = deal_shards(urls, ds.seed, source, epoch, g, total, before)
                done.update(mine if pos.epoch > epoch else mine[: self._begun(mine, pos)])
            ds.done[(source, epoch)] = frozenset(done)
            starts.append(Position(epoch=epoch))
        fresh = ReaderState(tuple(starts))
        self.positions = dict.fromkeys(range(ds.readers), fresh)
        self.next_reader, self.chunk_left = 0, 0
        self._pending, self._it = [], None

    def _begun(self, shards: list[str], pos: Position) -> int:
        """How many of a reader's `shards` it had begun at `pos`: those before the current
        shuffle block, and, once the block has emitted a window, all that the block spans."""
        if not pos.emitted:
            return pos.shard + (1 if pos.offset else 0)
        left = pos.offset + self.dataset.shuffle_windows * self.dataset.seq_len + 1
        i = pos.shard
        while i < len(shards) and left > 0:
            left -= self.dataset._shard_length(shards[i])
            i += 1
        return i

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (state["readers"], state["chunk_batches"])
        if saved != (self.dataset.readers, self.dataset.chunk):
            raise DataError(
                f"the checkpoint's data loader ran {state['readers']} reader(s) per rank sending "
                f"{state['chunk_batches']} micro-batch(es) per transfer, this run "
                f"{self.dataset.readers} and {self.dataset.chunk}: set data.num_workers and "
                "data.chunk_batches as in the saved run to resume exactly"
            )
        self.positions = {int(r): ReaderState.from_dict(p) for r, p in state["positions"].items()}
        self.dataset.done = {(int(s), int(e)): frozenset(u) for s, e, u in state.get("done", [])}
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
    grad_accum: int = 1,
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
) -> TokenLoader:
    """data=shards: check each shard set against the model and the world, then stream them.

    Either `path` (one source) or `sources` ([{path, weight}, ...], mixed by weight). With
    `tokenizer`, every manifest must name that tokenizer (by its SHA-256).
    `grad_accum` is part of the data interface; packing does not need it.
    """
    del grad_accum
    if on_corrupt not in ("error", "skip"):
        raise DataError(f"data.on_corrupt={on_corrupt!r}: choose error or skip")
    if bool(path) == bool(sources):
        raise DataError("set exactly one of data.path and data.sources=[{path: ..., weight: ...}]")
    specs = [(str(s["path"]), float(s.get("weight", 1.0))) for s in sources] or [(path, 1.0)]
    readers = max(num_workers, 1)
    expected_tokenizer = fingerprint(load_tokenizer(tokenizer)) if tokenizer is not None else ""
    urls: list[list[str]] = []
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
        if len(shard_set.urls) < world_size * readers:
            raise DataError(
                f"data.path={src} has {len(shard_set.urls)} {split} shard(s) for {world_size} "
                f"rank(s) x {readers} reader(s) = {world_size * readers}: every reader needs a "
                "shard of its own. Lower data.num_workers, or write more, smaller shards "
                "(prepare_data.py --shard-tokens)"
            )
        missing = [u for u in shard_set.urls if "://" not in u and not u.startswith("pipe:")
                   and not Path(u).is_file()]  # fmt: skip
        if missing:
            raise DataError(
                f"{len(missing)} shard(s) of data.path={src} are missing or not files, first "
                f"{missing[0]}: restore them or re-run tools/prepare_data.py"
            )
        urls.append(shard_set.urls)
    dataset = ShardStream(
        urls, [w for _, w in specs], seq_len, micro_batch_size, seed, rank, world_size, readers,
        vocab_size, epochs, on_corrupt, shuffle_windows,
    )  # fmt: skip
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return TokenLoader(dataset, num_workers, pin_memory, prefetch_factor, chunk_batches, tokenizer)
