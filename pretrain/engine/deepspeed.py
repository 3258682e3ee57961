"""Build the model (sharded at birth under ZeRO-3) and wrap it in a DeepSpeed engine.

DeepSpeed owns data parallelism, ZeRO, precision, gradient accumulation and clipping; the
model and the loop stay free of it. DeepSpeed is imported lazily, after the accelerator
choice is made, because importing it picks its accelerator once and for all.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from pretrain import dist
from pretrain.config.resolve import ConfigError, RunConfig, deepspeed_config
from pretrain.config.schema import DeepSpeedConfig
from pretrain.engine.expert_groups import (
    expert_norm_sq,
    expert_shard,
    moe_engine,
    split_param_groups,
)
from pretrain.engine.optim import build_optimizer, lr_scheduler
from pretrain.model.expert_parallel import ExpertShard
from pretrain.model.family import family_of
from pretrain.model.sequence import SequenceShard


def _import_deepspeed(device_type: str) -> Any:
    # On a GPU machine told to train on CPU, DeepSpeed must not pick CUDA by itself.
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # What DeepSpeed's own launcher sets: without it its CPU accelerator counts devices
        # by running `numactl --hardware`, which ZeRO-3 did at every step (about 1 ms).
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed calls torch.distributed's all_gather_into_tensor and reduce_scatter_tensor,
    # which torch deprecates with a FutureWarning that under ZeRO-3 came back at every step
    # (something in the step resets the warnings registry): a flood in every rank's log
    # about code the user does not own.
    warnings.filterwarnings(
        "ignore", category=FutureWarning,
        message=r"`torch\.distributed\.(all_gather_into|reduce_scatter)_tensor` is deprecated",
    )  # fmt: skip
    if device_type == "cpu":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce when it starts
        # (about a minute, the first time on a machine) that only its inference_all_reduce
        # uses; training reduces through gloo. Skip building it.
        # (By module name: the attribute deepspeed.comm.torch is the torch package itself.)
        ds_comm = importlib.import_module("deepspeed.comm.torch")
        if hasattr(ds_comm, "build_shm_op"):
            ds_comm.build_shm_op = lambda: None
    # Adopt the process group dist.init() made, so zero.Init sees the real world size.
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo")
    return deepspeed


def build_model(
    run: RunConfig, factory: Callable[[ExpertShard | None], nn.Module]
) -> nn.Module:  # fmt: skip
    """Call `factory` under `deepspeed.zero.Init` for ZeRO-3, so no rank ever holds all
    weights; with parallel.expert, with this rank's place in DeepSpeed's expert groups."""
    deepspeed = _import_deepspeed(run.device_type)
    if run.deepspeed.zero_stage == 3:
        ctx = deepspeed.zero.Init(config_dict_or_path=deepspeed_config(run))
    else:
        ctx = contextlib.nullcontext()
    expert = expert_shard(run.parallel.expert, run.deepspeed.zero_stage)
    with ctx:
        model = factory(expert)
    family_of(run.model).parallelize(
        model, run.trainer.activation_checkpointing, run.trainer.compile,
        zero3=run.deepspeed.zero_stage == 3, sequence=sequence_shard(),
    )  # fmt: skip
    return model


def sequence_shard() -> SequenceShard | None:
    """This rank's place in its sequence-parallel group (None without one)."""
    if dist.sequence_size() == 1:
        return None
    return SequenceShard(dist.sequence_group(), dist.sequence_size(), dist.sequence_rank())


class SequenceParallelUnit:
    """The `mpu` DeepSpeed takes for Ulysses sequence parallelism (the shape of its
    runtime/sequence_parallel/parallel_state_sp.py, over pretrain.dist's groups).

    ZeRO shards over, and reduces gradients over, every rank (the "sequence data parallel"
    group), and divides the sums by the data-parallel size (ZeRO-3 by every rank:
    engine/module.py makes up for it), since the ranks of a sequence group hold shares of
    one loss (model/sequence.py). There is no model (tensor) parallelism: its group is this
    rank alone. ZeRO 1-3 ignore a sequence unit's model-parallel group; DeepSpeed's fp16/bf16
    optimizers, clipping and overflow checks outside ZeRO sum norms over it, where the
    sequence group (parallel_state_sp's alias) would count the same replicated gradients
    once per rank.
    """

    def __init__(self) -> None:
        self._alone = tdist.new_group([dist.rank()], use_local_synchronization=True)
        self._world = tdist.group.WORLD

    def initialize_sequence_parallel(self, size: int) -> None:
        """Present so DeepSpeed recognises a sequence-parallel unit; the groups exist."""

    def get_sequence_parallel_group(self) -> Any:
        return dist.sequence_group()

    def get_sequence_parallel_world_size(self) -> int:
        return dist.sequence_size()

    def get_sequence_parallel_rank(self) -> int:
        return dist.sequence_rank()

    def get_sequence_data_parallel_group(self) -> Any:
        return self._world

    def get_sequence_data_parallel_world_size(self) -> int:
        return dist.world_size()

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.rank()

    def get_data_parallel_group(self) -> Any:
        return dist.data_group()

    def get_data_parallel_world_size(self) -> int:
        return dist.data_size()

    def get_data_parallel_rank(self) -> int:
        return dist.data_rank()

    def get_model_parallel_group(self) -> Any:
        return self._alone

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank


