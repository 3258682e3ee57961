"""Held-out loss and perplexity: every rank scores its share, one all-reduce sums them.

The validation batches come from a fresh iterator each time (the same batches at every
evaluation, so the curve compares like with like), and the evaluation leaves the training
state as it found it: train/eval mode and the RNG streams are restored, so a run with
evaluations follows the same training curve as one without.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator

import torch
import torch.distributed as tdist
from tokenizers import Tokenizer

from pretrain import dist
from pretrain.config import RunConfig
from pretrain.data.build import build_named_val_data, build_val_data, eval_batches
from pretrain.data.source import Batch, DataSource, as_batch
from pretrain.data.tokenizer import load as load_tokenizer
from pretrain.data.tokenizer import token_byte_lengths
from pretrain.model.documents import DocumentSplit
from pretrain.model.loss import IGNORE_INDEX
from pretrain.train.module import TrainModule

LossFn = Callable[[Batch], torch.Tensor]
"""A micro-batch -> the mean next-token loss of the targets that count, scored in eval mode
(no dropout): `model_loss(model)`, or a TrainModule's `eval_loss`."""


def model_loss(model: torch.nn.Module, documents: DocumentSplit | None = None) -> LossFn:
    """`model`'s own training loss, `model(inputs, targets)`, in eval mode for each batch.
    With `documents` (a model that keeps packed documents apart), each batch's documents
    are passed as training passes them (its own, else those its EOS tokens end); without,
    the model scores the window as one text."""

    def loss_of(batch: Batch) -> torch.Tensor:
        extra = {}
        if documents is not None:
            extra["documents"] = documents.ids(batch.inputs, batch.documents)
        was_training = model.training
        model.eval()
        try:
            return model(batch.inputs, batch.targets, **extra)
        finally:
            model.train(was_training)

    return loss_of


@torch.no_grad()
def evaluate(
    loss_of: LossFn, batches: Iterator[torch.Tensor | Batch], n_batches: int | None,
    device: torch.device, byte_lengths: torch.Tensor | None = None, prefix: str = "val",
) -> dict[str, float]:  # fmt: skip
    """Mean next-token loss over `n_batches` micro-batches on every rank, weighted by the
    targets that count in each (a fine-tuning batch ignores its prompts) (None:
    until `batches` ends; only with one rank, since ranks must run the same count).

    Scored by the training loss itself (`loss_of`: a DeepSpeed engine's gathers ZeRO-3
    shards as it goes, which is why every rank runs the same count): the same function over
    the same (padded) vocabulary as training, chunked so no (B, T, V) logits exist; what
    the exported model's softmax computes too. With `byte_lengths` (V,), the UTF-8 bytes
    each token id stands for, also bits per byte: the summed loss in bits over the bytes of
    the predicted text, comparable between tokenizers. Training's random stream is left as
    it was.
    """
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
    if byte_lengths is not None:
        byte_lengths = byte_lengths.to(device)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        for batch in itertools.islice(batches, n_batches):
            batch = as_batch(batch).to(device, non_blocking=True)
            targets = batch.targets
            counted = targets != IGNORE_INDEX
            mean = loss_of(batch)  # over the counted targets
            totals[0] += mean.double() * counted.sum()
            totals[1] += counted.sum()
            if byte_lengths is not None:
                totals[2] += byte_lengths[targets[counted]].sum().double()
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(totals)
        totals /= dist.sequence_size()  # each rank of a sequence group counted the whole batch
    nats, tokens, n_bytes = totals.tolist()
    if tokens == 0:
        raise ValueError("no evaluation batches: the data holds fewer tokens than one batch")
    return _figures(prefix, nats, int(tokens), n_bytes if byte_lengths is not None else 0)


