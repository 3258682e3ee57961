"""Assemble a run from its RunConfig and train it, in build order: data -> resume plan ->
model -> engine (the TrainModule) -> restored state -> loggers and callbacks -> the loop.

`python -m pretrain` calls `train(run)` after composing and checking the config; tools such
as `tools/bench_train.py` reuse the builders so they measure exactly what training runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pretrain import dist
from pretrain.checkpoint import manager as checkpoint
from pretrain.checkpoint.export import (
    TOKENIZER_FILE,
    load_hf_weights,
)
from pretrain.checkpoint.resume import ResumePlan, plan_resume
from pretrain.compress.prune import keep_zeros
from pretrain.config import RunConfig
from pretrain.data.build import build_data, check_val_data, document_split
from pretrain.data.chat import CHAT_TEMPLATE_FILE
from pretrain.data.source import DataSource
from pretrain.data.tokenizer import load as load_tokenizer
from pretrain.engine.deepspeed import build_engine, build_model, sequence_shard, trainer_clip
from pretrain.engine.module import DeepSpeedTrainModule
from pretrain.engine.optim import schedule_warnings
from pretrain.eval.perplexity import build_evaluator
from pretrain.model.expert_parallel import ExpertShard
from pretrain.model.family import family_of, model_fields
from pretrain.train.callbacks import (
    ArtifactCallback,
    Callback,
    CheckpointCallback,
    EvalCallback,
    ExportCallback,
    LogCallback,
    MetricsCallback,
    ProfilerCallback,
)
from pretrain.train.loggers import Loggers, build_loggers
from pretrain.train.metrics import Throughput, resolve_peak
from pretrain.train.module import TrainModule
from pretrain.train.profiling import StepProfiler
from pretrain.train.signals import Preempted, StopSignals
from pretrain.train.state import TrainState
from pretrain.train.summary import log_summary
from pretrain.train.trainer import Trainer
from pretrain.train.watchdog import Watchdog

log = logging.getLogger("pretrain")


def train(run: RunConfig) -> TrainState:
    """Run one training job described by `run` (the process group must be up).

    Raises `Preempted` after a stop signal, once the checkpoint of that step is committed.
    """
    # From the start: a stop during set-up ends after step 1.
    with StopSignals() as signals, Watchdog(run.trainer.hang_timeout_s) as watchdog:
        return _train(run, signals, watchdog)


def _train(run: RunConfig, signals: StopSignals, watchdog: Watchdog) -> TrainState:
    """The build order: checks -> data -> resume plan -> model and engine -> restored state
    -> loggers -> loop -> final save and export."""
    if dist.is_main():
        for warning in schedule_warnings(run.optim, run.trainer.max_steps):
            log.warning("%s", warning)
    dist.seed_everything(run.trainer.seed)
    # Cheap checks first: bad data or a checkpoint of another shape fail before the model
    # and the engine cost anything.
    data = build_data(run)
    check_val_data(run, data)
    documents = document_split(run.as_dict["model"], data)
    resume = plan_resume(run, checkpoint.checkpoint_dir(run.run_dir), data)
    model = build_model(run, lambda expert: build_module(run, expert))
    init_from = run.model.get("init_from")
    if init_from and resume.path is None:
        load_hf_weights(model, Path(init_from), run.as_dict["model"])
    engine = build_engine(run, model, load_universal=resume.universal)
    if dist.sequence_size() > 1:  # the weights are made: each rank of a sequence group its
        torch.manual_seed(run.trainer.seed + dist.sequence_rank())  # own dropout masks
    family = family_of(run.model)
    module = DeepSpeedTrainModule(engine, trainer_clip(run), run.optim, sequence_shard(),
                                  documents, lambda: family.step_metrics(model),
                                  lambda stepped: family.after_step(model, stepped))  # fmt: skip
    state, wandb_run_id = restore(run, module, data, resume)
    if run.model.get("keep_zeros"):  # the weights are final: init_from's, or the checkpoint's
        log.info("model.keep_zeros: %s pruned weights held at zero", f"{keep_zeros(model):,}")
    loggers = _start_logging(run, state, resume.path is not None, wandb_run_id)
    peak, peak_source = resolve_peak(run.logger.peak_tflops, engine.device, run.precision)
    throughput = Throughput(run.tokens_per_step, run.world_size, model_flops_per_token(run), peak)
    log_summary(run, engine, state, throughput, peak_source, loggers)
    callbacks = build_callbacks(run, module, data, loggers, throughput)
    trainer = Trainer(module, data, run.trainer, run.grad_accum, run.tokens_per_step, state,
                      callbacks, signals, watchdog)  # fmt: skip
    trainer.fit()
    if trainer.stop_signal is not None:
        raise Preempted(trainer.stop_signal, state.step)
    log.info("done: %d steps, %s tokens, run dir %s", state.step, f"{state.tokens:,}", run.run_dir)
    return state


def build_callbacks(
    run: RunConfig, module: TrainModule, data: DataSource, loggers: Loggers | None,
    throughput: Throughput,
) -> list[Callback]:  # fmt: skip
    """The run's side effects, in the order they act on each step (callbacks.py): the
    profiler (its span ends with the step's compute), figures, evaluation, the config's
    `trainer.callbacks` (what they add to the record is logged), logging, saving, export."""
    t, c = run.trainer, run.checkpoint
    callbacks: list[Callback] = []
    if t.profile_steps:
        first, last = t.profile_steps
        callbacks.append(ProfilerCallback(StepProfiler(
            run.run_dir / "profile", first, last, dist.rank(), module.device, t.profile_memory
        )))  # fmt: skip
    callbacks.append(MetricsCallback(throughput))
    evaluator = build_evaluator(run, module, data)
    if evaluator is not None:
        callbacks.append(EvalCallback(evaluator, run.last_step))
    callbacks += [instantiate(spec) for spec in t.callbacks]
    if loggers is not None:
        callbacks += [LogCallback(loggers), ArtifactCallback(loggers)]
    ckpt_dir = checkpoint.checkpoint_dir(run.run_dir)
    callbacks.append(CheckpointCallback(
        _saver(run, module, data, loggers, ckpt_dir), ckpt_dir, c.every_steps, c.every_minutes,
        c.save_final or c.export_hf, c.keep_last, c.keep_every,
    ))  # fmt: skip
    if c.export_hf:
        callbacks.append(ExportCallback(ckpt_dir, run.run_dir / "hf"))
    return callbacks


def restore(
    run: RunConfig, module: TrainModule, data: DataSource, resume: ResumePlan
) -> tuple[TrainState, str | None]:
    """Load the planned checkpoint into module and data: (the trainer's state, the W&B run
    id to continue); a fresh state when there is none."""
    state = TrainState()
    if resume.path is None:
        return state, None
    client_state, rank_states = module.load(resume.path, resume.route)
    saved_sequence = resume.saved_sequence
    if resume.route == "same":
        data.load_state_dict(rank_states[0]["data"])
    else:
        _restore_data(run, data, resume, client_state, rank_states)
        log.warning(
            "resumed %s, saved by %d rank(s) with ZeRO-%d (sequence parallel %d, expert "
            "parallel %d), on %d rank(s) with ZeRO-%d (sequence parallel %d, expert parallel "
            "%d): weights, Adam moments and LR schedule carried over exactly%s", resume.path,
            *resume.saved_layout, saved_sequence, resume.saved_expert, run.world_size,
            run.deepspeed.zero_stage, run.parallel.sequence, run.parallel.expert,
            {"universal": " (via DeepSpeed's universal checkpoint)",
             "layout_free": " (via the checkpoint's layout-free state)"}.get(resume.route, ""),
        )  # fmt: skip
    state.load_state_dict(client_state["trainer"])
    log.info("resumed from %s at step %d (%s tokens)", resume.path, state.step,
             f"{state.tokens:,}")  # fmt: skip
    return state, client_state.get("wandb_run_id")


def _restore_data(
    run: RunConfig, data: DataSource, resume: ResumePlan, client_state: dict[str, Any],
    rank_states: list[dict[str, Any]],
) -> None:  # fmt: skip
    """The data position of a checkpoint saved in another layout: each rank its own saved
    one where the data ranks are the same (only the sharding of the weights changed), else
    moved to this run's number of data ranks (one saved position per sequence group)."""
    same_ranks = (resume.saved_layout[0], resume.saved_sequence) == (
        run.world_size,
        run.parallel.sequence,
    )
    if same_ranks:
        data.load_state_dict(rank_states[dist.rank()]["data"])
        return
    step = int(client_state["trainer"]["step"])
    data.load_resharded_state([r["data"] for r in rank_states[:: resume.saved_sequence]], step)


def _start_logging(
    run: RunConfig, state: TrainState, resumed: bool, wandb_run_id: str | None
) -> Loggers | None:
    """Rank 0: the run dir's config.yaml, and the loggers (console, metrics.jsonl, W&B)."""
    if not dist.is_main():
        return None
    run.run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(run.as_dict), run.run_dir / "config.yaml")
    return build_loggers(
        run.logger, run.run_name, run.run_dir, run.as_dict, run.trainer.log_every,
        run.last_step, resume_step=state.step if resumed else None, wandb_run_id=wandb_run_id,
    )  # fmt: skip


