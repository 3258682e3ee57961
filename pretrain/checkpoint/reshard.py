"""Resume on another number of ranks or another ZeRO stage (1, 2 and 3 among themselves).

DeepSpeed's own checkpoints only load into the layout that saved them. When the layout
changes, rank 0 converts the checkpoint once with DeepSpeed's `ds_to_universal` into
`step_N/universal/` (one directory per parameter: fp32 weights, Adam moments, step), and
every rank then loads its new partition with `checkpoint.load_universal`. Weights, Adam
moments and step counts carry over exactly; only the order of floating-point sums changes.

DeepSpeed's universal loader reads the optimizer's global state in the format of the stage
that wrote it; `_normalize` adds the other family's format (stages 1-2 vs 3), so one
converted directory serves every target stage. Stage 0 keeps no partitioned optimizer state
that the universal format could express: a run with ZeRO-0 resumes on any number of ranks
(everything is replicated), but moving to or from stage 0 is refused with a clear message.

A change of `parallel.expert`, or any layout change of an expert-parallel run, loads
through the checkpoint's layout-free state instead (checkpoint/layout_free.py): there any
stage moves to any other, 0 included.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch

from pretrain import dist
from pretrain.checkpoint import manager

log = logging.getLogger("pretrain")

Route = Literal["same", "direct", "universal", "layout_free"]
"""How a checkpoint loads: `same` layout (DeepSpeed's own load, each rank its files);
`direct`: DeepSpeed's own load, the data positions moved (another sequence-parallel size,
or ZeRO-0 on another number of ranks, which loads rank 0's replicated files);
`universal`: another number of ranks or ZeRO stage 1-3, through DeepSpeed's universal
conversion; `layout_free`: into or out of another `parallel.expert` layout, through the
checkpoint's layout-free state (checkpoint/layout_free.py)."""

UNIVERSAL = "universal"
_DONE = "CONVERTED"


def saved_layout(config: dict[str, Any]) -> tuple[int, int]:
    """(world size, ZeRO stage) that a checkpoint's saved config ran with."""
    return int(config["derived"]["world_size"]), int(config["deepspeed"]["zero_stage"])


def saved_sequence(config: dict[str, Any]) -> int:
    """The sequence-parallel size a checkpoint's saved config ran with (1 before it existed):
    its ranks r and r + 1 of a group saved the same data position."""
    return int(config["derived"].get("parallel", {}).get("sequence", 1))


def saved_expert(config: dict[str, Any]) -> int:
    """The `parallel.expert` a checkpoint's saved config ran with (1 before it existed)."""
    return int(config["derived"].get("parallel", {}).get("expert", 1))


def check_layout_free(path: Path, saved: tuple[int, ...], now: tuple[int, ...]) -> None:
    """Refuse an expert-layout change (saved and now: world size, ZeRO stage,
    parallel.expert, parallel.sequence) that checkpoint `path` cannot make through its
    layout-free state: an expert-parallel one saved before it kept its Adam moments, or one
    without expert parallelism at ZeRO-0 (no universal conversion reads it)."""
    from pretrain.checkpoint.layout_free import has_moments
    from pretrain.config import ConfigError

    def layout(x: tuple[int, ...]) -> str:
        return (f"{x[0]} ranks at ZeRO-{x[1]} with parallel.expert={x[2]} and "
                f"parallel.sequence={x[3]}")  # fmt: skip

    was = f"{path} was saved by {layout(saved)}; this run has {layout(now)}"
    fixes = (f"resume with {saved[0]} ranks, deepspeed.zero_stage={saved[1]}, parallel.expert="
             f"{saved[2]} and parallel.sequence={saved[3]}, or start a new run from its "
             "weights (tools/export_hf.py, then model.init_from=<that dir>)")  # fmt: skip
    if saved[2] > 1 and not has_moments(path):
        raise ConfigError([f"{was}. It was saved before expert-parallel checkpoints kept "
                           f"their Adam moments layout-free, so it resumes in its own layout "
                           f"only: {fixes}"])  # fmt: skip
    if saved[2] == 1 and saved[1] == 0:
        raise ConfigError([f"{was}. A checkpoint without expert parallelism moves into it "
                           "from ZeRO 1-3 only (DeepSpeed's universal conversion, which "
                           f"gives its layout-free state, does not read ZeRO-0): {fixes}"
                           ])  # fmt: skip


def needs_universal(saved: tuple[int, int], now: tuple[int, int], path: Path) -> bool:
    """Whether resuming `path` (saved with layout `saved`) in layout `now` needs conversion;
    raises when the change cannot be done."""
    old_stage, stage = saved[1], now[1]
    if saved == now:
        return False
    if old_stage == 0 and stage == 0:
        return False  # ZeRO-0 replicates everything: any number of ranks loads it directly
    if 0 in (old_stage, stage):
        from pretrain.config import ConfigError

        raise ConfigError([
            f"{path} was saved with deepspeed.zero_stage={old_stage}; this run has "
            f"zero_stage={stage}. Moving between ZeRO-0 and ZeRO 1-3 is not supported: resume "
            f"with deepspeed.zero_stage={old_stage} (any number of ranks), or start a new run "
            "from its weights alone (tools/export_hf.py, then model.init_from=<that dir>)"
        ])  # fmt: skip
    return True


def convert(ckpt: Path) -> Path:
    """`ckpt/universal`, written once by rank 0 (aside, then renamed); every rank waits."""
    out = ckpt / UNIVERSAL
    if dist.is_main() and not (out / _DONE).is_file():
        from deepspeed.checkpoint import ds_to_universal

        tmp = ckpt / f".{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        log.info("converting %s to DeepSpeed's universal format for the new layout", ckpt)
        args = argparse.Namespace(
            input_folder=str(ckpt), output_folder=str(tmp), num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
        )  # fmt: skip
        with manager.safe_loading(ckpt):
            ds_to_universal.main(args)
            _normalize(tmp)
        (tmp / _DONE).touch()
        os.replace(tmp, out)
    dist.barrier()
    return out


MODEL_STATES = "mp_rank_00_model_states.pt"
"""DeepSpeed's model states file at ZeRO 0-2 (module, LR schedule, step counters)."""
MODEL_STATES_Z3 = "zero_pp_rank_0_mp_rank_00_model_states.pt"
"""Rank 0's at ZeRO-3."""


def model_states(ckpt: Path) -> Path:
    """Checkpoint `ckpt`'s DeepSpeed model states file (rank 0's), whatever its stage."""
    flat = ckpt / MODEL_STATES
    return flat if flat.is_file() else ckpt / MODEL_STATES_Z3


def _normalize(universal: Path) -> None:
    """Make a converted directory loadable by ZeRO 1-2 and ZeRO-3 alike."""
    flat, z3 = MODEL_STATES, MODEL_STATES_Z3
    if not (universal / flat).exists():
        shutil.copyfile(universal / z3, universal / flat)
    if not (universal / z3).exists():
        shutil.copyfile(universal / flat, universal / z3)
    zero = universal / "zero"
    state_file = zero / "optimizer_state.pt"
    sd = torch.load(state_file, weights_only=True)
    groups = sd.get("param_groups") or sd["optimizer_state_dict"]["param_groups"]
    step = _adam_step(zero, sd)
    sd.setdefault("param_groups", groups)
    sd.setdefault("ds_version", _ds_version())
    sd.setdefault("clip_grad", 0.0)  # ZeRO-3 keeps none; restore_hyperparameters sets it
    sd.setdefault("optimizer_state_dict", {"state": {0: {"step": step}}, "param_groups": groups})
    torch.save(sd, state_file)
    # ZeRO-3 writes each state as a flat tensor; the stage 1-2 loader wants {"param": shaped}
    # (which the ZeRO-3 loader reads too) and a step per parameter.
    model_states = torch.load(universal / flat, map_location="cpu", weights_only=True)
    shapes = {n: s for group in model_states["param_shapes"] for n, s in group.items()}
    for param_dir in zero.iterdir():
        if not param_dir.is_dir():
            continue
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            f = param_dir / f"{key}.pt"
            value = torch.load(f, weights_only=True) if f.exists() else None
            if isinstance(value, torch.Tensor):
                torch.save({"param": value.view(shapes[param_dir.name])}, f)
        if not (param_dir / "step.pt").exists():
            torch.save(step, param_dir / "step.pt")


def _adam_step(zero: Path, sd: dict[str, Any]) -> Any:
    if "optimizer_state_dict" in sd:  # written from ZeRO-3
        return sd["optimizer_state_dict"]["state"][0]["step"]
    return torch.load(next(zero.glob("*/step.pt")), weights_only=True)


def _ds_version() -> str:
    import deepspeed

    return deepspeed.__version__


def saved_buffers(universal: Path) -> dict[str, torch.Tensor]:
    """The module's persistent buffers (e.g. a router's balancing bias) saved in converted
    directory `universal`'s model states, by name."""
    saved = torch.load(universal / MODEL_STATES, map_location="cpu", weights_only=True,
                       mmap=True)  # fmt: skip
    names = saved.get("buffer_names") or []
    missing = [n for n in names if n not in saved["module"]]
    if missing:
        raise KeyError(f"{universal}: buffers {missing} are listed but not saved")
    return {n: saved["module"][n] for n in names}


def restore_buffers(module: torch.nn.Module, universal: Path) -> None:
    """The module's persistent buffers, from the converted model states: DeepSpeed's
    universal load sets the parameters and skips the module's state dict, buffers
    included."""
    saved = saved_buffers(universal)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in saved:
                buffer.copy_(saved[name])


def restore_hyperparameters(engine: Any, before: list[dict[str, Any]]) -> None:
    """After a universal load: this run's optimizer settings, and the schedule's current LR.

    DeepSpeed's loaders copy the saved groups' settings over the live ones (ZeRO-3 copies the
    first group's into every group, which would put weight decay on norms and embeddings).
    The run's own config is what should hold (gradient clipping included); the LR comes from
    the restored schedule.
    """
    groups = engine.optimizer.param_groups
    for group, saved in zip(groups, before, strict=True):
        group.update(saved)
    if hasattr(engine.optimizer, "clip_grad"):  # ZeRO 1-2 take the checkpoint's clipping
        engine.optimizer.clip_grad = engine.gradient_clipping()
    scheduler = engine.lr_scheduler
    if scheduler is not None:
        for group, lr in zip(groups, scheduler.get_last_lr(), strict=True):
            group["lr"] = lr


def hyperparameters(engine: Any) -> list[dict[str, Any]]:
    """The optimizer groups' settings (all but their parameters), to restore after a load."""
    return [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]


def load(engine: Any, path: Path, route: Route) -> tuple[dict[str, Any], list[dict]]:
    """Load checkpoint `path`, saved in another layout, into `engine` by `route`
    (`Route`: direct, universal or layout_free; the engine was
    built with `checkpoint.load_universal` for universal).

    Returns (client_state, every saved rank's own state, in rank order, memory-mapped);
    this rank's RNG comes from the saved rank of the same number, or the last one.
    """
    kwargs = dict(load_optimizer_states=True, load_lr_scheduler_states=True)
    client_state = manager.read_client_state(path)
    with manager.safe_loading(path):
        if route == "layout_free":
            from pretrain.checkpoint import layout_free

            saved_values = layout_free.saved_values(path, saved_expert(client_state["config"]))
            layout_free.load(engine, path, saved_values)
        elif route == "universal":
            before = hyperparameters(engine)
            engine.load_checkpoint(str(path), tag=UNIVERSAL, **kwargs)
            restore_hyperparameters(engine, before)
            restore_buffers(engine.module, path / UNIVERSAL)
        elif route == "direct":
            engine.load_checkpoint(str(path.parent), tag=path.name, **kwargs)
        else:
            raise ValueError(f"route {route!r}: not one of direct, universal, layout_free")
        old_world, _ = saved_layout(client_state["config"])
        saved = [torch.load(path / f"rank_{r}.pt", weights_only=True, mmap=True)
                 for r in range(old_world)]  # fmt: skip
    manager.set_rng_state(saved[min(dist.rank(), old_world - 1)]["rng"])
    return client_state, saved
