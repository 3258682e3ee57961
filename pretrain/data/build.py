"""A run's data sources, built for this rank from its RunConfig: the training stream (the
data family's builder, `_target_`, given one `DataContext`) and the held-out streams that
evaluation reads (data/source.py has the interface), also a saved run's val split for the
offline tools (`saved_val_data`), and where the data's documents end (`document_split`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from pretrain import dist
from pretrain.config import ConfigError, RunConfig, from_saved
from pretrain.data.source import DataContext, DataSource
from pretrain.data.stream import DataError, shards_source
from pretrain.model.documents import DocumentSplit


def data_context(run: RunConfig, split: str = "train") -> DataContext:
    """What this rank's data source is built for."""
    t, model = run.trainer, run.as_dict["model"]
    return DataContext(run.vocab_size, t.seq_len, t.micro_batch_size, run.grad_accum, t.seed,
                       dist.data_rank(), dist.data_size(), split, bool(model.get("document_mask")),
                       model.get("init_from"))  # fmt: skip


def build_data(run: RunConfig) -> DataSource:
    """This rank's stream of micro-batches (data/source.py `Batch`)."""
    return _instantiate_data(run.data, data_context(run))


def build_val_data(run: RunConfig) -> Iterator[torch.Tensor]:
    """This rank's share of the val split: every rank reads the split whole (as the one rank
    of one, so a val split of a single shard serves any number of ranks) and keeps every
    data_size()-th micro-batch from its data rank on. The same batches at every call."""
    stream = _val_source(run.data, data_context(run))
    return itertools.islice(stream, dist.data_rank(), None, dist.data_size())


def eval_batches(eval_tokens: int, micro_batch_size: int, seq_len: int, data_ranks: int) -> int:
    """Micro-batches each rank scores per evaluation: `eval_tokens` over all data ranks."""
    return -(-eval_tokens // (micro_batch_size * seq_len * data_ranks))


def saved_val_data(saved: dict[str, Any]) -> tuple[DataSource, int]:
    """The val split of a saved run (a checkpoint's `config`) as its in-loop evaluations read
    it (`build_val_data`), for one process: its data source as the one rank of one, and how
    many micro-batches an evaluation took over all of the run's data ranks (each rank took
    every data_size-th of them: together, the first ones of the split)."""
    t, model = saved["trainer"], saved["model"]
    ctx = DataContext(int(model["vocab_size"]), t["seq_len"], t["micro_batch_size"], 1, t["seed"],
                      documents=bool(model.get("document_mask")),
                      init_from=model.get("init_from"))  # fmt: skip
    source = _val_source(from_saved(saved, []).data, ctx)
    derived = saved.get("derived", {})  # (older checkpoints: no parallel section)
    ranks = derived.get("parallel", {}).get("data", derived.get("world_size", 1))
    return source, eval_batches(t["eval_tokens"], t["micro_batch_size"], t["seq_len"],
                                ranks) * ranks  # fmt: skip


def _val_source(data: Any, ctx: DataContext) -> DataSource:
    """The val split of `data` read whole, as the one rank of one (`ctx.alone`), in-process:
    an evaluation reads a few batches."""
    extra = {"num_workers": 0} if "num_workers" in data else {}
    return _instantiate_data(data, ctx.alone("val"), **extra)


def build_named_val_data(run: RunConfig, path: str, tokenizer: str | None) -> Iterator:
    """This rank's share of a trainer.eval_data set: a shard directory's val split, or every
    shard of a glob, read and strided like `build_val_data`."""
    manifest = Path(path).is_dir()  # a glob has no splits (all of it) and no tokenizer record
    ctx = data_context(run).alone("val" if manifest else "train")
    stream = shards_source(ctx, path=path, num_workers=0,
                           tokenizer=tokenizer if manifest else None)  # fmt: skip
    return itertools.islice(stream, dist.data_rank(), None, dist.data_size())


def document_split(model: dict[str, Any], data: DataSource) -> DocumentSplit | None:
    """Where the data's packed documents end, for a model (a run's model section) that keeps
    them apart (model.document_mask, model.document_positions=reset); None when it does not.
    A ConfigError when the data does not say (data=synthetic has no documents)."""
    reset = model.get("document_positions") == "reset"
    if not (model.get("document_mask") or reset):
        return None
    if data.eos_id is None:
        raise ConfigError([
            "model.document_mask / model.document_positions=reset need data that says which "
            "token ends a document (data=shards from tools/prepare_data.py, or data=demo); "
            "this data does not (data=synthetic has no documents; a glob of shards: set "
            "data.tokenizer): set model.document_mask=false and "
            "model.document_positions=continue"
        ])  # fmt: skip
    return DocumentSplit(data.eos_id, reset)


def _instantiate_data(data: Any, ctx: DataContext, **extra: object) -> DataSource:
    """The data source of a run's data section (its `_target_` builder) for `ctx`."""
    try:
        return instantiate(data, ctx, **extra)
    except InstantiationException as e:  # Hydra wraps the data source's own error
        if isinstance(e.__cause__, DataError):
            raise e.__cause__ from None
        raise


def check_val_data(run: RunConfig, data: DataSource) -> None:
    """With evaluations on, a missing val split fails now, not at step N."""
    if run.trainer.eval_every_steps:
        build_val_data(run)
        for path in run.trainer.eval_data.values():
            build_named_val_data(run, path, data.tokenizer)
