"""Data loader benchmark: tokens/s of the streaming loader against nanoGPT's memmap loader.

Both read the same random uint16 tokens: ours from tar shards (~64K-token members) through
`pretrain.data.stream.build_loader` (packing, block shuffle, (B, T + 1) int64 batches), with
0 and 2 DataLoader workers; nanoGPT's `get_batch` picks random windows of a flat `np.memmap`
and stacks them into the same batch shape. Also times the shard writer. The last line is
`loader/memmap ratio: X` (the best loader setting over nanoGPT's).

    python tools/bench_data.py [--tokens 20000000] [--seq-len 2048] [--batch 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pretrain.data.shards import MANIFEST, SplitWriter
from pretrain.data.stream import build_loader


def write_dataset(root: Path, tokens: np.ndarray, shard_tokens: int) -> float:
    """The same tokens as shards (+ manifest) and as nanoGPT's train.bin; returns shard MB/s."""
    import json

    t0 = time.perf_counter()
    writer = SplitWriter(root, "train", np.dtype("<u2"), 2**16, shard_tokens)
    for doc in np.array_split(tokens, max(len(tokens) // 4096, 1)):  # ~4K-token "documents"
        writer.add(doc)
    shards = writer.finish()
    seconds = time.perf_counter() - t0
    manifest = {"vocab_size": 65536, "train": shards, "val": [], "dtype": "u16"}
    (root / MANIFEST).write_text(json.dumps(manifest))
    tokens.tofile(root / "train.bin")
    return tokens.nbytes / seconds / 1e6


def bench_memmap(path: Path, seq_len: int, batch: int, n_batches: int) -> float:
    """nanoGPT's get_batch (CPU part): random windows of a memmap, stacked as int64."""
    data = np.memmap(path, dtype=np.uint16, mode="r")
    t0 = time.perf_counter()
    for _ in range(n_batches):
        ix = torch.randint(len(data) - seq_len - 1, (batch,))
        x = torch.stack([torch.from_numpy(data[i : i + seq_len + 1].astype(np.int64)) for i in ix])
    assert x.shape == (batch, seq_len + 1)
    return n_batches * batch * seq_len / (time.perf_counter() - t0)


def bench_loader(root: Path, seq_len: int, batch: int, n_batches: int, workers: int) -> float:
    loader = build_loader(
        str(root), 65536, seq_len, batch, seed=0, num_workers=workers, pin_memory=False
    )
    for _ in range(max(2 * workers, 2)):  # start the workers and fill their queues
        next(loader)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        x = next(loader)
    assert x.shape == (batch, seq_len + 1)
    return n_batches * batch * seq_len / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    # 2000 x 8 x 2048 tokens: ~0.2 s timed at 100M tok/s; 200 gave 0.02 s, all start-up noise.
    parser.add_argument("--batches", type=int, default=2000, help="timed batches per setting")
    args = parser.parse_args()
    tokens = np.random.default_rng(0).integers(0, 65536, args.tokens, dtype=np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_mb_s = write_dataset(root, tokens, shard_tokens=args.tokens // 8)
        memmap = bench_memmap(root / "train.bin", args.seq_len, args.batch, args.batches)
        ours = {w: bench_loader(root, args.seq_len, args.batch, args.batches, w) for w in (0, 2)}
    print(f"shard writer: {write_mb_s:,.0f} MB/s of tokens (tar members, one core)")
    print(f"memmap (nanoGPT get_batch): {memmap / 1e6:,.1f}M tokens/s")
    for w, rate in ours.items():
        print(f"loader, {w} workers: {rate / 1e6:,.1f}M tokens/s")
    print(f"loader/memmap ratio: {max(ours.values()) / memmap:.2f}")


if __name__ == "__main__":
    main()
