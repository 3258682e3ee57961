"""The embedded demo corpus: this Python's own standard-library sources, no download.

`demo_source` (data=demo) builds, on first use, a small byte-level BPE and token shards from
the `.py` files of the running interpreter's standard library, caches them under
`data.cache_dir`, and streams them like any other shard set. Later runs reuse the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import sysconfig
from pathlib import Path

import torch.distributed as tdist

from pretrain.data import shards as shard_writer
from pretrain.data import tokenizer as tokenizers
from pretrain.data.inputs import read_documents
from pretrain.data.source import DataContext
from pretrain.data.stream import TokenLoader, shards_source

log = logging.getLogger("pretrain")


def stdlib_sources(max_bytes: int) -> list[Path]:
    """Sorted standard-library `.py` files (no tests, no site-packages) up to `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if parts & {"site-packages", "test", "tests", "idle_test", "dist-packages"}:
            continue
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    if not files:
        raise FileNotFoundError(
            f"no standard-library sources under {root}: this Python ships without them; "
            "use data=shards with your own corpus (tools/prepare_data.py)"
        )
    return files


def build_demo(cache_dir: str | Path, vocab_size: int, max_bytes: int) -> Path:
    """Tokenizer + shards of the stdlib corpus under `cache_dir` (reused when present).
    Processes that build the same cache at once (the ranks of a sequence group share data
    rank 0; two jobs on one machine) take turns through a lock file: the first builds, the
    others then find it built."""
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return _build_demo(cache, vocab_size, max_bytes)


def _build_demo(cache: Path, vocab_size: int, max_bytes: int) -> Path:
    manifest = cache / "shards" / shard_writer.MANIFEST
    tokenizer_path = cache / "tokenizer.json"
    if (
        manifest.is_file()
        and tokenizer_path.is_file()
        and json.loads(manifest.read_text()).get("vocab_size") == vocab_size
    ):
        return cache / "shards"
    # Sorted by path, neighbouring files are alike (one package after another); a fixed
    # hash order mixes them, so every shard holds a bit of everything.
    files = sorted(stdlib_sources(max_bytes), key=lambda p: hashlib.sha1(p.name.encode()).digest())
    log.info("building the demo corpus: %d stdlib files -> %s", len(files), cache)
    texts = list(read_documents(files))
    tokenizers.train_bpe(texts, vocab_size).save(str(tokenizer_path))
    # ~32 shards (about 2 bytes of source per token): each epoch mixes them in a new order.
    shard_writer.prepare(
        files, tokenizer_path, cache / "shards", shard_tokens=max(2**12, max_bytes // 64),
        member_tokens=2**14, val_fraction=0.02, progress=False,
    )  # fmt: skip
    return cache / "shards"


def demo_source(
    ctx: DataContext, cache_dir: str, tokenizer_vocab_size: int, max_bytes: int, num_workers: int
) -> TokenLoader:
    """data=demo: rank 0 builds the cache once, every rank then streams it (`ctx.split`:
    train, or val, the 2% of documents held out)."""
    tokenizers.check_fits(tokenizer_vocab_size, ctx.vocab_size, "data=demo")
    if ctx.data_rank == 0:
        path = build_demo(cache_dir, tokenizer_vocab_size, max_bytes)
    if tdist.is_initialized() and ctx.data_size > 1:
        tdist.barrier()
    if ctx.data_rank != 0:
        path = build_demo(cache_dir, tokenizer_vocab_size, max_bytes)  # now only reads the cache
    loader = shards_source(ctx, path=str(path), num_workers=num_workers)
    loader.tokenizer = str(path.parent / "tokenizer.json")  # build_demo wrote it there
    return loader
