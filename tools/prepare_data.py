"""Tokenize a corpus into webdataset shards plus manifest.json (and a validation split).

    python tools/prepare_data.py --input PATH [PATH ...] --tokenizer tokenizer.json --output DIR

Then train on it: python -m pretrain data=shards data.path=DIR. Re-running with the same
inputs, tokenizer and settings does nothing; the manifest is written last, atomically.
Inputs: text files, JSON lines (.jsonl, .jsonl.gz, .jsonl.zst), parquet, arrow, Hugging Face
dataset directories, and directories of these; `--text-field` picks the column or key
(default `text`). A record without usable text (no such field, null, not a string, not JSON)
stops the run naming its file and row, or with `--on-bad-record skip` is counted in the
manifest (`bad_records`). Documents that are not text (more than 1% of characters invalid
UTF-8, or NUL characters: binary files, other encodings) are skipped, named in a warning and
counted in the manifest (`rejected_documents`); a corpus with no text at all exits 2.

Across nodes: `--num-tasks N --task-index I` (from SLURM_ARRAY_TASK_COUNT / _ID under an
sbatch array) tokenizes task I's share of the files into DIR/task-I-of-N/; then
`--merge DIR` writes DIR/manifest.json once every task is done (slurm/prepare_data.sh does
both). A finished task's rerun does nothing; a failed one is rerun alone.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from pretrain.data import inputs, shards, tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    inputs.add_arguments(parser, required=False)
    parser.add_argument("--tokenizer", help="tokenizer.json, or 'bytes'")
    parser.add_argument("--output", help="output directory")
    parser.add_argument("--shard-tokens", type=int, default=2**25, help="tokens per shard")
    parser.add_argument("--member-tokens", type=int, default=2**16, help="tokens per tar member")
    parser.add_argument("--val-fraction", type=float, default=0.005, help="documents held out")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tokenizing processes, while this one reads and writes (1: a thread of this "
        "process tokenizes); the output is the same for any number",
    )
    parser.add_argument("--num-tasks", type=int, default=None,
                        help="split the corpus into this many independent tasks (default: "
                             "SLURM_ARRAY_TASK_COUNT, else 1)")  # fmt: skip
    parser.add_argument(
        "--task-index",
        type=int,
        default=None,
        help="the task this process runs (default: SLURM_ARRAY_TASK_ID)",
    )
    parser.add_argument(
        "--merge",
        metavar="DIR",
        help="write DIR/manifest.json over its finished tasks, and nothing else",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    try:
        if args.merge:
            m, where = tasks.merge(Path(args.merge)), args.merge
        else:
            m, where = _prepare(parser, args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    summarize(m, where, time.perf_counter() - t0)


def summarize(m: dict, where: str, seconds: float) -> None:
    """One line of totals, then per split, the skipped records and the speed."""
    mb = m["text_bytes"] / 1e6
    print(
        f"{m['documents']:,} documents, {m['tokens']:,} tokens ({m['dtype']}) -> "
        f"{len(m['train'])} train + {len(m['val'])} val shard(s) in {where}; "
        f"{mb:.1f} MB of text in {seconds:.1f} s"
        + (f"; {m['rejected_documents']:,} not-text document(s) skipped"
           if m.get("rejected_documents") else "")
        + (f"; {m['bad_records']:,} bad record(s) skipped" if m.get("bad_records") else "")
    )  # fmt: skip
    for split in ("train", "val"):
        docs = sum(s["documents"] for s in m[split])
        tokens = sum(s["tokens"] for s in m[split])
        per_doc = f"{tokens / docs:,.0f} tokens/document" if docs else "no documents"
        print(f"  {split:5s} {len(m[split]):,} shard(s), {docs:,} documents, {tokens:,} tokens "
              f"({per_doc})")  # fmt: skip
    print(f"  skipped {m.get('bad_records', 0):,} bad record(s), "
          f"{m.get('rejected_documents', 0):,} not-text document(s)")  # fmt: skip
    print(f"  {m['tokens'] / max(seconds, 1e-9):,.0f} tokens/s, {mb / max(seconds, 1e-9):.2f} "
          "MB/s of text")  # fmt: skip


def _prepare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[dict, str]:
    """One task (or the whole corpus): its manifest, and where it was written."""
    for name in ("input", "tokenizer", "output"):
        if getattr(args, name) is None:
            parser.error(f"--{name} is required (unless --merge)")
    index, count = tasks.task_from_env(args.num_tasks, args.task_index)
    files, out, task = args.input, Path(args.output), None
    if count > 1:
        files = tasks.share(inputs.find_inputs(args.input), index, count)
        out, task = tasks.task_dir(out, index, count), (index, count)
        print(f"task {index} of {count}: {len(files)} input file(s) -> {out}", file=sys.stderr)
    m = shards.prepare(
        files, args.tokenizer, out, shard_tokens=args.shard_tokens,
        member_tokens=args.member_tokens, val_fraction=args.val_fraction,
        text_field=args.text_field, on_bad_record=args.on_bad_record, workers=args.workers,
        task=task,
    )  # fmt: skip
    return m, str(out)


if __name__ == "__main__":
    main()
