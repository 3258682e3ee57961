"""The model seam: what the rest of the framework needs from a model family (`ModelFamily`),
and from its Hugging Face counterpart (`HFAdapter`). Nothing else in the package names a
model class; it asks `family_of(model_section)`.

A family is found by its config's `_target_` (the model class). Today's: the Llama-style
Transformer (model/llama_family.py: tiny, llama_*), and the seeds' LSTM and
TransformerEncoder baselines (model/baselines.py, `PlainFamily`). Any other importable class
trains as a `PlainFamily` (no MFU, no per-block transformations, no export). Adding a
first-class one: write the module and its schema dataclass (config/schema.py, with
`_target_`, stored in the model group), implement `ModelFamily` (and `HFAdapter` if
transformers has the architecture), and list it in `families()` below.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn

from pretrain.model.expert_parallel import ExpertShard
from pretrain.model.sequence import SequenceShard

log = logging.getLogger("pretrain")


class HFAdapter(Protocol):
    """Our model <-> a transformers `*ForCausalLM` directory (export, model.init_from,
    evaluation of any HF checkpoint of the architecture)."""

    model_types: tuple[str, ...]
    """The transformers `model_type`s (config.json) it reads and writes, e.g. (llama,)."""

    def config(self, fields: Mapping[str, Any], dtype: str, special_ids: dict[str, int]
               ) -> dict[str, Any]:  # fmt: skip
        """config.json for a model of our section `fields`, stored in `dtype`."""
        ...

    def to_hf(self, state: dict[str, torch.Tensor], fields: Mapping[str, Any]
              ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Our full state dict under transformers' names, as transformers holds it (e.g.
        the vocabulary tables without our padding rows, tied weights once)."""
        ...

    def fields_from_hf(self, config: dict[str, Any]) -> dict[str, Any]:
        """Our model section (with `_target_`) for a transformers config.json; ValueError
        for a config of another architecture."""
        ...

    def mismatches(self, config: dict[str, Any], fields: Mapping[str, Any]) -> list[str]:
        """Why HF weights of `config` cannot initialise our model `fields` (each differing
        key, with both values); [] when they fit."""
        ...

    def our_parts(self, hf_name: str, fields: Mapping[str, Any]
                  ) -> list[tuple[str, tuple[int | slice, ...]]]:  # fmt: skip
        """What HF tensor `hf_name` sets: each (our parameter, the index of the part of it;
        () for all of it, e.g. (e, slice(0, I)) for expert e's gate in a fused tensor); []
        for nothing."""
        ...


