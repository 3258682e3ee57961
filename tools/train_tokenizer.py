"""Train a byte-level BPE tokenizer (HF `tokenizers`) with BOS, EOS and PAD specials.

    python tools/train_tokenizer.py --input PATH [PATH ...] --vocab-size N --output tokenizer.json

Inputs: text files, JSON lines (.jsonl, .jsonl.gz, .jsonl.zst), parquet, arrow, Hugging Face
dataset directories, and directories of these (`--text-field` picks the column or key, default
`text`; `--on-bad-record skip` counts records without usable text instead of stopping).
`--vocab-size` counts the 256 byte tokens and the specials. For the byte-level tokenizer that
needs no training, pass `bytes` wherever a tokenizer path is asked for.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from typing import NoReturn

from pretrain.data import inputs, tokenizer


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    inputs.add_arguments(parser)
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", required=True, help="where to write tokenizer.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    report = inputs.ReadReport()
    seen = {"chars": 0}

    def texts() -> Iterator[str]:  # streamed: the corpus need not fit in memory
        for doc in inputs.read_documents(files, args.text_field, args.on_bad_record, report):
            seen["chars"] += len(doc)
            yield doc

    try:
        files = inputs.find_inputs(args.input)
        tok = tokenizer.train_bpe(texts(), args.vocab_size)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if report.rejected:
        print(f"warning: skipped {report.rejected} document(s) that are not text, first: "
              f"{report.rejected_examples[0]}", file=sys.stderr)  # fmt: skip
    if report.bad_records:
        print(f"warning: skipped {report.bad_records} bad record(s), first: "
              f"{report.bad_examples[0]}", file=sys.stderr)  # fmt: skip
    if not seen["chars"]:
        why = f" ({report.rejected} rejected as not text)" if report.rejected else ""
        why += f" ({report.bad_records} bad record(s))" if report.bad_records else ""
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
