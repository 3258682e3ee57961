"""The data seam: what the training loop, checkpoints and evaluation need from a data source
(`DataSource`), and what every source is built for (`DataContext`).

A data family is a builder `f(ctx: DataContext, **fields) -> DataSource`, named by the
`_target_` of its config group entry (conf/data/*.yaml, schema in config/schema.py); the
fields are the group's own keys. Today's families:

- data=synthetic: `pretrain.data.synthetic.synthetic_source` (no I/O, exact on any layout);
- data=shards: `pretrain.data.stream.shards_source` (webdataset token shards);
- data=demo: `pretrain.data.corpus.demo_source` (the embedded stdlib corpus, as shards);
- data=sft: `pretrain.data.sft.sft_source` (conversations, loss on the assistant's tokens).

A micro-batch is a `Batch`: the tokens, and, where the source knows more than the tokens
say, the targets that count (`labels`) and the document each position belongs to
(`documents`). A source of plain token windows may yield the (B, T + 1) tensor alone;
`as_batch` makes it a Batch.

Adding one: write the builder and a schema dataclass with its `_target_`, store it as a
group entry, and implement every member of `DataSource`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class DataContext:
    """What a data source is built for: the model's vocabulary, the batch geometry, the seed,
    and this rank's place among the data-parallel ranks."""

    vocab_size: int
    """Token ids must be below it (the model's embedding rows)."""
    seq_len: int
    """Each sample is seq_len + 1 tokens: inputs [:-1], targets [1:]."""
    micro_batch_size: int
    grad_accum: int
    """Micro-batches per optimizer step on each rank (a source whose global batch must not
    depend on the layout, like data=synthetic, needs it)."""
    seed: int
    data_rank: int = 0
    """This rank's index among the data-parallel ranks (`pretrain.dist.data_rank()`)."""
    data_size: int = 1
    """How many data-parallel ranks share the data (`pretrain.dist.data_size()`)."""
    split: str = "train"
    """train, or val: the held-out split."""
    documents: bool = False
    """The model masks attention between packed documents (model.document_mask): a source
    that knows its documents may pack several into one window (`Batch.documents`)."""
    init_from: str | None = None
    """The pretrained model directory the run starts from (model.init_from), whose tokenizer
    a fine-tuning source reads by default."""

    def alone(self, split: str) -> DataContext:
        """This context as the one rank of one, one micro-batch per step, reading `split`:
        how evaluation reads a held-out split whole before striding it over the ranks."""
        return replace(self, data_rank=0, data_size=1, grad_accum=1, split=split)


@dataclass(frozen=True)
class Batch:
    """One micro-batch: `tokens` (B, T + 1), inputs [:, :-1] and targets [:, 1:], with what a
    source knows beyond the tokens."""

    tokens: torch.Tensor
    labels: torch.Tensor | None = None
    """(B, T) the targets, IGNORE_INDEX (-100) where a position predicts nothing (a prompt,
    padding); None: every target counts (tokens[:, 1:])."""
    documents: torch.Tensor | None = None
    """(B, T) int32, the document each input position belongs to (ids rising along a row):
    conversations packed into one window; None: the model finds documents by their EOS
    (`DataSource.eos_id`) if it keeps them apart."""
    weight: float | None = None
    """How much this micro-batch's mean loss counts in its optimizer step, against an equal
    share: its counted targets x the step's micro-batches (every rank's) / the step's counted
    targets, so the step's loss is the mean over all its counted targets however unevenly the
    micro-batches hold them (fine-tuning: replies of every length); None: 1."""

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        return self.tokens[:, 1:] if self.labels is None else self.labels

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(move(self.tokens), move(self.labels), move(self.documents), self.weight)


def as_batch(batch: torch.Tensor | Batch) -> Batch:
    """A source's micro-batch as a `Batch` (a plain (B, T + 1) tensor: tokens alone)."""
    return batch if isinstance(batch, Batch) else Batch(batch)


@runtime_checkable
class DataSource(Protocol):
    """This rank's endless (or `data.epochs`-long) stream of micro-batches, each a `Batch`
    or a LongTensor (micro_batch_size, seq_len + 1) of tokens alone, with its position for
    exact resume."""

    tokenizer: str | None
    """The tokenizer file (or `bytes`) the tokens were made with; None when unknown (no
    bits per byte, no tokenizer.json in checkpoints or exports)."""
    tokenizer_sha256: str | None
    """That tokenizer's fingerprint, kept in checkpoints: a resume on data of another
    tokenizer is refused unless `allow_tokenizer_change`."""
    allow_tokenizer_change: bool
    eos_id: int | None
    """The token id that ends each document in the stream (models that keep packed
    documents apart need it: model.document_mask); None when the stream has no documents
    or their end is unknown. A source whose batches carry their documents (`Batch.documents`)
    still names its tokenizer's, for batches that do not (trainer.eval_data shards)."""
    chat_template: str | None
    """The Jinja chat template the source rendered its conversations with (data=sft): kept
    in checkpoints and exports, so the model is prompted as it was trained; None for text."""

    def __iter__(self) -> Iterator[torch.Tensor | Batch]: ...

    def __next__(self) -> torch.Tensor | Batch:
        """The next micro-batch; StopIteration when a finite stream ends."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """This rank's position, saved in its checkpoint shard."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state_dict()` was taken (the same layout)."""
        ...

    def load_resharded_state(self, states: list[dict[str, Any]], step: int) -> None:
        """Continue after `step` optimizer steps from the saved states of every rank of a run
        with another number of data ranks (as exactly as the source can)."""
        ...

    def metrics(self) -> dict[str, float]:
        """The source's own figures for the step's record (e.g. skipped shards); {} if none."""
        ...