class ModelFamily(Protocol):
    """One kind of model: how it is built, checked, parallelized, costed and exported."""

    target: str
    """The `_target_` of its config section (the class built)."""
    shape_keys: tuple[str, ...]
    """Config fields that change what the weights mean: a checkpoint resumes only into the
    same values (the others, e.g. the attention kernel, may change between runs)."""
    hf: HFAdapter | None
    """Its transformers counterpart; None: no HF export or import."""
    block: str | None
    """Class name of its repeated unit, the one `parallelize` compiles and ZeRO-3 must gather
    whole (deepspeed.stage3_leaf_modules) when compiled; None: it has none."""

    def build(self, fields: Mapping[str, Any], expert: ExpertShard | None = None) -> nn.Module:
        """A model with fresh weights, from its config section (without `_target_` or
        `init_from`). Its `forward(tokens, targets)` returns the mean next-token loss over
        `table_rows` logits; without targets, the logits of the real vocabulary. `expert`:
        this rank's place in its expert-parallel group (parallel.expert > 1, which only a
        family whose `expert_errors` allows it gets): the model holds and runs its share of
        the experts (model/expert_parallel.py)."""
        ...

    def errors(self, fields: Mapping[str, Any]) -> list[str]:
        """Every inconsistency in the section, each naming its key and the fix."""
        ...

    def table_rows(self, fields: Mapping[str, Any]) -> int:
        """Rows of the vocabulary tables (the softmax's width): vocab_size, or padded."""
        ...

    def saved_fields(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """A section as a checkpoint saved it, completed with the defaults that applied when
        keys added since did not exist yet."""
        ...

    def sequence_errors(self, fields: Mapping[str, Any], size: int, seq_len: int) -> list[str]:
        """Why a model of `fields` cannot train with sequences of `seq_len` split over
        `size` ranks (parallel.sequence > 1), each naming its key and the fix; [] when it
        can."""
        ...

    def expert_errors(self, fields: Mapping[str, Any], size: int) -> list[str]:
        """Why a model of `fields` cannot split its experts over `size` ranks
        (parallel.expert > 1), each naming its key and the fix; [] when it can."""
        ...

    def parallelize(
        self, model: nn.Module, activation_checkpointing: str, compile: bool, zero3: bool,
        sequence: SequenceShard | None = None,
    ) -> None:  # fmt: skip
        """Apply, in place and from outside the model, sequence parallelism (`sequence`:
        this rank's place in its group; the model then runs on its slice of each sequence,
        at its global positions, model/sequence.py), activation checkpointing (none | full
        | selective) and torch.compile, at the granularity the family has (a Transformer's
        blocks); `zero3`: its parameters are ZeRO-3 shards whose fetch hooks must stay
        outside compiled code. Parameter names must not change (checkpoints)."""
        ...

    def flops_per_token(self, fields: Mapping[str, Any], seq_len: int) -> float | None:
        """Training FLOPs per token (forward and backward) at `seq_len`, for MFU; None when
        the family has no count."""
        ...

    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        """Figures the model adds to each step's record (e.g. a router's load), gathered
        over the step's micro-batches on this rank and reset by the call; {} for none."""
        ...

    def after_step(self, model: nn.Module, stepped: bool) -> None:
        """What the model does after each optimizer step, on every rank (collectives
        allowed), outside autograd: e.g. a router's bias balancing. `stepped` false: the
        update was skipped."""
        ...


class PlainFamily:
    """A model class as a family with nothing beyond the loop's basics: built from its
    fields, no per-block transformations (asked for, they are warned about and ignored), no
    FLOP count (no MFU), no Hugging Face counterpart. The seed baselines are plain; so is
    any other `_target_` class, which trains as it did before families existed."""

    hf = None
    block = None

    def __init__(self, target: str, shape_keys: tuple[str, ...]) -> None:
        self.target = target
        self.shape_keys = ("_target_", *shape_keys)

    def build(self, fields: Mapping[str, Any], expert: ExpertShard | None = None) -> nn.Module:
        assert expert is None, "expert_errors refuses expert parallelism"
        module, _, name = self.target.rpartition(".")
        return getattr(importlib.import_module(module), name)(**fields)

    def errors(self, fields: Mapping[str, Any]) -> list[str]:
        return [f"model.{k}={fields[k]}: must be >= 1" for k in self.shape_keys[1:]
                if isinstance(fields.get(k), int) and not isinstance(fields[k], bool)
                and fields[k] < 1]  # fmt: skip

    def table_rows(self, fields: Mapping[str, Any]) -> int:
        return int(fields.get("vocab_size", 0))

    def saved_fields(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        return dict(fields)

    def sequence_errors(self, fields: Mapping[str, Any], size: int, seq_len: int) -> list[str]:
        return [
            f"parallel.sequence={size}: {self.target} has no sequence parallelism (only "
            "the Llama family splits attention over ranks); use parallel.sequence=1"
        ]

    def expert_errors(self, fields: Mapping[str, Any], size: int) -> list[str]:
        return [no_experts_error(self.target, size)]

    def parallelize(
        self, model: nn.Module, activation_checkpointing: str, compile: bool, zero3: bool,
        sequence: SequenceShard | None = None,
    ) -> None:  # fmt: skip
        assert sequence is None, "sequence_errors refuses sequence parallelism"
        if activation_checkpointing != "none" or compile:
            log.warning(
                "trainer.compile / trainer.activation_checkpointing apply per Transformer "
                "block; %s has no such blocks, so they are ignored", type(model).__name__,
            )  # fmt: skip

    def flops_per_token(self, fields: Mapping[str, Any], seq_len: int) -> float | None:
        return None

    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        return {}

    def after_step(self, model: nn.Module, stepped: bool) -> None:
        return None


def no_experts_error(target: str, size: int) -> str:
    return (f"parallel.expert={size}: {target} has no experts to split (a mixture-of-experts "
            "model has: model=moe_tiny, moe_1b, ...); use parallel.expert=1")  # fmt: skip


GENERIC_SHAPE_KEYS = (
    "n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size",
    "tie_embeddings", "rope_theta", "norm_eps", "max_seq_len",
)  # fmt: skip
"""What a resume compares for a model class outside the families (those it has)."""


def families() -> dict[str, ModelFamily]:
    """Every family, by its `_target_`."""
    from pretrain.model.baselines import ENCODER, LSTM
    from pretrain.model.llama_family import LLAMA
    from pretrain.model.moe_family import MOE

    return {f.target: f for f in (LLAMA, MOE, LSTM, ENCODER)}


def family_of(section: Mapping[str, Any]) -> ModelFamily:
    """The family of a model config section (by its `_target_`); a class outside the
    families is a `PlainFamily`. ValueError when `_target_` names no importable class."""
    known = families()
    target = section.get("_target_")
    if target in known:
        return known[target]
    module, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        cls = None
    if not isinstance(cls, type):
        raise ValueError(
            f"model._target_={target!r} names no model class (the families: "
            f"{', '.join(known)}): give an importable nn.Module class, or implement "
            "pretrain.model.family.ModelFamily for it and list it in families()"
        )
    return PlainFamily(target, GENERIC_SHAPE_KEYS)


def family_of_hf(config: Mapping[str, Any]) -> ModelFamily:
    """The family whose HFAdapter reads a transformers config.json of this `model_type`."""
    for family in families().values():
        if family.hf is not None and config.get("model_type") in family.hf.model_types:
            return family
    readable = [t for f in families().values() if f.hf is not None for t in f.hf.model_types]
    raise ValueError(
        f"model_type {config.get('model_type')!r}: no model family of this framework reads it "
        f"(these do: {', '.join(readable)})"
    )


def model_fields(section: Mapping[str, Any]) -> dict[str, Any]:
    """A section's model fields: without `_target_`, `init_from` and `keep_zeros` (how a run
    starts and trains it, not the model's)."""
    return {k: v for k, v in section.items() if k not in ("_target_", "init_from", "keep_zeros")}
