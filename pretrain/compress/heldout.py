"""What a compression costs: a model's held-out loss, perplexity and bits per byte as
transformers computes them, on the same windows before and after, and the size of its
weight files; and the source turned into a Hugging Face directory to compress.

The windows are the run's val split (data=demo: its cache; data=shards: data.path), or
`--data` (a tools/prepare_data.py directory's val split, or a glob of shards read whole),
read as tools/eval_ppl.py reads them: seq_len + 1 tokens, the trained seq_len, micro-batch
and seed. A fine-tuning run (data=sft) is measured on its own val conversations as its
in-loop validation read them (`data/build.saved_val_data`): the replies alone count, and
packed conversations keep apart (model.document_mask, document_positions=reset, given to
transformers as a 4D mask and position ids). The loss is transformers' logits against the
targets, so loading the written directory in transformers gives the report's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pretrain.checkpoint import manager
from pretrain.checkpoint.export import TOKENIZER_FILE, export_hf, find_checkpoint
from pretrain.data.build import document_split, saved_val_data
from pretrain.data.source import Batch
from pretrain.data.stream import DataError, build_loader
from pretrain.eval.perplexity import byte_lengths, evaluate
from pretrain.model.documents import DocumentSplit, document_mask, positions_in_documents

TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class HeldOut:
    """The windows a compression is measured on."""

    data: str
    """The shard directory (its val split) or glob; or, with `saved`, what it is."""
    split: str
    seq_len: int
    batch: int
    seed: int
    tokens: int | None
    """At most this many target tokens (None: the whole split; with `saved`, the run's
    trainer.eval_tokens)."""
    saved: dict[str, Any] | None = None
    """A run's config, when its own data source reads its val split (data=sft)."""

    def read(self, vocab_size: int, tokenizer: str | None) -> Read:
        """The batches, how many to score (None: all), and the documents to keep apart."""
        n_batches = None if self.tokens is None else -(-self.tokens // (self.batch * self.seq_len))
        if self.saved is None:
            return Read(iter(build_loader(
                self.data, vocab_size, self.seq_len, self.batch, seed=self.seed,
                split=self.split, num_workers=0, epochs=1, tokenizer=tokenizer,
            )), n_batches, None, False)  # fmt: skip
        source, per_eval = saved_val_data(self.saved)
        model = self.saved["model"]
        return Read(iter(source), per_eval if n_batches is None else n_batches,
                    document_split(model, source),
                    bool(model.get("document_mask")))  # fmt: skip


@dataclass(frozen=True)
class Read:
    """What `HeldOut.read` gives `measure`."""

    batches: Iterator[torch.Tensor | Batch]
    n_batches: int | None
    documents: DocumentSplit | None
    """Where packed documents end, for a model that keeps them apart (else None)."""
    masked: bool
    """Attention stays inside each document (model.document_mask)."""


def saved_config(source: Path) -> dict[str, Any] | None:
    """The config a run dir's newest checkpoint (or a step_N dir) was trained with; None for
    an HF directory."""
    if (source / "config.json").is_file():
        return None
    return manager.read_client_state(find_checkpoint(source))["config"]


def held_out(source: Path, data: str | None, tokens: int | None) -> HeldOut:
    """The held-out windows for `source` (a run dir, a step_N dir or an HF dir): `data`, or
    the run's val split; the run's seq_len, micro-batch and seed (an HF dir: 2048 capped by
    the model, 8, 0)."""
    saved = saved_config(source)
    trainer = saved["trainer"] if saved is not None else {}
    seq_len = trainer.get("seq_len") or _max_seq_len(source)
    batch, seed = trainer.get("micro_batch_size", 8), trainer.get("seed", 0)
    if data is None and saved is not None and saved["data"]["_target_"].endswith("sft_source"):
        return HeldOut("the run's val conversations", "val", seq_len, batch, seed, tokens, saved)
    if data is None:
        data = _run_val_data(saved) if saved is not None else None
        if data is None:
            raise ValueError(
                f"{source}: no held-out split to measure on (an HF directory, or a run whose "
                "data is neither data=demo, data=shards with a path nor data=sft): give --data "
                "(a tools/prepare_data.py directory or a glob of shards)"
            )
    return HeldOut(data, "val", seq_len, batch, seed, tokens)


def _run_val_data(saved: dict[str, Any]) -> str | None:
    data = saved["data"]
    target = data.get("_target_", "")
    if target.endswith("demo_source"):
        return str(Path(data["cache_dir"]).expanduser() / "shards")
    if target.endswith("shards_source") and data.get("path"):
        return str(data["path"])
    return None


def _max_seq_len(hf_dir: Path) -> int:
    config = json.loads((hf_dir / "config.json").read_text())
    return min(int(config.get("max_position_embeddings", 2048)), 2048)


def hf_config(source: Path) -> dict[str, Any]:
    """The HF config.json of `source` (a run's: from its saved model section, before any
    export), to check a request against before any work."""
    saved = saved_config(source)
    if saved is None:
        return json.loads((source / "config.json").read_text())
    from pretrain.model.family import family_of, model_fields

    model = saved["model"]
    hf = family_of(model).hf
    if hf is None:
        raise ValueError(f"{source} holds a {model.get('_target_')}, which has no Hugging "
                         "Face counterpart to compress")  # fmt: skip
    return hf.config(model_fields(model), "float32", {})


def hf_directory(source: Path, scratch: Path) -> Path:
    """`source` as a Hugging Face directory: itself, or a run's newest checkpoint (or a
    step_N dir) exported under `scratch`."""
    if (source / "config.json").is_file():
        return source
    return export_hf(source, scratch / "source_hf")


def hf_loss(
    model: torch.nn.Module, documents: DocumentSplit | None = None, masked: bool = False
) -> Callable[[Batch], torch.Tensor]:  # fmt: skip
    """The mean next-token loss of a transformers causal LM (its own logits) over the targets
    that count. With `documents`, each batch's documents as our model sees them: a 4D mask
    (within each document when `masked`, else causal) and positions (restarting at each
    document with reset), given explicitly so transformers infers neither."""

    @torch.no_grad()
    def loss_of(batch: Batch) -> torch.Tensor:
        extra: dict[str, torch.Tensor] = {}
        if documents is not None:
            ids = documents.ids(batch.inputs, batch.documents)
            allowed = document_mask(ids if masked else torch.zeros_like(ids))
            zeros = torch.zeros(allowed.shape, dtype=model.dtype, device=allowed.device)
            extra["attention_mask"] = zeros.masked_fill(~allowed, torch.finfo(model.dtype).min)
            if documents.reset:
                extra["position_ids"] = positions_in_documents(ids)
            else:
                extra["position_ids"] = torch.arange(ids.size(1), device=ids.device).expand_as(ids)
        logits = model(batch.inputs, **extra).logits.float()
        targets = batch.targets.flatten()
        total = F.cross_entropy(logits.flatten(0, 1), targets, ignore_index=-100, reduction="sum")
        return total / (targets != -100).sum().clamp(min=1)  # 0, not NaN, when none counts

    return loss_of


def measure(model: torch.nn.Module, hf_dir: Path, heldout: HeldOut) -> dict[str, float]:
    """Loss, perplexity, bits per byte (with a tokenizer) and tokens of transformers' `model`
    (its tokenizer in `hf_dir`) on the held-out windows."""
    from tokenizers import Tokenizer

    vocab = model.config.vocab_size
    tokenizer = hf_dir / TOKENIZER_FILE
    table, name = None, None
    if tokenizer.is_file():
        table, name = byte_lengths(Tokenizer.from_file(str(tokenizer)), vocab), str(tokenizer)
    read = heldout.read(vocab, name)
    figures = evaluate(hf_loss(model.eval(), read.documents, read.masked), read.batches,
                       read.n_batches, torch.device("cpu"), table, prefix="eval")  # fmt: skip
    return {k.removeprefix("eval_"): v for k, v in figures.items()}


def weight_bytes(hf_dir: Path) -> int:
    """The size of a directory's weight files."""
    return sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def staging(output: Path) -> Path:
    """An empty directory beside `output` to write it in (`publish` moves it into place)."""
    tmp = output.with_name(output.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def publish(tmp: Path, output: Path, name: str, report: dict[str, Any]) -> None:
    """`report` as JSON in `tmp/name`, then `tmp` renamed to `output`: complete or absent."""
    (tmp / name).write_text(json.dumps(report, indent=2) + "\n")
    if output.exists():
        shutil.rmtree(output)
    os.replace(tmp, output)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """What both compression tools take: the source, --output, --data, --tokens."""
    parser.add_argument("model", type=Path, help="run dir, checkpoints/step_N dir or HF dir")
    parser.add_argument("--output", type=Path, required=True, help="the directory to write")
    parser.add_argument("--data", help="held-out shards (default: the run's val split)")
    parser.add_argument("--tokens", type=int, default=None, help="score at most this many")


def run_tool(
    parser: argparse.ArgumentParser, work: Callable[[argparse.Namespace, Path], dict]
) -> None:
    """Parse the arguments, run `work(args, scratch)` (a directory removed after), print its
    report; bad input exits 2 with the reason."""
    args = parser.parse_args()
    if not torch.cuda.is_available():  # a run's shards consolidate on CPU; fine-tuning (prune)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # trains where resolve() puts it
    if not args.model.exists():
        parser.error(f"{args.model} does not exist: give a run dir, a step_N dir or an HF dir")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            report = work(args, Path(scratch))
        except (FileNotFoundError, ValueError, DataError) as e:
            parser.error(str(e))
    print(json.dumps(report, indent=2))
