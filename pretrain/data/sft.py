"""data=sft: supervised fine-tuning on conversations, the loss on the assistant's tokens only.

    python -m pretrain data=sft data.path=chats.jsonl model.init_from=hf/base ...

The conversations (`.jsonl`, `.jsonl.gz`/`.zst`, `.parquet`, or a directory of them; each
record `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "completion"}`) are
rendered with a chat template and tokenized (data/chat.py) with model.init_from's tokenizer
unless `data.tokenizer` names another; every target that is not the assistant's is ignored
(IGNORE_INDEX; `data.assistant_only=false` learns every token), and counted in the metrics
(`data_loss_tokens`, `data_ignored_tokens`: the step's global batch).

Windows: conversations in a shuffled order (a new one per epoch, from the seed) fill
windows of seq_len + 1 tokens one after another; one that does not fit in what is left of
a window starts the next, and the rest is padding (ignored). When the model masks
attention between documents (model.document_mask) several conversations share a
window, each its own document (`Batch.documents`; positions restart per conversation with
model.document_positions=reset); otherwise each window holds one. A
conversation longer than a window is cut to it (counted, and named at start).

Window g of the stream is a function of (seed, g) alone, and optimizer step s takes windows
[s * G, (s + 1) * G) of the global batch G however the ranks split it: a resume is exact on
any layout. The held-out split (`val_fraction` of the conversations, by a hash of their
content, or `val_path`) is read once in file order, then as empty windows (nothing counted):
an evaluation asking for more tokens than it holds scores each conversation once, and every
rank still runs the same number of batches.

Rendered conversations are kept in `data.cache_dir` (`rendered-<hash>.npz`, by the files'
names, sizes and times, the tokenizer, template and settings): the ranks of a machine render
once, and a rerun reads them back.
"""

from __future__ import annotations

import bisect
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.data import tokenizer as tokenizers
from pretrain.data.chat import (
    DEFAULT_TEMPLATE,
    ChatRenderer,
    ConversationError,
    messages_of,
    own_template,
    with_template_tokens,
)
from pretrain.data.chat_demo import write_demo
from pretrain.data.inputs import find_inputs
from pretrain.data.source import Batch, DataContext
from pretrain.data.stream import DataError
from pretrain.data.tokenize import is_validation
from pretrain.model.loss import IGNORE_INDEX

log = logging.getLogger("pretrain")

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


@dataclass(frozen=True)
class Conversations:
    """A split's conversations, tokenized and cut to the window."""

    ids: list[np.ndarray]
    learn: list[np.ndarray]
    """Per conversation, per token: the assistant's (bool)."""
    truncated: int
    """How many were longer than a window and cut."""

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ids, learn in zip(self.ids, self.learn, strict=True):
            h.update(ids.tobytes())
            h.update(learn.tobytes())
        return h.hexdigest()


