"""The start-up summary: what a person checks first in a run's log (where, how big, how
fast it should be, what will be saved)."""

from __future__ import annotations

import logging

from pretrain.checkpoint import manager as checkpoint
from pretrain.config import RunConfig
from pretrain.engine.optim import schedule_warnings
from pretrain.model.attention import resolve_impl
from pretrain.train.loggers import Loggers
from pretrain.train.metrics import Throughput
from pretrain.train.state import TrainState

log = logging.getLogger("pretrain")


def _saving(run: RunConfig) -> str:
    """What will be saved, when, and where, in words."""
    c, end = run.checkpoint, run.last_step
    when = [f"every {c.every_steps} steps"] if c.every_steps else []
    when += [f"every {c.every_minutes:g} min"] if c.every_minutes else []
    if c.save_final or c.export_hf:
        early = ", or where early stopping ends it" if run.trainer.early_stopping_patience else ""
        when.append(f"at the last step ({end}{early})")
    when.append("on SIGTERM/SIGUSR1/SIGINT")
    keep = f"keep last {c.keep_last}" if c.keep_last else "keep all"
    keep += f" + every multiple of {c.keep_every}" if c.keep_every and c.keep_last else ""
    text = f"{', '.join(when)} -> {checkpoint.checkpoint_dir(run.run_dir)}/step_N ({keep})"
    if not (c.save_final or c.export_hf or (c.every_steps and end % c.every_steps == 0)):
        text += f"; step {end} (the end) NOT saved: checkpoint.save_final=false"
    return text + (f"; HF export -> {run.run_dir / 'hf'}" if c.export_hf else "")


def log_summary(
    run: RunConfig, engine: object, state: TrainState, throughput: Throughput,
    peak_source: str, loggers: Loggers | None,
) -> None:  # fmt: skip
    """What a person checks first in a log: where, how big, how fast it should be."""
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    attn = run.model.get("attn_impl")
    if attn is not None:
        attn = resolve_impl(attn, engine.device, run.dtype)
    t = run.trainer
    end = run.last_step
    flops = throughput.flops_per_token
    lines = [
        f"run        {run.run_name} -> {run.run_dir}",
        f"world      {run.world_size} rank(s) on {engine.device.type}"
        + (
            f" ({run.parallel.data} data x {sp} sequence: {t.seq_len // sp} tokens of each "
            "sequence per rank)"
            if (sp := run.parallel.sequence) > 1
            else ""
        )
        + f" | ZeRO-{run.deepspeed.zero_stage} | {run.precision} | attention {attn or 'n/a'}"
        f" | compile {t.compile}",
        f"model      {n_params:,} parameters"
        + (f" | {flops:.4g} FLOP/token (6N + 12*L*T*d, full attention)" if flops else ""),
        f"batch      {run.tokens_per_step:,} tokens/step = {t.global_batch_size} seqs x {t.seq_len}"
        f" (micro {t.micro_batch_size} x accum {run.grad_accum} x "
        + (
            f"world {run.world_size})"
            if run.parallel.sequence == 1
            else f"data {run.parallel.data})"
        ),
        f"schedule   steps {state.step + 1}-{end} of {t.max_steps}"
        f" ({(end - state.step) * run.tokens_per_step:,} tokens to go) | lr {run.optim.lr:g},"
        f" warmup {run.optim.warmup_steps} steps, cosine to {run.optim.min_lr_ratio:g}x"
        + (
            " (warmup >= max_steps: the LR never peaks, see the warning above)"
            if schedule_warnings(run.optim, t.max_steps)
            else ""
        ),
        f"checkpoint {_saving(run)}",
        f"MFU basis  {peak_source}",
    ]
    if loggers is not None:
        wandb = loggers.wandb
        lines.append(f"W&B        {wandb.where if wandb else 'disabled'}")
    log.info("\n".join(lines))
