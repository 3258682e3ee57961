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
- ZeRO-0 in fp32: the weight whole, the moments in torch's optimizer state.
The Adam step count is one number for the run (every parameter steps together).

`engine` below is a DeepSpeed engine: its `client_optimizer` is torch's optimizer over the
fp32 values (ZeRO 1-3: flat partitions; ZeRO-0 fp32: the weights), its `optimizer` the
ZeRO or bf16 wrapper around it (or the same object).
"""

from __future__ import annotations

from typing import Any

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")
KEYS = ("fp32", *MOMENTS)


def _zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")  # what DeepSpeed's own safe_* API asks


def _mapped(p: torch.Tensor) -> bool:
    return hasattr(p, "_hp_mapping")


def prepare(engine: Any) -> None:
    """Make every parameter's moments readable and settable through DeepSpeed's API (call
    before `full_values` or `set_full_values`): state for each parameter the optimizer has
    none for yet (a fresh engine: `make_state`), and each weight linked to its slice of it.

    DeepSpeed 0.19's ZeRO 1-2 and bf16 optimizers link each weight to its slice of the
    moments once, right after the first parameter group's first step, when the later
    groups have no moments yet; their weights then have none to read or set. Linking again
    once every group has state mends it."""
    make_state(engine)
    wrapper = engine.optimizer
    if hasattr(wrapper, "_hp_optimizer_states_linked"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


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
def make_state(engine: Any) -> None:
    """Give each tensor the client optimizer steps and keeps no state for yet its state, in
    the optimizer's own format, as its first step would: one step over those tensors alone,
    at learning rate 0 and with zero gradients. Adam's update and its decoupled weight decay
    are both scaled by the learning rate: nothing moves, the moments stay 0 (the step count
    becomes 1; `set_adam_step` sets it)."""
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


def full_values(p: torch.Tensor, engine: Any, keep: bool) -> dict | None:
    """{fp32, exp_avg, exp_avg_sq}: p's full values, on the host, where `keep` (collective
    over p's partition group at ZeRO 1-3: every rank of it calls, keeping or not)."""
    if _zero3(p) or _mapped(p):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        values = {"fp32": safe_get_full_fp32_param(p),
                  **{k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}}  # fmt: skip
    else:
        state = engine.client_optimizer.state[p]
        values = {"fp32": p, **{k: state[k] for k in MOMENTS}}
    if not keep:
        return None
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in values.items()}


def set_full_values(p: torch.Tensor, values: dict[str, torch.Tensor], engine: Any) -> None:
    """Set p's fp32 value, its weight and its Adam moments from full `values` (each of p's
    whole shape, as `full_values` returns them; not collective)."""
    if _zero3(p):
        _set_zero3(p, values)
    elif _mapped(p):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        safe_set_full_fp32_param(p, values["fp32"].to(p.device))
        for k in MOMENTS:
            safe_set_full_optimizer_state(p, values[k].to(p.device), k)
        with torch.no_grad():
            p.copy_(values["fp32"])
    else:
        with torch.no_grad():
            p.copy_(values["fp32"])
        state = engine.client_optimizer.state[p]
        for k in MOMENTS:
            state[k].copy_(values[k])


def _set_zero3(p: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
    """This rank's padded slice of each value (module docstring)."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    part = p.ds_tensor  # type: ignore[attr-defined]
    n = part.numel()
    rank = p._z3_optimizer._get_param_partition_rank(p)  # type: ignore[attr-defined]

    def local(value: torch.Tensor) -> torch.Tensor:
        flat = value.flatten()[rank * n : (rank + 1) * n]
        return torch.nn.functional.pad(flat, (0, n - flat.numel())).to(part.device)

    safe_set_local_fp32_param(p, local(values["fp32"]))
    for k in MOMENTS:
        safe_set_local_optimizer_state(p, local(values[k]), k)
    with torch.no_grad():
        part.copy_(local(values["fp32"]))
        if p.numel() == values["fp32"].numel():  # held whole (persistent): the whole too
            p.copy_(values["fp32"].view_as(p))


def adam_step(optimizer: torch.optim.Optimizer) -> float:
    """The optimizer's step count (0 before its first step)."""
    steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
    return max(steps, default=0.0)


def set_adam_step(optimizer: torch.optim.Optimizer, step: float) -> None:
    """Every parameter's step count, in the type the optimizer keeps it (after `prepare`)."""
    for state in optimizer.state.values():
        old = state["step"]
        state["step"] = (
            torch.full_like(old, step) if isinstance(old, torch.Tensor) else type(old)(step)
        )
