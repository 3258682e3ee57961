"""DeepSpeed's side of expert parallelism (`parallel.expert=N`): its expert groups, the
marks on our expert parameters, and the optimizer groups that ZeRO reduces and partitions
over the ranks holding the same experts.

DeepSpeed 0.19 knows expert parameters by attributes: `allreduce=False` and `group_name`
(`deepspeed.moe.utils.is_moe_param`) at ZeRO 0-2, and at ZeRO-3 the partition group and
placement family its AutoEP layers set (`ds_zero_partition_process_group`,
`ds_zero_placement_family`, `ds_zero_partition_group_name`, read when zero.Init partitions
a parameter, so our `Experts` sets them as it makes its parameters: `ExpertShard.
param_attrs`). At ZeRO 0-2 the engine reduces expert gradients over the expert-data groups
only when its `has_moe_layers` is set, which it sets for its own MoE classes alone, so
`initialize` sets it around `deepspeed.initialize` for a model with marked parameters;
ZeRO-3 must not have it (it would ask for AutoEP layers).

Gradients: a rank's experts get, through the token exchange, the gradient of every token of
its group that reached them; summing over the ranks that hold the same experts and dividing
by the data-parallel size (what DeepSpeed does) gives the mean over all ranks' tokens, as
one rank holding every expert would. tests/train/test_expert_parallel.py checks the losses
and gradient norms against one rank at ZeRO 0-3.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.engine.full_state import MOMENTS, EngineState
from pretrain.model.expert_parallel import ExpertShard
from pretrain.model.moe import Experts


def _split(values: dict[str, dict], weights: str, moments: str) -> dict[str, dict]:
    """{weights: {name: fp32}, moments: {name: {exp_avg, exp_avg_sq}}} of `full_values`."""
    return {weights: {n: v["fp32"] for n, v in values.items()},
            moments: {n: {k: v[k] for k in MOMENTS} for n, v in values.items()}}  # fmt: skip


LOSS_SCALE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
"""A dynamic fp16 loss scaler's state (DeepSpeed's `DynamicLossScaler`)."""


def loss_scale(engine: Any) -> dict[str, float]:
    """The engine's fp16 loss scaler's state ({} without one: fp32, bf16)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return {k: getattr(scaler, k) for k in LOSS_SCALE if hasattr(scaler, k)}


def set_loss_scale(engine: Any, saved: dict[str, float]) -> None:
    """Set the engine's fp16 loss scaler from `loss_scale`'s state (where both have one)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for key, value in saved.items():
        if hasattr(scaler, key):
            setattr(scaler, key, value)


def group_name(size: int) -> str:
    """DeepSpeed's name for the expert groups of `size` ranks."""
    return f"ep_size_{size}"


def expert_shard(size: int, zero_stage: int) -> ExpertShard | None:
    """This rank's place in DeepSpeed's expert groups of `size` consecutive ranks (made on
    first call, by every rank; deepspeed.init_distributed first), with the marks its expert
    parameters need at `zero_stage`; None for size 1."""
    if size == 1:
        return None
    from deepspeed.utils import groups

    name = group_name(size)
    groups._create_expert_and_data_parallel(size)  # once: it returns if they exist
    attrs: dict[str, Any] = {"allreduce": False, "group_name": name}
    if zero_stage == 3:
        attrs.update(
            ds_zero_partition_process_group=groups._get_expert_data_parallel_group(name),
            ds_zero_placement_family="autoep_expert",
            ds_zero_partition_group_name=name,
        )
    return ExpertShard(groups._get_expert_parallel_group(name), size,
                       groups._get_expert_parallel_rank(name), attrs)  # fmt: skip


def is_expert_param(p: torch.Tensor) -> bool:
    """Whether `p` is an expert parameter held by some ranks only (marked by expert_shard)."""
    from deepspeed.moe.utils import is_moe_param

    return is_moe_param(p)


def local_experts(p: torch.Tensor) -> range | None:
    """The global indices of the experts whose rows expert parameter `p` holds on this rank
    (dim 0, consecutive: `ExpertShard.local_experts`); None for a parameter every rank
    holds whole."""
    if not is_expert_param(p):
        return None
    from deepspeed.utils import groups

    held = getattr(p, "ds_shape", p.shape)[0]  # ZeRO-3 keeps the shape apart
    rank = groups._get_expert_parallel_rank(p.group_name)  # type: ignore[attr-defined]
    return range(rank * held, (rank + 1) * held)


def expert_norm_sq(params: list[torch.Tensor]) -> torch.Tensor:
    """The squared L2 norm of the gradients of expert parameters `params` over all the
    experts: this rank's, summed over its expert-parallel group (whose ranks hold the
    others; the ranks holding the same ones hold the same reduced gradients)."""
    from deepspeed.utils import groups

    local = torch.stack([torch.linalg.vector_norm(p.grad.float()) ** 2 for p in params]).sum()
    names = {p.group_name for p in params}
    assert len(names) == 1, f"expert parameters of several expert groups: {names}"
    torch.distributed.all_reduce(local, group=groups._get_expert_parallel_group(names.pop()))
    return local


