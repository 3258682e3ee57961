"""Assemble a run from its RunConfig and train it: model -> engine -> data -> loggers -> loop.

`python -m pretrain` calls `train(run)` after composing and checking the config; tools such
as `tools/bench_train.py` reuse the builders so they measure exactly what training runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pretrain import dist
from pretrain.checkpoint import manager as checkpoint
from pretrain.config import RunConfig
from pretrain.engine.deepspeed import build_engine, build_model
from pretrain.model.attention import resolve_impl
from pretrain.train.loggers import build_loggers
from pretrain.train.state import TrainState
from pretrain.train.trainer import Trainer

log = logging.getLogger("pretrain")


def train(run: RunConfig) -> TrainState:
    """Run one training job described by `run` (the process group must be up)."""
    dist.seed_everything(run.trainer.seed)
    data = build_data(run)  # first: bad data fails before the model costs anything
    model = build_model(run, lambda: instantiate(run.model))
    engine = build_engine(run, model)
    loggers = None
    if dist.is_main():
        run.run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(run.as_dict), run.run_dir / "config.yaml")
        loggers = build_loggers(
            run.logger.wandb, run.run_name, run.run_dir, run.as_dict,
            run.trainer.log_every, run.trainer.max_steps,
        )  # fmt: skip
    _log_summary(run, engine)

    state = TrainState()

    def save(s: TrainState) -> None:
        client_state = {"trainer": s.state_dict(), "data": data.state_dict(), "config": run.as_dict}
        checkpoint.save(engine, checkpoint.checkpoint_dir(run.run_dir), s.step, client_state)

    trainer = Trainer(
        engine, data, run.trainer, run.grad_accum, run.tokens_per_step, loggers, state,
        save=save, save_every=run.checkpoint.every_steps,
    )  # fmt: skip
    try:
        trainer.fit()
        every = run.checkpoint.every_steps
        if run.checkpoint.save_final and not (every and state.step % every == 0):
            save(state)  # unless the periodic save just wrote this step
    finally:
        if loggers is not None:
            loggers.close()
    log.info("done: %d steps, %s tokens, run dir %s", state.step, f"{state.tokens:,}", run.run_dir)
    return state


def build_data(run: RunConfig) -> Iterator[torch.Tensor]:
    """This rank's stream of (micro_batch_size, seq_len + 1) token batches."""
    return instantiate(
        run.data,
        vocab_size=run.vocab_size,
        seq_len=run.trainer.seq_len,
        micro_batch_size=run.trainer.micro_batch_size,
        grad_accum=run.grad_accum,
        seed=run.trainer.seed,
        rank=dist.rank(),
        world_size=dist.world_size(),
    )


def _log_summary(run: RunConfig, engine: object) -> None:
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    attn = getattr(run.model, "attn_impl", None)
    if attn is not None:
        attn = resolve_impl(attn, engine.device, run.dtype)
    log.info(
        "world %d | ZeRO-%d | %s | attention %s | %s params | %s tokens/step "
        "(global %d = micro %d x accum %d x world %d) | run dir %s",
        run.world_size, run.deepspeed.zero_stage, run.precision, attn or "n/a",
        f"{n_params:,}", f"{run.tokens_per_step:,}", run.trainer.global_batch_size,
        run.trainer.micro_batch_size, run.grad_accum, run.world_size, run.run_dir,
    )  # fmt: skip
