"""Train a byte-level BPE tokenizer (HF `tokenizers`) with BOS, EOS and PAD specials.

    python tools/train_tokenizer.py --input PATH [PATH ...] --vocab-size N --output tokenizer.json

Inputs: text files, directories (their text files), .jsonl / .jsonl.gz / .zst (field `text`).
`--vocab-size` counts the 256 byte tokens and the specials. For the byte-level tokenizer that
needs no training, pass `bytes` wherever a tokenizer path is asked for.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from typing import NoReturn

from pretrain.data import shards, tokenizer


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="files or directories")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", required=True, help="where to write tokenizer.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rejected: list[str] = []
    seen = {"chars": 0}

    def texts() -> Iterator[str]:  # streamed: the corpus need not fit in memory
        for doc in shards.read_documents(files, rejected):
            seen["chars"] += len(doc)
            yield doc

    try:
        files = shards.expand_inputs(args.input)
        tok = tokenizer.train_bpe(texts(), args.vocab_size)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if rejected:
        print(f"warning: skipped {len(rejected)} document(s) that are not text, first: "
              f"{rejected[0]}", file=sys.stderr)  # fmt: skip
    if not seen["chars"]:
        why = f" ({len(rejected)} rejected as not text)" if rejected else ""
        fail(f"the corpus {' '.join(args.input)} holds no text to train on{why}; nothing written")
    tok.save(args.output)
    sha = tokenizer.fingerprint(tok)[:12]
    got = tok.get_vocab_size()
    if got < args.vocab_size:
        print(f"warning: trained {got} tokens, fewer than the {args.vocab_size} asked: the "
              f"corpus ({seen['chars']:,} characters) has no more pairs to merge. Use more "
              f"text, or use it as is (any model.vocab_size >= {got} fits it)",
              file=sys.stderr)  # fmt: skip
    print(
        f"trained {got} tokens on {len(files)} file(s) in "
        f"{time.perf_counter() - t0:.1f} s -> {args.output} (sha256 {sha})"
    )


if __name__ == "__main__":
    main()
