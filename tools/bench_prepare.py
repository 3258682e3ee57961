"""Corpus preparation benchmark: tools/prepare_data.py end to end against the tokenizer's own
ceiling, on the same documents in one run.

The documents are this Python's standard-library sources (as the demo corpus; no
download), written as JSON lines. The ceiling is HF `tokenizers`' `encode_batch_fast` (the
call prepare_data makes: `encode_batch` without the character offsets) over the texts
already in memory (no reading, no writing), in batches of the size prepare_data uses;
`encode_batch`, with offsets, is timed too, for reference;
`prepare` is `pretrain.data.shards.prepare` from the JSON lines file to shards and manifest,
with 1 worker (one process reads, tokenizes and writes) and 2 (two processes tokenize while
the main one reads and writes). Everything runs with one tokenizer thread per process
(RAYON_NUM_THREADS=1, set before `tokenizers` loads), so 1 worker is one core of
tokenizing and the ceiling is that core's. The last line is `prepare/ceiling ratio: X` for 1
worker; the line before it, `2 workers / 1 worker: Y`.

    python tools/bench_prepare.py [--mb 20] [--vocab-size 8192] [--repeats 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers starts its thread pool

import argparse
import json
import tempfile
import time
from pathlib import Path

from pretrain.data import shards, tokenizer
from pretrain.data.corpus import stdlib_sources
from pretrain.data.inputs import read_documents


def ceiling(encode: object, batches: list[list[str]]) -> float:
    """Seconds to tokenize `batches` in memory with `encode` (a tokenizer's batch call)."""
    t0 = time.perf_counter()
    for batch in batches:
        encode(batch)
    return time.perf_counter() - t0


def prepare(corpus: Path, tok_path: Path, out: Path, workers: int) -> tuple[float, dict]:
    t0 = time.perf_counter()
    manifest = shards.prepare([corpus], tok_path, out, progress=False, workers=workers)
    return time.perf_counter() - t0, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=20.0, help="MB of source text")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    args = parser.parse_args()
    # Imported here, not at the top: spawned workers import this module, and corpus.py
    # imports torch (a second per worker).

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        texts = list(read_documents(stdlib_sources(int(args.mb * 1e6))))
        corpus = root / "corpus.jsonl"
        with corpus.open("w") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
        tok = tokenizer.train_bpe(texts, args.vocab_size)
        tok_path = root / "tokenizer.json"
        tok.save(str(tok_path))
        mb = sum(len(t.encode()) for t in texts) / 1e6
        batches = list(shards._batches(iter(texts), 512, shards.BATCH_CHARS))  # as prepare's
        best = min(ceiling(tok.encode_batch_fast, batches) for _ in range(args.repeats))
        offsets = min(ceiling(tok.encode_batch, batches) for _ in range(args.repeats))
        fast, full = tok.encode_batch_fast(texts), tok.encode_batch(texts)
        assert [e.ids for e in fast] == [e.ids for e in full]  # the same tokens either way
        tokens = sum(len(e.ids) + 1 for e in fast)  # + EOS, as shards
        rows = {"encode_batch (offsets)": offsets, "ceiling": best}
        for workers in (1, 2):
            times = []
            for r in range(args.repeats):
                seconds, manifest = prepare(corpus, tok_path, root / f"w{workers}-{r}", workers)
                assert manifest["tokens"] == tokens, (manifest["tokens"], tokens)
                times.append(seconds)
            rows[f"prepare {workers} worker(s)"] = min(times)
        print(f"{len(texts):,} documents, {mb:.1f} MB, {tokens:,} tokens, vocab "
              f"{args.vocab_size}, {os.cpu_count()} CPUs, best of {args.repeats}")  # fmt: skip
        for name, seconds in rows.items():
            print(f"{name:22s} {tokens / seconds:12,.0f} tokens/s {mb / seconds:8.2f} MB/s "
                  f"{seconds:7.2f} s")  # fmt: skip
        one, two = rows["prepare 1 worker(s)"], rows["prepare 2 worker(s)"]
        print(f"2 workers / 1 worker: {one / two:.2f}")
        print(f"prepare/ceiling ratio: {best / one:.3f}")


if __name__ == "__main__":
    main()
