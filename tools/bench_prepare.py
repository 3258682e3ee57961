"""Corpus preparation benchmark: tools/prepare_data.py end to end against the tokenizer's own
ceiling, on the same documents in one run.

The documents are this Python's standard-library sources (as the demo corpus; no
download), written as JSON lines. The ceiling is HF `tokenizers`' `encode_batch_fast` (the
call prepare_data makes: `encode_batch` without the character offsets) over the texts
already in memory (no reading, no writing), in batches of the size prepare_data uses;
`encode_batch`, with offsets, is timed too, for reference;
`prepare` is `pretrain.data.shards.prepare` from the JSON lines file to shards and manifest,
with 1 worker (a thread tokenizes while the main one reads and writes) and 2 (two processes
tokenize while the main one reads and writes). Everything runs with one tokenizer thread per
process (RAYON_NUM_THREADS=1, set before `tokenizers` loads), so 1 worker is one core of
tokenizing and the ceiling is that core's. Every timed run is a process of its own, and the
rows take turns. The last line is `prepare/ceiling ratio: X` for 1 worker; the line before
it, `2 workers / 1 worker: Y`.

    python tools/bench_prepare.py [--mb 20] [--vocab-size 8192] [--repeats 3]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers starts its thread pool

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pretrain.data import shards, tokenizer
from pretrain.data.inputs import read_documents

ROWS = {
    "encode_batch (offsets)": "encode_batch",
    "ceiling": "encode_batch_fast",
    "prepare 1 worker(s)": "1",
    "prepare 2 worker(s)": "2",
}
"""Each row's timed run: a tokenizer batch call (in memory), or prepare with that many workers."""


def time_one(root: Path, run: str) -> tuple[float, int]:
    """(seconds, tokens) of one timed `run` (a ROWS value) on the corpus under `root`: the
    tokenizer's batch call over the texts already in memory, in the batches prepare makes, or
    prepare end to end into a fresh directory."""
    tok_path, corpus = root / "tokenizer.json", root / "corpus.jsonl"
    if run.isdigit():
        out = Path(tempfile.mkdtemp(dir=root))
        t0 = time.perf_counter()
        manifest = shards.prepare([corpus], tok_path, out, progress=False, workers=int(run))
        seconds = time.perf_counter() - t0
        shutil.rmtree(out)
        return seconds, manifest["tokens"]
    batches = list(shards._batches(read_documents([corpus]), 512, shards.BATCH_CHARS))
    encode = getattr(tokenizer.load(tok_path), run)
    t0 = time.perf_counter()
    tokens = sum(len(e.ids) + 1 for batch in batches for e in encode(batch))  # + EOS, as shards
    return time.perf_counter() - t0, tokens


def timed(root: Path, run: str) -> tuple[float, int]:
    """`time_one` in a fresh process: a process that has loaded several tokenizers runs every
    tokenizer slower (10-30% after six, with `tokenizers` 0.23), which would favour whichever
    row ran first; prepare_data loads its tokenizer once per process."""
    proc = subprocess.run([sys.executable, __file__, "--time", run, "--dir", str(root)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    seconds, tokens = proc.stdout.split()
    return float(seconds), int(tokens)


def make_corpus(root: Path, mb: float, vocab_size: int) -> tuple[int, float]:
    """`root`/corpus.jsonl (the stdlib sources) and a BPE trained on it; (documents, MB)."""
    # Imported here, not at the top: this module is every timed process's __main__, and
    # corpus.py imports torch (a second per process).
    from pretrain.data.corpus import stdlib_sources

    texts = list(read_documents(stdlib_sources(int(mb * 1e6))))
    with (root / "corpus.jsonl").open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    tokenizer.train_bpe(texts, vocab_size).save(str(root / "tokenizer.json"))
    return len(texts), sum(len(t.encode()) for t in texts) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=20.0, help="MB of source text")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--time", choices=ROWS.values(), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time:  # one timed run, in its own process (see `timed`)
        print(*time_one(args.dir, args.time))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        documents, mb = make_corpus(root, args.mb, args.vocab_size)
        # Interleaved, so that a machine slowing down or speeding up during the run (other
        # load, clocks) weighs on every row alike rather than on the ones timed last.
        times: dict[str, list[float]] = {name: [] for name in ROWS}
        counts = set()
        for _ in range(args.repeats):
            for name, run in ROWS.items():
                seconds, tokens = timed(root, run)
                times[name].append(seconds)
                counts.add(tokens)
    assert len(counts) == 1, f"the rows tokenized different token counts: {counts}"
    tokens = counts.pop()
    rows = {name: min(seconds) for name, seconds in times.items()}
    print(f"{documents:,} documents, {mb:.1f} MB, {tokens:,} tokens, vocab "
          f"{args.vocab_size}, {os.cpu_count()} CPUs, best of {args.repeats}")  # fmt: skip
    for name, seconds in rows.items():
        print(f"{name:22s} {tokens / seconds:12,.0f} tokens/s {mb / seconds:8.2f} MB/s "
              f"{seconds:7.2f} s")  # fmt: skip
    one, two = rows["prepare 1 worker(s)"], rows["prepare 2 worker(s)"]
    print(f"2 workers / 1 worker: {one / two:.2f}")
    print(f"prepare/ceiling ratio: {rows['ceiling'] / one:.3f}")


if __name__ == "__main__":
    main()