class SftSource:
    """This rank's stream of packed conversation windows (a `DataSource`, data/source.py)."""

    allow_tokenizer_change: bool
    eos_id: int | None
    """The tokenizer's end of text: how other streams of it (trainer.eval_data shards) end
    their documents; this source's own batches carry theirs."""

    def __init__(
        self, ctx: DataContext, conversations: Conversations, pad: int, eos: int, pack: bool,
        tokenizer: str, tokenizer_sha256: str, chat_template: str,
        allow_tokenizer_change: bool = False,
    ) -> None:  # fmt: skip
        self.ctx, self.data, self.pad, self.pack = ctx, conversations, pad, pack
        self.eos_id = eos
        self.tokenizer, self.tokenizer_sha256 = tokenizer, tokenizer_sha256
        self.chat_template = chat_template
        self.allow_tokenizer_change = allow_tokenizer_change
        self.window = ctx.seq_len + 1
        self.micro_batches_done = 0
        lengths = np.array([len(i) for i in conversations.ids], dtype=np.int64)
        self._lengths = lengths
        # Targets a conversation adds: its learned tokens but the first (that target would
        # be predicted from the document before it).
        self._learned = np.array([int(x[1:].sum()) for x in conversations.learn], np.int64)
        self._step_cache = (-1, 0)  # (step, its global batch's learned targets)
        self._epoch_starts = [0]  # the first window of each epoch known so far
        self._epochs: dict[int, list[list[int]]] = {}
        # What the windows depend on: a resume that changes any of it is warned about.
        self._fingerprint = f"{conversations.fingerprint()}-{pack}-{ctx.seed}"

    # -- the windows ------------------------------------------------------------------

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.data)
        if self.ctx.split != "train":
            return np.arange(n)
        return np.random.default_rng([self.ctx.seed, epoch, 0x5F7]).permutation(n)

    def epoch_windows(self, epoch: int) -> list[list[int]]:
        """The conversations of each window of `epoch`, in order."""
        if epoch not in self._epochs:
            windows: list[list[int]] = []
            used = 0
            for i in self._order(epoch).tolist():
                n = int(self._lengths[i])
                if not windows or not self.pack or used + n > self.window:
                    windows.append([])
                    used = 0
                windows[-1].append(i)
                used += n
            self._epochs = {e: w for e, w in self._epochs.items() if e >= epoch - 1}
            self._epochs[epoch] = windows
        return self._epochs[epoch]

    def _locate(self, g: int) -> tuple[int, int]:
        """(epoch, index within it) of global window `g`."""
        while g >= self._epoch_starts[-1]:
            epoch = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + len(self.epoch_windows(epoch)))
        epoch = bisect.bisect_right(self._epoch_starts, g) - 1
        return epoch, g - self._epoch_starts[epoch]

    def _members(self, g: int) -> list[int]:
        """The conversations of global window `g`; the held-out split's windows after its
        one pass hold none (padding, nothing counted)."""
        if self.ctx.split != "train" and g >= self.windows_per_epoch():
            return []
        epoch, index = self._locate(g)
        return self.epoch_windows(epoch)[index]

    def window_arrays(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global window `g`: tokens (T + 1), labels (T), documents (T)."""
        tokens = np.full(self.window, self.pad, dtype=np.int64)
        learn = np.zeros(self.window, dtype=bool)
        docs = np.zeros(self.window, dtype=np.int32)
        at = 0
        members = self._members(g)
        for d, i in enumerate(members):
            n = int(self._lengths[i])
            tokens[at : at + n] = self.data.ids[i]
            learn[at : at + n] = self.data.learn[i]
            learn[at] = False  # predicted from the document before: not learned
            docs[at : at + n] = d
            at += n
        docs[at:] = len(members)  # padding: a document of its own
        labels = np.where(learn[1:], tokens[1:], IGNORE_INDEX)
        return tokens, labels, docs[:-1]

    def counts(self, g: int) -> tuple[int, int]:
        """(targets learned, targets ignored) of global window `g`."""
        learned = int(self._learned[self._members(g)].sum())
        return learned, self.window - 1 - learned

    # -- the stream -------------------------------------------------------------------

    @property
    def _global_batch(self) -> int:
        """Windows per optimizer step, over every rank."""
        return self.ctx.micro_batch_size * self.ctx.grad_accum * self.ctx.data_size

    def _first(self, done: int) -> int:
        """The global index of this rank's `done`-th micro-batch's first window."""
        c = self.ctx
        step, micro_step = divmod(done, c.grad_accum)
        return (
            step * self._global_batch
            + (c.data_rank * c.grad_accum + micro_step) * c.micro_batch_size
        )

    def __iter__(self) -> SftSource:
        return self

    def __next__(self) -> Batch:
        c = self.ctx
        first = self._first(self.micro_batches_done)
        windows = range(first, first + c.micro_batch_size)
        arrays = [self.window_arrays(g) for g in windows]
        step = self.micro_batches_done // c.grad_accum
        self.micro_batches_done += 1
        tokens, labels, docs = (torch.from_numpy(np.stack(a)) for a in zip(*arrays, strict=True))
        learned = sum(self.counts(g)[0] for g in windows)
        in_step = self._step_learned(step)
        weight = learned * c.grad_accum * c.data_size / in_step if in_step else 0.0
        return Batch(tokens, labels, docs, weight)

    def _step_learned(self, step: int) -> int:
        """The counted targets of optimizer step `step`'s global batch (every rank's)."""
        if self._step_cache[0] != step:
            first = step * self._global_batch
            learned = sum(self.counts(g)[0] for g in range(first, first + self._global_batch))
            self._step_cache = (step, learned)
        return self._step_cache[1]

    def windows_per_epoch(self) -> int:
        return len(self.epoch_windows(0))

    def metrics(self) -> dict[str, float]:
        """The last full step's global batch: its learned and ignored targets, and the epoch
        it reached."""
        steps = self.micro_batches_done // self.ctx.grad_accum
        if steps == 0:
            return {}
        learned = self._step_learned(steps - 1)
        ignored = self._global_batch * (self.window - 1) - learned
        epoch, index = self._locate(steps * self._global_batch - 1)
        return {"data_loss_tokens": float(learned), "data_ignored_tokens": float(ignored),
                "data_epoch": epoch + (index + 1) / len(self.epoch_windows(epoch))}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {"micro_batches_done": self.micro_batches_done, "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_same(state)
        self.micro_batches_done = int(state["micro_batches_done"])

    def load_resharded_state(self, states: list[dict[str, Any]], step: int) -> None:
        """Exact: the global batch of each step does not depend on the layout."""
        self._check_same(states[0])
        self.micro_batches_done = step * self.ctx.grad_accum

    def _check_same(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") not in (None, self._fingerprint):
            log.warning(
                "data=sft: the conversations (or their tokenization, template, seq_len, "
                "packing, seed) differ from those the checkpoint was trained on: the run goes "
                "on at the same window number, but the windows are not those it would have "
                "seen"
            )


def sft_source(
    ctx: DataContext, path: str, tokenizer: str | None = None, chat_template: str | None = None,
    val_fraction: float = 0.05, val_path: str | None = None, pack: bool | None = None,
    cache_dir: str = "~/.cache/pretrain/sft", on_bad_record: str = "error",
    allow_tokenizer_change: bool = False, assistant_only: bool = True,
) -> SftSource:  # fmt: skip
    """data=sft for `ctx` (see the module's docstring); errors name the key to fix."""
    if on_bad_record not in ("error", "skip"):
        raise DataError(f"data.on_bad_record={on_bad_record!r}: choose error or skip")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction}: must be in [0, 1)")
    if pack and not ctx.documents:
        raise DataError(
            "data.pack=true packs several conversations into a window, which needs a model "
            "that keeps them apart: set model.document_mask=true (and "
            "model.document_positions=reset), or data.pack=false (one per window)"
        )
    tok, tok_path, template = _tokenizer(ctx, tokenizer, chat_template, cache_dir)
    files = _files(path, cache_dir)
    split = _Split(ctx.split, ctx.seq_len + 1, val_fraction,
                   None if val_path is None else tuple(_files(val_path, cache_dir)),
                   on_bad_record, assistant_only)  # fmt: skip
    conversations = _conversations(ChatRenderer(tok, template), files, split, path, cache_dir)
    source = SftSource(ctx, conversations, tok.token_to_id("<|pad|>"), tokenizers.eos_id(tok),
                       ctx.documents if pack is None else pack, str(tok_path),
                       tokenizers.fingerprint(tok), template, allow_tokenizer_change)  # fmt: skip
    if ctx.split == "train" and ctx.data_rank == 0:
        _log_summary(source, files)
    return source


