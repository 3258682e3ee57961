"""Perplexity and bits per byte of a trained model on token shards: the in-loop validation
measurement, offline.

    python tools/eval_ppl.py runs/demo --data ~/.cache/pretrain/demo/shards
    python tools/eval_ppl.py out/hf --data 'shards/val-*.tar' --tokens 1000000 --seq-len 2048

--data is a tools/prepare_data.py directory (its --split, default val) or a glob / URL list
of shards (read whole). Windows of --seq-len + 1 tokens every --seq-len tokens, as training
reads them; without --tokens the whole split is scored. From a checkpoint, --seq-len,
--batch-size and --seed default to its training values, so with --tokens set to its
trainer.eval_tokens this scores the very windows of its last in-loop validation. Prints one
JSON object (loss, ppl, bpb, tokens) and writes it to --output when given.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from pretrain.checkpoint import manager
from pretrain.checkpoint.export import TOKENIZER_FILE
from pretrain.data.stream import DataError, build_loader
from pretrain.data.tokenizer import token_byte_lengths
from pretrain.eval.load import load_model
from pretrain.eval.perplexity import evaluate


def trained(source: Path) -> dict:
    """The trainer section the checkpoint was trained with (empty for an HF dir)."""
    if not manager.is_complete(source):
        return {}
    return manager.read_client_state(source)["config"]["trainer"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="run dir, checkpoints/step_N dir or HF dir")
    parser.add_argument("--data", required=True, help="shard directory, glob or URLs")
    parser.add_argument("--split", default="val", help="split of a shard directory")
    parser.add_argument("--tokens", type=int, default=None, help="score this many (default all)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="window length (default: the trained seq_len, else 2048)")  # fmt: skip
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows per forward (default: the trained micro-batch, else 8)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="window shuffle seed (default: the trained seed, else 0)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--output", type=Path, help="also write the figures here (JSON)")
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # only to consolidate ZeRO shards
    try:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        loaded = load_model(args.model, device, dtype)
        cfg = loaded.model.config
        train_cfg = trained(loaded.source)
        seq_len = args.seq_len or train_cfg.get("seq_len") or min(cfg.max_seq_len, 2048)
        batch = args.batch_size or train_cfg.get("micro_batch_size") or 8
        seed = args.seed if args.seed is not None else train_cfg.get("seed", 0)
        if seq_len > cfg.max_seq_len:
            raise ValueError(
                f"--seq-len {seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}"
            )
        tokenizer = loaded.source / TOKENIZER_FILE
        data = build_loader(
            args.data, cfg.vocab_size, seq_len, batch, seed=seed, split=args.split,
            num_workers=0, epochs=1,
            tokenizer=str(tokenizer) if tokenizer.is_file() else None,
        )  # fmt: skip
        byte_lengths = None
        if loaded.tokenizer is not None:
            table = token_byte_lengths(loaded.tokenizer, cfg.vocab_size)
            byte_lengths = torch.tensor(table, dtype=torch.float64)
        n_batches = None if args.tokens is None else -(-args.tokens // (batch * seq_len))
        figures = evaluate(loaded.model, iter(data), n_batches, torch.device(device),
                           byte_lengths, prefix="eval")  # fmt: skip
    except (FileNotFoundError, ValueError, DataError) as e:
        parser.error(str(e))
    result = {
        "model": str(loaded.source), "data": args.data, "split": args.split, "seq_len": seq_len,
        "loss": figures["eval_loss"], "ppl": figures["eval_ppl"],
        "bpb": figures.get("eval_bpb"), "tokens": figures["eval_tokens"],
    }  # fmt: skip
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
