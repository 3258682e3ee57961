"""Layout-free training state: each parameter's full fp32 value and Adam moments, read from
an engine of any layout and set into an engine of any other (number of ranks, ZeRO stage,
`parallel.expert`).

An expert-parallel run's checkpoints carry it (engine/expert_groups.py `ExpertCheckpoint`):
DeepSpeed's universal conversion (checkpoint/reshard.py) fails on expert groups, so a run
resumed into another expert layout sets the saved values parameter by parameter here.

Where each value lives, by the kind of engine that holds the parameter:
- ZeRO-3 (`ds_id`): each rank of the parameter's partition group holds one padded slice of
  the flat fp32 value and moments, and of the low-precision weight (`ds_tensor`); a small
  parameter kept whole between steps (below `stage3_param_persistence_threshold`) holds its
  weight whole too. DeepSpeed's full setter narrows the unpadded value by the padded slice
  size (wrong for a parameter the group does not divide), so the local slices are set
  through its local API.
- ZeRO 1-2 and the bf16 optimizer (`_hp_mapping`): each rank its fragment of the fp32
  partitions (DeepSpeed's full setter), and the weight whole.
- ZeRO-0: the weight whole, the moments in torch's optimizer state, keyed by the weight in
  fp32, or in bf16/fp16 by the fp32 copy DeepSpeed's unfused fp16 optimizer keeps of it.
The Adam step count is one number for the run (every parameter steps together).
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")
KEYS = ("fp32", *MOMENTS)


def zero3_slice(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ZeRO-3 parameter `param`'s value `whole`: the flat value's
    `rank`-th run of the (padded) partition size, zero-padded to it."""
    n = param.ds_tensor.numel()  # type: ignore[attr-defined]
    rank = param.ds_zero_partition_rank  # type: ignore[attr-defined]
    flat = whole.flatten()[rank * n : (rank + 1) * n]
    return torch.nn.functional.pad(flat, (0, n - flat.numel()))