def _tokenizer(
    ctx: DataContext, name: str | None, chat_template: str | None, cache_dir: str
) -> tuple[Any, Path | str, str]:
    """(the tokenizer, with the template's special tokens; its file; the chat template)."""
    source = name or ctx.init_from
    if source is None:
        raise DataError(
            "data=sft needs a tokenizer: set model.init_from (the pretrained Hugging Face "
            "directory, with its tokenizer.json) or data.tokenizer (a tokenizer.json, a "
            "directory holding one, or bytes)"
        )
    directory = Path(source) if Path(source).is_dir() else None
    file: Path | str = directory / "tokenizer.json" if directory else source
    what = "data.tokenizer" if name else "model.init_from"
    try:
        tok = tokenizers.load(file)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{what}={source}: {e}") from None
    if chat_template is not None:
        if not Path(chat_template).is_file():
            raise DataError(f"data.chat_template={chat_template}: no such file (a Jinja template)")
        template = Path(chat_template).read_text(encoding="utf-8")
    else:
        template = (own_template(directory) if directory else None) or DEFAULT_TEMPLATE
    added = with_template_tokens(tok, template)
    vocab = tok.get_vocab_size()
    if vocab > ctx.vocab_size:
        extra = (f" (with the chat template's special tokens {', '.join(added)}, added to "
                 f"{what}'s tokenizer)" if added else "")  # fmt: skip
        raise DataError(
            f"data=sft: the tokenizer has {vocab} tokens{extra} but model.vocab_size="
            f"{ctx.vocab_size}: fine-tune a model with room for them (pretrain with "
            f"model.vocab_size >= {vocab}), or give data.chat_template a template made of "
            "the tokenizer's own tokens"
        )
    if added:  # the extended tokenizer travels with checkpoints: a file of its own
        file = Path(cache_dir).expanduser() / f"tokenizer-{tokenizers.fingerprint(tok)[:16]}.json"
        if not file.is_file():
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
            tok.save(str(tmp))
            os.replace(tmp, file)
    return tok, file, template


