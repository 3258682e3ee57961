"""Run under torchrun: build the tiny model the way a ZeRO-3 run does and check that no rank
holds a whole weight matrix (parameters are born sharded), then print one line per rank;
then wrap it in the engine and print which modules carry ZeRO-3's fetch hooks."""

from __future__ import annotations

import math

import torch

from pretrain import dist
from pretrain.config import resolve
from pretrain.engine.deepspeed import build_engine, build_model
from pretrain.train.run import build_module
from tests.conftest import compose_config

cfg = compose_config(["model=tiny", "deepspeed=zero3", "logger.wandb.mode=disabled"])
run = resolve(cfg, world_size=dist.world_size(), cuda_available=False)
dist.init("cpu")
model = build_model(run, lambda expert: build_module(run, expert))
world = dist.world_size()
for name, p in model.named_parameters():
    assert p.numel() == 0, f"{name} is materialised whole on rank {dist.rank()}"
    assert p.ds_tensor.numel() == math.ceil(p.ds_numel / world), name
total = sum(p.ds_numel for p in model.parameters())
local = sum(p.ds_tensor.numel() for p in model.parameters())
print(f"rank {dist.rank()}: holds {local} of {total} parameters", flush=True)
engine = build_engine(run, model)
hooked = [name for name, m in engine.module.named_modules() if m._forward_pre_hooks]
if dist.rank() == 0:  # the same on every rank; one line, so no other rank's output splits it
    print(f"rank 0 hooks: {' '.join(hooked)}", flush=True)
    # deepspeed.stage3_memory_efficient_linear=false: torch's linear stays torch's
    print(f"rank 0 linear: {torch.nn.functional.linear.__module__}", flush=True)
    # one CPU "device" per local rank, as DeepSpeed's launcher says, not numactl each step
    from deepspeed.accelerator import get_accelerator  # (chosen by build_model: cpu)

    print(f"rank 0 devices: {get_accelerator().device_count()}", flush=True)
dist.finish()
