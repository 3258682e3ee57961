"""Perplexity and bits per byte of a trained model on token shards: the in-loop validation
measurement, offline.

    python tools/eval_ppl.py runs/demo
    python tools/eval_ppl.py runs/demo --data ~/.cache/pretrain/demo/shards
    python tools/eval_ppl.py out/hf --data 'shards/val-*.tar' --tokens 1000000 --seq-len 2048
    python tools/eval_ppl.py runs/demo --text docs.jsonl --seq-len 512

Without --data or --text, a run (or a step_N dir) is scored on its own val split as its in-loop
validation read it, whatever its data (demo, shards, sft conversations): the same windows,
documents (model.document_mask / document_positions=reset) and counted targets (fine-tuning
scores the replies alone), trainer.eval_tokens of them unless --tokens says otherwise, on a
GPU in the run's precision; the loss equals the run's last val_loss when the checkpoint is
of that step.

--data is a tools/prepare_data.py directory (its --split, default val) or a glob / URL list
of shards (read whole). Windows of --seq-len + 1 tokens every --seq-len tokens, as training
reads them; without --tokens the whole split is scored. From a checkpoint, --seq-len,
--batch-size and --seed default to its training values, so with --tokens set to its
trainer.eval_tokens this scores the very windows of its last in-loop validation. Prints one
JSON object (loss, ppl, bpb, tokens) and writes it to --output when given.

--text scores documents instead (a .jsonl of {"text": ...}, or a text file as one
document): each from the end-of-text token, in lm-evaluation-harness's rolling windows, so
`bpb` equals its `bits_per_byte` for a `loglikelihood_rolling` task on the same documents
with max_length = --seq-len (tools/eval_harness.py sets that prefix token).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pretrain.checkpoint import manager
from pretrain.checkpoint.export import TOKENIZER_FILE, check_same_tokenizer, find_checkpoint
from pretrain.config import ConfigError
from pretrain.data.build import document_split, saved_val_data
from pretrain.data.stream import DataError, build_loader
from pretrain.data.tokenizer import eos_id
from pretrain.eval.load import Loaded, load_model, pick_device
from pretrain.eval.perplexity import byte_lengths, evaluate, model_loss, score_documents


def trained(source: Path) -> dict:
    """The trainer section the checkpoint was trained with (empty for an HF dir)."""
    if not manager.is_complete(source):
        return {}
    return manager.read_client_state(source)["config"]["trainer"]


def score_shards(
    loaded: Loaded, args: argparse.Namespace, seq_len: int, batch: int, seed: int,
    device: torch.device,
) -> dict[str, float]:  # fmt: skip
    """Windows of the shards, as training reads them."""
    tokenizer = loaded.source / TOKENIZER_FILE
    data = build_loader(
        args.data, loaded.model.config.vocab_size, seq_len, batch, seed=seed,
        split=args.split or "val",
        num_workers=0, epochs=1, tokenizer=str(tokenizer) if tokenizer.is_file() else None,
        allow_tokenizer_change=args.allow_tokenizer_change,
    )  # fmt: skip
    if manager.is_complete(loaded.source):  # also for a checkpoint that carries no tokenizer
        saved = manager.read_client_state(loaded.source).get("data_tokenizer_sha256")
        check_same_tokenizer(loaded.source, saved, data.tokenizer_sha256,
                             args.allow_tokenizer_change, "--allow-tokenizer-change",
                             resuming=False)  # fmt: skip
    table = None
    if loaded.tokenizer is not None:
        table = byte_lengths(loaded.tokenizer, loaded.model.config.vocab_size)
    n_batches = None if args.tokens is None else -(-args.tokens // (batch * seq_len))
    return evaluate(model_loss(loaded.model), iter(data), n_batches, device, table,
                    prefix="eval")  # fmt: skip


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def own_split_dtype(args: argparse.Namespace, device: str) -> torch.dtype | None:
    """On a GPU, a run scored on its own split loads in the precision it trained (and
    evaluated) in, not load_model's bf16; elsewhere load_model's default."""
    if args.data is not None or args.text is not None or device != "cuda":
        return None
    try:
        saved = manager.read_client_state(find_checkpoint(args.model))["config"]
    except (FileNotFoundError, ValueError):  # not a run: score_run_val names it
        return None
    return PRECISIONS.get(saved.get("precision"))


def score_run_val(
    loaded: Loaded, tokens: int | None, device: torch.device
) -> dict[str, float]:  # fmt: skip
    """The run's own val split, as its in-loop evaluations read it (module docstring)."""
    if not manager.is_complete(loaded.source):
        raise ValueError(f"{loaded.source} is not a run's checkpoint, which has no val split of "
                         "its own: give --data (shards) or --text (documents)")  # fmt: skip
    state = manager.read_client_state(loaded.source)
    saved = state["config"]
    data, n_batches = saved_val_data(saved)
    check_same_tokenizer(loaded.source, state.get("data_tokenizer_sha256"),
                         data.tokenizer_sha256, resuming=False)  # fmt: skip
    t = saved["trainer"]
    if tokens is not None:
        n_batches = -(-tokens // (t["micro_batch_size"] * t["seq_len"]))
    table = None
    if loaded.tokenizer is not None:
        table = byte_lengths(loaded.tokenizer, loaded.model.config.vocab_size)
    documents = document_split(saved["model"], data)
    return evaluate(model_loss(loaded.model, documents), iter(data), n_batches, device, table,
                    prefix="eval")  # fmt: skip


def score_text(loaded: Loaded, path: Path, seq_len: int, device: torch.device) -> dict[str, float]:
    """Whole documents, each from the end-of-text token, in rolling windows."""
    if loaded.tokenizer is None:
        raise ValueError(f"{loaded.source} has no tokenizer.json to encode --text with")
    if path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        docs = [json.loads(line)["text"] for line in lines if line.strip()]
    else:
        docs = [path.read_text(encoding="utf-8")]
    tok = loaded.tokenizer
    ids = [tok.encode(d).ids for d in docs]
    n_bytes = [len(d.encode("utf-8")) for d in docs]
    return score_documents(loaded.model, ids, eos_id(tok), seq_len, n_bytes, device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="run dir, checkpoints/step_N dir or HF dir")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="shard directory, glob or URLs (default: the run's val "
                        "split, as its in-loop validation read it)")  # fmt: skip
    source.add_argument("--text", type=Path, help="documents: .jsonl of {text}, or a text file")
    parser.add_argument("--split", default=None, help="split of a --data shard directory "
                        "(default: val)")  # fmt: skip
    parser.add_argument("--tokens", type=int, default=None,
                        help="score this many (default: all of --data or --text; the run's "
                        "trainer.eval_tokens of its own split)")  # fmt: skip
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
    parser.add_argument("--allow-tokenizer-change", action="store_true",
                        help="score shards made with another tokenizer than the model's data "
                        "(refused by default: the ids would mean other text)")  # fmt: skip
    parser.add_argument("--output", type=Path, help="also write the figures here (JSON)")
    args = parser.parse_args()
    given = {
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "split": args.split,
        "allow_tokenizer_change": args.allow_tokenizer_change or None,
    }
    own = [f for f, v in given.items() if v is not None]
    if args.data is None and args.text is None and own:
        parser.error(f"--{own[0].replace('_', '-')} is for --data or --text: the run's own val "
                     "split is read with the run's settings")  # fmt: skip
    device = pick_device(args.device)
    try:
        loaded = load_model(args.model, device, own_split_dtype(args, device))
        cfg = loaded.model.config
        train_cfg = trained(loaded.source)
        seq_len = args.seq_len or train_cfg.get("seq_len") or min(cfg.max_seq_len, 2048)
        batch = args.batch_size or train_cfg.get("micro_batch_size") or 8
        seed = args.seed if args.seed is not None else train_cfg.get("seed", 0)
        if seq_len > cfg.max_seq_len:
            raise ValueError(
                f"--seq-len {seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}"
            )
        if args.text is not None:
            figures = score_text(loaded, args.text, seq_len, torch.device(device))
        elif args.data is not None:
            figures = score_shards(loaded, args, seq_len, batch, seed, torch.device(device))
        else:
            figures = score_run_val(loaded, args.tokens, torch.device(device))
    except (FileNotFoundError, ValueError, DataError, ConfigError) as e:
        parser.error(str(e))
    result = {
        "model": str(loaded.source), "data": args.data or str(args.text or "the run's own"),
        "split": (args.split or "val") if args.text is None else None, "seq_len": seq_len,
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
