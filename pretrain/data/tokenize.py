"""Tokenizing documents for the shard writer (data/shards.py), here or in worker processes.

Kept apart from the writer so a spawned worker imports only numpy and `tokenizers`: a batch
of documents goes in, its token ids (an EOS after each document), their split and their
UTF-8 size come back, and the writer takes batches in the order they went in.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from pretrain.data import tokenizer as tokenizers


def is_validation(doc: str, fraction: float) -> bool:
    """Stable split by content hash: the same document always lands in the same split."""
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8", "replace"), digest_size=8).digest())
    return h % 1_000_000 < fraction * 1_000_000


class Job(NamedTuple):
    """What a tokenizing process needs."""

    tokenizer: str
    """A tokenizer.json, or `bytes`."""
    eos: int
    dtype: str
    """The token dtype (numpy's `str`: <u2 or <u4)."""
    val_fraction: float


Tokenized = tuple[np.ndarray, np.ndarray, np.ndarray, int]
"""A batch as (all its token ids with an EOS after each document, each document's length,
whether each goes to val, its UTF-8 bytes)."""

_worker_tokenizer: Any = None
_worker_job: Job | None = None


def _tokenize_batch(batch: list[str], tok: Any, job: Job) -> Tokenized:
    _, eos, dtype, val_fraction = job
    # encode_batch_fast: the same ids, without the character offsets nothing here uses.
    docs = [np.asarray([*enc.ids, eos], dtype=dtype) for enc in tok.encode_batch_fast(batch)]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    val = np.array([is_validation(text, val_fraction) for text in batch], dtype=bool)
    n_bytes = sum(len(text.encode("utf-8", "replace")) for text in batch)
    return np.concatenate(docs), lengths, val, n_bytes


def _init_worker(job: Job) -> None:
    global _worker_tokenizer, _worker_job
    os.environ["RAYON_NUM_THREADS"] = "1"  # one core per worker: the workers are the parallelism
    _worker_tokenizer, _worker_job = tokenizers.load(job[0]), job


def _worker_tokenize(batch: list[str]) -> Tokenized:
    return _tokenize_batch(batch, _worker_tokenizer, _worker_job)


def tokenized(batches: Iterator[list[str]], job: Job, workers: int) -> Iterator[Tokenized]:
    """Each batch tokenized, in order, with at most two batches per worker in flight (memory
    stays bounded whatever the corpus size) while the caller reads and writes.

    `workers=1`: a thread of this process tokenizes (`tokenizers` releases the GIL while it
    encodes, so reading and writing overlap with it, and the batch needs no trip between
    processes); more: that many spawned processes, one tokenizer thread each."""
    if workers == 1:
        tok = tokenizers.load(job[0])
        with ThreadPoolExecutor(1) as threads:
            yield from _in_order(
                lambda batch: threads.submit(_tokenize_batch, batch, tok, job).result,
                batches, depth=2,
            )  # fmt: skip
        return
    context = multiprocessing.get_context("spawn")  # no forked tokenizer thread pools
    with context.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        yield from _in_order(
            lambda batch: pool.apply_async(_worker_tokenize, (batch,)).get,
            batches, depth=2 * workers,
        )  # fmt: skip


def _in_order(
    submit: Callable[[list[str]], Callable[[], Tokenized]], batches: Iterator[list[str]],
    depth: int,
) -> Iterator[Tokenized]:  # fmt: skip
    """Results of `submit(batch)` (a call that waits for the batch's result), in submission
    order, with up to `depth` batches submitted ahead of the one being yielded."""
    pending: deque[Callable[[], Tokenized]] = deque()
    for batch in batches:
        pending.append(submit(batch))
        if len(pending) >= depth:
            yield pending.popleft()()
    while pending:
        yield pending.popleft()()
