"""Train a byte-level BPE tokenizer (HF `tokenizers`) with BOS, EOS and PAD specials.

    python tools/train_tokenizer.py --input PATH [PATH ...] --vocab-size N --output tokenizer.json

Inputs: text files, directories (their text files), .jsonl / .jsonl.gz / .zst (field `text`).
`--vocab-size` counts the 256 byte tokens and the specials. For the byte-level tokenizer that
needs no training, pass `bytes` wherever a tokenizer path is asked for.
"""

from __future__ import annotations

import argparse
import time

from pretrain.data import shards, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="files or directories")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", required=True, help="where to write tokenizer.json")
    args = parser.parse_args()
    files = shards.expand_inputs(args.input)
    t0 = time.perf_counter()
    tok = tokenizer.train_bpe(shards.read_documents(files), args.vocab_size)
    tok.save(args.output)
    sha = tokenizer.fingerprint(tok)[:12]
    print(
        f"trained {tok.get_vocab_size()} tokens on {len(files)} file(s) in "
        f"{time.perf_counter() - t0:.1f} s -> {args.output} (sha256 {sha})"
    )


if __name__ == "__main__":
    main()