@torch.no_grad()
def score_documents(
    model: torch.nn.Module, docs: list[list[int]], prefix: int, seq_len: int,
    doc_bytes: list[int] | None, device: torch.device, prefix_name: str = "eval",
) -> dict[str, float]:  # fmt: skip
    """Loss over whole documents, each scored from a `prefix` token (the end-of-text token our
    shards put between documents) in rolling windows: the first predicts up to `seq_len`
    tokens, each later one the next `seq_len` (the last fewer) with the `seq_len` tokens
    before them as input. This is lm-evaluation-harness's `loglikelihood_rolling` windowing,
    so its perplexities and bits per byte equal these for the same `seq_len`."""
    was_training = model.training
    model.eval()
    nats, tokens = 0.0, 0
    for doc in docs:
        full = torch.tensor([prefix, *doc], device=device)  # targets are full[1:]
        start = 1
        while start < len(full):
            end = min(start + seq_len, len(full))  # targets full[start:end]
            first = max(0, end - 1 - seq_len)
            inputs = full[first : end - 1]
            targets = full[first + 1 : end].clone()
            targets[: len(targets) - (end - start)] = IGNORE_INDEX  # context, not scored
            mean = model(inputs[None], targets[None])  # the training loss, as in `evaluate`
            nats += mean.item() * (end - start)
            tokens += end - start
            start = end
    model.train(was_training)
    if tokens == 0:
        raise ValueError("no tokens to score: every document is empty")
    return _figures(prefix_name, nats, tokens, sum(doc_bytes) if doc_bytes else 0)


def _figures(prefix: str, nats: float, tokens: int, n_bytes: float) -> dict[str, float]:
    """Mean loss, perplexity, tokens and (when the bytes are known) bits per byte."""
    mean = nats / tokens
    out = {f"{prefix}_loss": mean, f"{prefix}_ppl": math.exp(min(mean, 700.0)),
           f"{prefix}_tokens": tokens}  # fmt: skip
    if n_bytes > 0:
        out[f"{prefix}_bpb"] = nats / math.log(2) / n_bytes
    return out


def byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) UTF-8 bytes behind each token id, for `evaluate`'s bits per byte."""
    return torch.tensor(token_byte_lengths(tokenizer, vocab_size), dtype=torch.float64)


class Evaluator:
    """What the trainer calls every `trainer.eval_every_steps`: each held-out set, by its
    metric prefix ("val", "val_<name>"), from a fresh stream of `n_batches` micro-batches per
    rank, scored by `evaluate`."""

    def __init__(
        self, loss_of: LossFn, sets: dict[str, Callable[[], Iterator[torch.Tensor | Batch]]],
        n_batches: int, device: torch.device, byte_lengths: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        self.loss_of, self.sets = loss_of, sets
        self.n_batches, self.device, self.byte_lengths = n_batches, device, byte_lengths

    def __call__(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for prefix, make_batches in self.sets.items():
            out.update(evaluate(self.loss_of, iter(make_batches()), self.n_batches, self.device,
                                self.byte_lengths, prefix))  # fmt: skip
        return out


def build_evaluator(
    run: RunConfig, module: TrainModule, train_data: DataSource
) -> Evaluator | None:
    """trainer.eval_every_steps > 0: the held-out scorer, `eval_tokens` over all ranks per set
    (with bits per byte when the training data names its tokenizer)."""
    t = run.trainer
    if not t.eval_every_steps:
        return None
    n_batches = eval_batches(t.eval_tokens, t.micro_batch_size, t.seq_len, run.parallel.data)
    tokenizer = train_data.tokenizer
    # Bits per byte need the bytes behind each token id.
    table = byte_lengths(load_tokenizer(tokenizer), run.vocab_size) if tokenizer else None
    sets = {"val": lambda: build_val_data(run)}
    for name, path in t.eval_data.items():  # their tokenizer was checked once, at start
        sets[f"val_{name}"] = functools.partial(build_named_val_data, run, path, None)
    return Evaluator(module.eval_loss, sets, n_batches, module.device, table)
