"""What one optimizer step's numbers mean: throughput, MFU, memory and the fp16 loss scale.

MFU (model FLOPs utilisation) = achieved model FLOP/s per GPU / the GPU's dense peak, where
the model FLOPs per token come from `pretrain.model.flops.flops_per_token` (6N plus
attention over the full T x T scores, the PaLM convention that Megatron-LM, nanoGPT and
torchtitan quote) and the peak from `flops.PEAK_FLOPS` or `logger.peak_tflops`. Work a
kernel skips (the masked half of causal attention) or repeats (activation recomputation)
does not change it: it measures the model, not the implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pretrain.model.flops import peak_flops

GIB = 2**30

RATE_KEYS = ("tokens_per_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu")
"""Metrics proportional to 1 / step time (the tokens per step are fixed)."""

TIME_KEYS = ("step_time_s", "data_wait_s", "compute_s")
"""Seconds per step: averaged over a log interval by the interval loggers."""


@dataclass(frozen=True)
class Throughput:
    """Turns the seconds one optimizer step took into tokens/s, TFLOP/s and MFU."""

    tokens_per_step: int
    """Tokens of one optimizer step over all ranks."""
    world_size: int
    flops_per_token: float | None
    """Training FLOPs per token (None: a model without a FLOP count, so no TFLOP/s or MFU)."""
    peak_flops: float | None
    """Dense peak FLOP/s of one GPU at the run's precision (None: no MFU)."""

    def __call__(self, seconds: float) -> dict[str, float]:
        tokens_per_s = self.tokens_per_step / seconds
        per_gpu = tokens_per_s / self.world_size
        out = {"tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": per_gpu}
        if self.flops_per_token is not None:
            achieved = self.flops_per_token * per_gpu
            out["tflops_per_gpu"] = achieved / 1e12
            if self.peak_flops:
                out["mfu"] = achieved / self.peak_flops
        return out


def resolve_peak(
    peak_tflops: float | None, device: torch.device, precision: str
) -> tuple[float | None, str]:
    """The peak FLOP/s per GPU that MFU divides by, and where it came from (for the log).

    `logger.peak_tflops` wins; else the table entry for this GPU and precision; on a CPU or
    an unknown GPU there is no MFU.
    """
    if peak_tflops:
        return peak_tflops * 1e12, f"{peak_tflops:g} TFLOP/s per device (logger.peak_tflops)"
    if device.type != "cuda":
        return None, "no MFU on CPU (set logger.peak_tflops to get one)"
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name, precision)
    if peak is None:
        return None, f"no MFU: {name} {precision} is not in the peak table (set logger.peak_tflops)"
    return peak, f"{peak / 1e12:g} TFLOP/s per GPU ({name}, {precision} dense)"


def memory_metrics(device: torch.device) -> dict[str, float]:
    """This rank's CUDA memory in GiB: allocated now, reserved by the caching allocator, and
    the peak allocated since the run started. Nothing on CPU."""
    if device.type != "cuda":
        return {}
    return {
        "mem_allocated_gib": torch.cuda.memory_allocated(device) / GIB,
        "mem_reserved_gib": torch.cuda.memory_reserved(device) / GIB,
        "mem_peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
    }


def fp16_metrics(engine: Any) -> dict[str, float]:
    """Under fp16: the dynamic loss scale, and the steps DeepSpeed skipped on overflow."""
    fp16 = getattr(engine, "fp16_enabled", None)
    if not (callable(fp16) and fp16()):
        return {}
    out = {"overflow_steps": float(getattr(engine, "skipped_steps", 0))}
    scale = getattr(engine.optimizer, "cur_scale", None)
    if scale is not None:
        out["loss_scale"] = float(scale)
    return out