def _files(path: str, cache_dir: str) -> list[Path]:
    if path == "demo":
        return [write_demo(Path(cache_dir).expanduser() / "demo")]
    try:
        files = [f for f in find_inputs([path]) if f.name.endswith(SUFFIXES)]
    except FileNotFoundError as e:
        raise DataError(f"data.path: {e}") from None
    if not files:
        raise DataError(f"data.path={path} holds no conversations ({', '.join(SUFFIXES)} files)")
    return files


@dataclass(frozen=True)
class _Split:
    """Which conversations a source reads, and how."""

    name: str
    """train | val."""
    window: int
    val_fraction: float
    val_files: tuple[Path, ...] | None
    on_bad_record: str
    assistant_only: bool


_LOADED: dict[str, Conversations] = {}
"""Conversations already rendered in this process, by everything they depend on: every
evaluation rebuilds the val source, which then reads nothing again."""


def _conversations(
    renderer: ChatRenderer, files: list[Path], split: _Split, path: str, cache_dir: str
) -> Conversations:
    """The split's conversations of `files` (or of split.val_files), rendered and cut: from
    this process's memory, else from `cache_dir` (the ranks of a machine render once: the
    first takes a lock, the others then read its file), else rendered now."""
    from pretrain.data.tokenizer import fingerprint

    held = split.name != "train"
    sources = list(split.val_files) if held and split.val_files is not None else files
    key = repr((split, [(str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in sources],
                fingerprint(renderer.tokenizer), renderer.template))  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    if digest not in _LOADED:
        cache = Path(cache_dir).expanduser() / f"rendered-{digest}.npz"
        cache.parent.mkdir(parents=True, exist_ok=True)
        with cache.with_suffix(".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not cache.is_file():
                _save(_render_split(renderer, sources, split, path), cache)
            _LOADED[digest] = _load(cache)
    return _LOADED[digest]


def _render_split(renderer: ChatRenderer, sources: list[Path], split: _Split, path: str
                  ) -> Conversations:  # fmt: skip
    bad = _BadRecords(split.on_bad_record)
    records = _read(sources, bad)
    read = len(records)
    if split.val_files is None:  # held out by content
        held = split.name != "train"
        fraction = split.val_fraction
        records = [(w, m) for w, m in records
                   if is_validation(json.dumps(m, sort_keys=True), fraction) == held]  # fmt: skip
    conversations = _render(renderer, records, split, bad)
    bad.log()
    if not conversations.ids:
        raise DataError(_empty(split, path, read))
    return conversations


def _save(conversations: Conversations, path: Path) -> None:
    """Written aside and renamed: a reader finds the whole file or none."""
    lengths = np.array([len(i) for i in conversations.ids], dtype=np.int64)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, ids=np.concatenate(conversations.ids), learn=np.concatenate(conversations.learn),
             lengths=lengths, truncated=conversations.truncated)  # fmt: skip
    os.replace(tmp, path)


def _load(path: Path) -> Conversations:
    with np.load(path) as saved:
        bounds = np.cumsum(saved["lengths"])[:-1]
        ids = np.split(saved["ids"], bounds)
        learn = np.split(saved["learn"], bounds)
        return Conversations(ids, learn, int(saved["truncated"]))


class _BadRecords:
    """A record that is not a conversation the template renders: the run stops naming it
    (data.on_bad_record=error), or it is skipped and counted (skip)."""

    def __init__(self, on_bad_record: str) -> None:
        self.skip, self.seen = on_bad_record == "skip", []

    def __call__(self, where: str, why: object) -> None:
        if not self.skip:
            raise DataError(f"{where}: {why}. Fix the record, or skip such records with "
                            "data.on_bad_record=skip (they are counted)")  # fmt: skip
        self.seen.append(f"{where}: {why}")

    def log(self) -> None:
        if self.seen:
            log.warning("data=sft: skipped %d record(s) that are not conversations, e.g. %s",
                        len(self.seen), self.seen[0])  # fmt: skip


def _read(files: list[Path], bad: _BadRecords) -> list[tuple[str, list[dict[str, str]]]]:
    """(where, messages) of every conversation of `files`."""
    out = []
    for where, record in _records(files):
        try:
            if isinstance(record, ConversationError):
                raise record
            out.append((where, messages_of(record)))
        except ConversationError as e:
            bad(where, e)
    return out


def _records(files: list[Path]) -> Iterator[tuple[str, Any]]:
    for path in files:
        try:
            yield from _file_records(path)
        except (OSError, EOFError, ValueError) as e:  # undecodable, truncated, not parquet
            if isinstance(e, DataError):
                raise
            raise DataError(f"{path} cannot be read ({type(e).__name__}: {e}): data=sft "
                            f"reads UTF-8 {', '.join(SUFFIXES)} files") from None  # fmt: skip


def _file_records(path: Path) -> Iterator[tuple[str, Any]]:
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for row, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {row}", record
        return
    with path.open("rb") as raw:
        stream: Any = raw
        if path.name.endswith(".gz"):
            stream = gzip.GzipFile(fileobj=raw)
        elif path.name.endswith(".zst"):
            import zstandard

            stream = zstandard.ZstdDecompressor().stream_reader(raw)
        for lineno, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8"), 1):
            if line.strip():
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{lineno}", ConversationError(f"not a JSON line ({e})")


def _render(
    renderer: ChatRenderer, records: list[tuple[str, list[dict[str, str]]]], split: _Split,
    bad: _BadRecords,
) -> Conversations:  # fmt: skip
    from jinja2 import TemplateError

    ids, learn, truncated = [], [], 0
    for where, messages in records:
        try:
            r = renderer.render(messages)
        except (ConversationError, TemplateError, ValueError) as e:  # what the template refuses
            bad(where, f"the chat template cannot render it ({e})")
            continue
        truncated += len(r.ids) > split.window
        ids.append(np.asarray(r.ids[: split.window], dtype=np.int64))
        mask = r.learn if split.assistant_only else [True] * len(r.ids)
        learn.append(np.asarray(mask[: split.window], dtype=bool))
    return Conversations(ids, learn, truncated)


def _empty(split: _Split, path: str, n: int) -> str:
    if split.name == "train":
        return f"data.path={path}: no training conversations ({n} read, all held out?)"
    if split.val_files is not None:
        return "data.val_path holds no conversations"
    return (
        f"data.val_fraction={split.val_fraction} holds out none of the {n} conversations of "
        f"{path}: raise it, give data.val_path, or set trainer.eval_every_steps=0"
    )


def _log_summary(source: SftSource, files: list[Path]) -> None:
    c, data = source.ctx, source.data
    windows = source.windows_per_epoch()
    per_step = c.micro_batch_size * c.grad_accum * c.data_size
    learned = sum(source.counts(g)[0] for g in range(windows))
    log.info(
        "data=sft: %d conversations from %d file(s), %s; %d windows of %d tokens per epoch "
        "(%.1f per window), %.0f%% of targets learned; one epoch is %.1f steps",
        len(data), len(files), "packed" if source.pack else "one per window", windows,
        source.window, len(data) / windows, 100 * learned / (windows * (source.window - 1)),
        windows / per_step,
    )  # fmt: skip
    if data.truncated:
        log.warning("data=sft: %d conversation(s) longer than trainer.seq_len + 1 = %d tokens "
                    "were cut to it", data.truncated, source.window)  # fmt: skip