def split_param_groups(groups: list[dict], zero_stage: int) -> list[dict]:
    """At ZeRO 0-2, each optimizer group split into its dense parameters and its expert
    ones (a group marked `moe`, named after the expert groups, which ZeRO partitions over
    the ranks holding the same experts); ZeRO-3 partitions each parameter over its own
    group and takes the groups as they are."""
    if zero_stage == 3 or not any(is_expert_param(p) for g in groups for p in g["params"]):
        return groups
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{"name": f"group{i}", **g} for i, g in enumerate(groups)]
    return split_params_into_different_moe_groups_for_optimizer(named)


@contextlib.contextmanager
def moe_engine(model: nn.Module, zero_stage: int, n_experts: int) -> Iterator[None]:
    """Around deepspeed.initialize: at ZeRO 0-2, a model with expert parameters makes an
    engine with `has_moe_layers` set (module docstring)."""
    if zero_stage == 3 or not any(is_expert_param(p) for p in model.parameters()):
        yield
        return
    from deepspeed.runtime.engine import DeepSpeedEngine

    configure = DeepSpeedEngine._configure_distributed_model
    blocks = sum(1 for m in model.modules() if isinstance(m, Experts))

    def with_experts(engine: Any, module: nn.Module) -> None:
        configure(engine, module)
        engine.has_moe_layers = True
        engine.num_experts = [n_experts] * blocks

    DeepSpeedEngine._configure_distributed_model = with_experts
    try:
        yield
    finally:
        DeepSpeedEngine._configure_distributed_model = configure


class ExpertCheckpoint:
    """The state of an expert-parallel run in its checkpoints, beside DeepSpeed's files, in
    a layout-free form.

    DeepSpeed writes the module from data-parallel rank 0 alone, which holds only its own
    experts, and its consolidation (zero_to_fp32) and universal conversion know expert
    parameters only in its own MoE classes' layout: they fail on ours. So the ranks of the
    first expert group (expert-data rank 0: one per expert shard) add their experts' full
    fp32 values (key `experts`) and Adam moments (`expert_moments`) to their rank state
    (`rank_<ep rank>.pt`), and rank 0 every other weight's and buffer's (`dense`), their
    moments (`dense_moments`) and the Adam step (`adam_step`); a mixture-of-experts
    model's dense part is a small share of it. This costs as much again as DeepSpeed's own
    fp32 weights and moments (docs/architecture.md). A rank resumed in the same layout sets
    its experts from them (ZeRO 0-2; ZeRO-3 restores its own shards), one resumed in
    another layout sets everything from them (checkpoint/layout_free.py), and an export
    reads the whole model from them (checkpoint/export.py `consolidated_state_dict`)."""

    def __init__(self, engine: Any) -> None:
        """`engine`: the DeepSpeed engine (its module, optimizer and ZeRO stage)."""
        self.engine, self.model = engine, engine.module
        self.zero_stage = engine.zero_optimization_stage()
        self.params = [(n, p) for n, p in self.model.named_parameters() if is_expert_param(p)]
        if self.params:
            from deepspeed.utils import groups

            name = self.params[0][1].group_name
            self.ep_rank = groups._get_expert_parallel_rank(name)
            self.writer = groups._get_expert_data_parallel_rank(name) == 0
            # DeepSpeed's layout: expert groups of consecutive ranks, so the first group's
            # ranks 0..N-1 write, each under its own number (what restore and export read).
            assert not self.writer or torch.distributed.get_rank() == self.ep_rank

    def state(self) -> dict[str, Any]:
        """What this rank adds to its rank state (collective: every rank calls it). Only the
        ranks that keep a value copy it to the host."""
        if not self.params:
            return {}
        out: dict[str, Any] = {}
        full = EngineState(self.engine)
        experts = {name: full.values(p, self.writer) for name, p in self.params}
        if self.writer:
            out.update(_split(experts, "experts", "expert_moments"))
        main = torch.distributed.get_rank() == 0
        dense: dict[str, Any] = {}
        seen: dict[int, Any] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if not is_expert_param(p):  # a tied weight: gathered once, under both names
                if id(p) not in seen:
                    seen[id(p)] = full.values(p, main)
                dense[name] = seen[id(p)]
        if main:
            out.update(_split(dense, "dense", "dense_moments"))
            out["dense"].update({n: b.detach().to("cpu", copy=True)
                                 for n, b in self.model.state_dict().items()
                                 if n not in dense and n not in experts})  # fmt: skip
            out["adam_step"] = full.step()
            out["loss_scale"] = loss_scale(self.engine)
        return out

    def restore(self, path: Path) -> None:
        """Set this rank's experts from checkpoint `path` (same layout), after DeepSpeed's
        load set them from data-parallel rank 0's module (ZeRO 0-2)."""
        if not self.params or self.zero_stage == 3:
            return
        from pretrain.checkpoint import manager

        with manager.safe_loading(path):  # mapped: only the experts are read
            saved = torch.load(path / f"rank_{self.ep_rank}.pt", weights_only=True,
                               mmap=True)["experts"]  # fmt: skip
        with torch.no_grad():
            for name, p in self.params:
                p.copy_(saved[name].to(p.dtype))