class EngineState:
    """One DeepSpeed engine's parameters, each read and set as its full fp32 value and Adam
    moments whatever the layout (module docstring).

    Making one prepares the engine (no collective): state for each tensor the optimizer
    holds none for yet (a fresh engine: `_make_state`), and each weight linked to its
    slice of it. DeepSpeed 0.19's ZeRO 1-2 and bf16 optimizers link each weight to its
    slice of the moments once, right after the first parameter group's first step, when
    the later groups have no moments yet; their weights then have none to read or set.
    Linking again once every group has state mends it."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.optimizer = engine, engine.client_optimizer
        _make_state(engine)
        wrapper = engine.optimizer
        if hasattr(wrapper, "_hp_optimizer_states_linked"):
            wrapper._hp_optimizer_states_linked = False
            wrapper._lazy_init_hp_params_optimizer_state()
        self._master = _fp32_copies(wrapper)

    def values(self, p: torch.Tensor, keep: bool) -> dict[str, torch.Tensor] | None:
        """{fp32, exp_avg, exp_avg_sq}: p's full values, on the host, where `keep`
        (collective over p's partition group at ZeRO 1-3: every rank of it calls, keeping
        or not)."""
        _check_trainable(p)
        if _zero3(p) or _mapped(p):
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            values = {"fp32": safe_get_full_fp32_param(p),
                      **{k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}}  # fmt: skip
        else:
            master = self._master.get(id(p), p)
            state = self.optimizer.state[master]
            values = {"fp32": master, **{k: state[k] for k in MOMENTS}}
        if not keep:
            return None
        return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in values.items()}

    @torch.no_grad()
    def set(self, p: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """Set p's fp32 value, its weight and its Adam moments from full `values` (each of
        p's whole shape, as `values` returns them; not collective)."""
        _check_trainable(p)
        if _zero3(p):
            from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

            mine = {k: zero3_slice(p, v).to(p.ds_tensor.device) for k, v in values.items()}
            safe_set_local_fp32_param(p, mine["fp32"])
            for k in MOMENTS:
                safe_set_local_optimizer_state(p, mine[k], k)
            p.ds_tensor.copy_(mine["fp32"])
            if p.numel() == values["fp32"].numel():  # held whole (persistent): the whole too
                p.copy_(values["fp32"].view_as(p))
        elif _mapped(p):
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            safe_set_full_fp32_param(p, values["fp32"].to(p.device))
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, values[k].to(p.device), k)
            p.copy_(values["fp32"])
        else:
            master = self._master.get(id(p), p)
            master.copy_(values["fp32"])
            if master is not p:
                p.copy_(values["fp32"])
            state = self.optimizer.state[master]
            for k in MOMENTS:
                state[k].copy_(values[k])

    def step(self) -> float:
        """The optimizer's step count (0 before its first step)."""
        steps = [float(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        return max(steps, default=0.0)

    def set_step(self, step: float) -> None:
        """Every tensor's step count, in the type the optimizer keeps it."""
        _set_steps(self.optimizer.state.values(), step)


def _zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")  # what DeepSpeed's own safe_* API asks


def _mapped(p: torch.Tensor) -> bool:
    return hasattr(p, "_hp_mapping")


def _check_trainable(p: torch.Tensor) -> None:
    if not p.requires_grad:  # DeepSpeed keeps no fp32 value or moments for it
        raise NotImplementedError("a frozen parameter in a layout-free checkpoint")


def _fp32_copies(wrapper: Any) -> dict[int, torch.Tensor]:
    """At ZeRO-0 in bf16/fp16, DeepSpeed's unfused fp16 optimizer: each weight's fp32 copy,
    which the client optimizer steps (by the weight's id); {} elsewhere."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(wrapper, FP16_UnfusedOptimizer):
        return {}
    pairs = zip(chain(*wrapper.fp16_groups), chain(*wrapper.fp32_groups), strict=True)
    return {id(low): master for low, master in pairs}


def _set_steps(states: Any, step: float) -> None:
    for state in states:
        old = state["step"]
        state["step"] = (torch.full_like(old, step) if isinstance(old, torch.Tensor)
                         else type(old)(step))  # fmt: skip


def _stepped(engine: Any) -> list[tuple[int, torch.Tensor]]:
    """(optimizer group, fp32 tensor) for each tensor the client optimizer steps: at ZeRO-3
    each sub-group's flat partition, which DeepSpeed puts in its group only while stepping
    it (stage3.py `_optimizer_step`); elsewhere the groups' own parameters."""
    wrapper = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        return [(wrapper.sub_group_to_group_id[i], t)
                for i, t in enumerate(wrapper.fp32_partitioned_groups_flat)]  # fmt: skip
    return [(i, p) for i, g in enumerate(engine.client_optimizer.param_groups) for p in g["params"]]


@torch.no_grad()
def _make_state(engine: Any) -> None:
    """Give each tensor the client optimizer steps and keeps no state for yet its initial
    state, in the optimizer's own format: one step over those tensors alone, at learning
    rate 0 and with zero gradients, then their step count back to 0. Adam's update and its
    decoupled weight decay are both scaled by the learning rate: nothing moves, the moments
    stay 0, and the next real step is their first, as without this."""
    optimizer = engine.client_optimizer
    fresh = [(i, t) for i, t in _stepped(engine) if not optimizer.state.get(t)]
    if not fresh:
        return
    groups = optimizer.param_groups
    kept = [(g["params"], g["lr"]) for g in groups]
    grads = [t.grad for _, t in fresh]  # ZeRO-Offload keeps a gradient buffer: put it back
    for g in groups:
        g["params"], g["lr"] = [], 0.0
    for i, t in fresh:
        groups[i]["params"].append(t)
        t.grad = torch.zeros_like(t)
    try:
        optimizer.step()
    finally:
        for g, (params, lr) in zip(groups, kept, strict=True):
            g["params"], g["lr"] = params, lr
        for (_, t), grad in zip(fresh, grads, strict=True):
            t.grad = grad
    _set_steps([optimizer.state[t] for _, t in fresh], 0)