def build_engine(run: RunConfig, model: nn.Module, load_universal: bool = False) -> Any:
    """deepspeed.initialize with our AdamW groups and warmup + cosine schedule.

    `load_universal`: the engine will load a universal checkpoint (another layout's).
    """
    deepspeed = _import_deepspeed(run.device_type)
    if run.deepspeed.zero_stage == 3:
        check_leaf_modules(model, run.deepspeed.stage3_leaf_modules)
    stage = run.deepspeed.zero_stage
    optimizer = build_optimizer(model, run.optim, lambda g: split_param_groups(g, stage))
    config = deepspeed_config(run)
    if trainer_clip(run) is not None:
        config["gradient_clipping"] = 0.0  # the trainer clips (trainer_clip)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    with moe_engine(model, stage, int(run.model.get("n_experts", 0))):
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: lr_scheduler(opt, run.optim, run.trainer.max_steps),
            config=config,
            mpu=SequenceParallelUnit() if run.parallel.sequence > 1 else None,
        )
    if run.world_size == 1 and run.deepspeed.zero_stage == 0:
        # Alone, the gradient all-reduce averages over one rank, yet DeepSpeed still flattens
        # every gradient into buckets and back each step (4% of a 125M model's CPU step).
        engine.enable_backward_allreduce = False
    return engine


def check_leaf_modules(model: nn.Module, names: list[str]) -> None:
    """Raise ConfigError for a `deepspeed.stage3_leaf_modules` entry that names no module
    class of `model` (DeepSpeed would silently fetch per submodule instead). The default's
    `Block` is exempt: a model without one (the LSTM baseline) just has nothing to group."""
    classes = {c for m in model.modules() for c in (type(m).__name__, _qualified(type(m)))}
    default = DeepSpeedConfig().stage3_leaf_modules
    unknown = [n for n in names if n not in classes and n not in default]
    if unknown:
        own = sorted({type(m).__name__ for m in model.modules()})
        raise ConfigError([
            f"deepspeed.stage3_leaf_modules={list(names)}: {unknown} name no module class of "
            f"this model ({', '.join(own)}); name one of those, or [] to fetch per submodule"
        ])  # fmt: skip


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def trainer_clip(run: RunConfig) -> float | None:
    """The max gradient norm the trainer clips to itself (0: none), or None: DeepSpeed clips.

    In plain fp32 data parallel (ZeRO-0, fp32) DeepSpeed records no gradient norm, and its
    clipping takes a norm per parameter and an all-reduce (the tiny model's step before and
    after: docs/performance.md); there build_engine turns it off and the trainer clips with
    torch's foreach `clip_grad_norm_`, which also returns the norm.
    """
    return (
        run.optim.grad_clip if run.deepspeed.zero_stage == 0 and run.precision == "fp32" else None
    )


def clip_gradients(
    params: list[torch.Tensor], max_norm: float, experts: list[torch.Tensor] | None = None
) -> float:  # fmt: skip
    """Global L2 norm of the (already all-reduced) gradients of `params`, held whole on this
    rank, and of `experts` (expert parallelism: this rank's experts, whose norm is summed
    over its expert group); all are scaled down to `max_norm` when above it (0: not
    clipped).

    `params`, `experts`: the model's parameters as lists, built once (walking the modules
    for them, or asking each whether it is an expert's, costs 0.1 ms a step, 1% of the tiny
    model's CPU step)."""
    params = [p for p in params if p.grad is not None]
    experts = [p for p in experts or [] if p.grad is not None]
    if not experts:
        if not params:
            return 0.0
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf))
    dense = [torch.linalg.vector_norm(p.grad) for p in params]
    dense_sq = torch.linalg.vector_norm(torch.stack(dense)) ** 2 if dense else 0.0
    norm = (dense_sq + expert_norm_sq(experts)).sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_([p.grad for p in params + experts], scale)
    return float(norm)


class UpdateGate:
    """Skip one optimizer update on request, e.g. after a non-finite loss on some rank.

    DeepSpeed's ZeRO and bf16 wrappers (and the plain engine) all end a step by calling the
    client optimizer's `step()` on the fp32 master weights and then copying those back into
    the model; when that call does nothing, weights and Adam moments stay as they were while
    DeepSpeed's own bookkeeping (gradient zeroing, LR schedule, step counters) runs as usual.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.skip = False
        update = optimizer.step

        def gated_step(*args: Any, **kwargs: Any) -> Any:
            return None if self.skip else update(*args, **kwargs)

        # The LR scheduler wrapped step() to see that it runs first; our wrapper calls its
        # wrapper, so say so, or torch warns on every run that step() was overridden.
        if hasattr(update, "_wrapped_by_lr_sched"):
            gated_step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        optimizer.step = gated_step  # an instance attribute: DeepSpeed looks it up per call