def _saver(
    run: RunConfig, module: TrainModule, data: DataSource, loggers: Loggers | None,
    ckpt_dir: Path,
) -> Callable[[TrainState], Path]:  # fmt: skip
    """What saving a checkpoint at a state means for this run: the module's state, the
    data position, the trainer state and config, the tokenizer."""
    tokenizer = data.tokenizer  # travels with each checkpoint, for export
    files = {TOKENIZER_FILE: load_tokenizer(tokenizer).to_str()} if tokenizer else {}
    if data.chat_template is not None:  # so is the chat template, for export and generation
        files[CHAT_TEMPLATE_FILE] = data.chat_template

    def save(s: TrainState) -> Path:
        client_state = {
            "trainer": s.state_dict(),
            "config": run.as_dict,
            "wandb_run_id": loggers.wandb_run_id if loggers else None,
            "data_tokenizer_sha256": data.tokenizer_sha256,
        }
        rank_state = {"data": data.state_dict()}
        return module.save(ckpt_dir, s.step, client_state, rank_state, files)

    return save


def build_module(run: RunConfig, expert: ExpertShard | None = None) -> torch.nn.Module:
    """The model the config describes, with fresh weights (init_from is applied after);
    `expert`: this rank's place in its expert-parallel group."""
    return family_of(run.model).build(model_fields(run.as_dict["model"]), expert)


def model_flops_per_token(run: RunConfig) -> float | None:
    """Training FLOPs per token of the model (None: its family has no count)."""
    model = run.as_dict["model"]
    return family_of(model).flops_per_token(model_fields(model), run.trainer.seq_len)
