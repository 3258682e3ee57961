"""Tokenizers: byte-level BPE trained with HF `tokenizers`, or plain bytes with no training.

Every tokenizer has the special tokens BOS, EOS and PAD. Documents are written to shards
separated by EOS, so the loader needs nothing from the tokenizer but its ids and size.
A tokenizer is identified by the SHA-256 of its JSON, which manifests and checkpoints record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` entries (specials included) on `texts`."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"--vocab-size {vocab_size} is too small for byte-level BPE: it needs the 256 byte "
            f"tokens and {len(SPECIAL_TOKENS)} specials, so at least {256 + len(SPECIAL_TOKENS)}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def byte_tokenizer() -> Tokenizer:
    """Plain bytes: ids 0-255 are the bytes, then the specials. Needs no training."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # printable stand-ins for the 256 bytes
    byte_to_char = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {ch: i for i, ch in enumerate(byte_to_char)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def _byte_of(char: str) -> int:
    """The byte that GPT-2's byte-level alphabet maps to `char`."""
    code = ord(char)
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    if code in printable:
        return code
    return [b for b in range(256) if b not in printable][code - 256]


def load(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json`, or `bytes` for the untrained byte-level tokenizer."""
    if str(path) == "bytes":
        return byte_tokenizer()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer {path} does not exist: train one with tools/train_tokenizer.py or use "
            "'bytes' for the byte-level tokenizer"
        )
    tok = Tokenizer.from_file(str(path))
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"tokenizer {path} lacks the special tokens {missing}")
    return tok


def fingerprint(tok: Tokenizer) -> str:
    """SHA-256 of the tokenizer's canonical JSON: equal for equal tokenizers."""
    canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def token_byte_lengths(tok: Tokenizer, vocab_size: int) -> list[int]:
    """UTF-8 bytes each token id stands for (specials and ids past the tokenizer: 0), for
    bits per byte: a loss comparable between tokenizers."""
    spec = json.loads(tok.to_str())
    byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
    specials = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    lengths = []
    for i in range(vocab_size):
        token = tok.id_to_token(i)
        if token is None or i in specials:
            lengths.append(0)
        elif byte_level:  # one character of the byte alphabet per byte
            lengths.append(len(token))
        else:
            lengths.append(len(tok.decode([i]).encode("utf-8")))
    return lengths


def eos_id(tok: Tokenizer) -> int:
    return tok.token_to_id("<|eos|>")


def check_fits(tokenizer_vocab: int, model_vocab: int, source: str) -> None:
    """Refuse a model whose embedding cannot hold every token id of the tokenizer."""
    if model_vocab < tokenizer_vocab:
        raise ValueError(
            f"{source}: the tokenizer has {tokenizer_vocab} tokens but model.vocab_size="
            f"{model_vocab}: set model.vocab_size={tokenizer_vocab} (or more; "
            "model.vocab_multiple pads the tables for speed by itself)"
        )
