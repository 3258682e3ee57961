"""Assemble a run from its RunConfig and train it: model -> engine -> data -> loggers -> loop.

`python -m pretrain` calls `train(run)` after composing and checking the config; tools such
as `tools/bench_train.py` reuse the builders so they measure exactly what training runs.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pretrain import dist
from pretrain.checkpoint import manager as checkpoint
from pretrain.checkpoint import reshard
from pretrain.checkpoint.export import (
    TOKENIZER_FILE,
    check_same_tokenizer,
    load_hf_weights,
)
from pretrain.config import ConfigError, RunConfig
from pretrain.data.source import DataContext, DataSource
from pretrain.data.stream import DataError, shards_source
from pretrain.data.tokenizer import load as load_tokenizer
from pretrain.engine.deepspeed import build_engine, build_model, trainer_clip
from pretrain.engine.module import DeepSpeedTrainModule
from pretrain.engine.optim import schedule_warnings
from pretrain.eval.perplexity import Evaluator, byte_lengths
from pretrain.model.attention import resolve_impl
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
    _check_val_data(run, data)
    resume = plan_resume(run, checkpoint.checkpoint_dir(run.run_dir), data)
    model = build_model(run, lambda: build_module(run))
    init_from = run.model.get("init_from")
    if init_from and resume.path is None:
        load_hf_weights(model, Path(init_from), run.as_dict["model"])
    engine = build_engine(run, model, load_universal=resume.universal)
    module = DeepSpeedTrainModule(engine, trainer_clip(run), run.optim)
    state, wandb_run_id = restore(run, module, data, resume)
    loggers = _start_logging(run, state, resume.path is not None, wandb_run_id)
    peak, peak_source = resolve_peak(run.logger.peak_tflops, engine.device, run.precision)
    throughput = Throughput(run.tokens_per_step, run.world_size, model_flops_per_token(run), peak)
    _log_summary(run, engine, state, throughput, peak_source, loggers)
    callbacks = build_callbacks(run, module, data, loggers, throughput)
    trainer = Trainer(module, data, run.trainer, run.grad_accum, run.tokens_per_step, state,
                      callbacks, signals, watchdog)  # fmt: skip
    trainer.fit()
    if trainer.stop_signal is not None:
        raise Preempted(trainer.stop_signal, state.step)
    log.info("done: %d steps, %s tokens, run dir %s", state.step, f"{state.tokens:,}", run.run_dir)
    return state


def build_callbacks(
    run: RunConfig, module: DeepSpeedTrainModule, data: DataSource, loggers: Loggers | None,
    throughput: Throughput,
) -> list[Callback]:  # fmt: skip
    """The run's side effects, in the order they act on each step (callbacks.py): figures,
    evaluation, profiler, logging, saving, then the config's own `trainer.callbacks`."""
    t, c = run.trainer, run.checkpoint
    callbacks: list[Callback] = [MetricsCallback(throughput)]
    evaluator = build_evaluator(run, module.engine, data)
    if evaluator is not None:
        callbacks.append(EvalCallback(evaluator, last_step(run)))
    if t.profile_steps:
        first, last = t.profile_steps
        callbacks.append(ProfilerCallback(StepProfiler(
            run.run_dir / "profile", first, last, dist.rank(), module.device, t.profile_memory
        )))  # fmt: skip
    if loggers is not None:
        callbacks += [LogCallback(loggers), ArtifactCallback(loggers)]
    ckpt_dir = checkpoint.checkpoint_dir(run.run_dir)
    callbacks.append(CheckpointCallback(
        _saver(run, module, data, loggers, ckpt_dir), ckpt_dir, c.every_steps, c.every_minutes,
        c.save_final or c.export_hf, c.keep_last, c.keep_every,
    ))  # fmt: skip
    if c.export_hf:
        callbacks.append(ExportCallback(ckpt_dir, run.run_dir / "hf"))
    return callbacks + [instantiate(spec) for spec in t.callbacks]


def _check_val_data(run: RunConfig, data: object) -> None:
    """With evaluations on, a missing val split fails now, not at step N."""
    if run.trainer.eval_every_steps:
        build_val_data(run)
        for path in run.trainer.eval_data.values():
            build_named_val_data(run, path, data.tokenizer)


@dataclass(frozen=True)
class ResumePlan:
    """Where a run resumes from, known before the model is built."""

    path: Path | None
    """The checkpoint (None: a fresh start)."""
    saved_layout: tuple[int, int]
    """(world size, ZeRO stage) it was saved with (this run's own when fresh)."""
    universal: bool
    """It loads through DeepSpeed's universal format (another layout)."""


def plan_resume(run: RunConfig, ckpt_dir: Path, data: object) -> ResumePlan:
    """Pick the checkpoint and check it fits this run (model shape, the data's tokenizer,
    the layout change), converting it for another layout when needed."""
    layout = (run.world_size, run.deepspeed.zero_stage)
    path = resume_path(run, ckpt_dir)
    if path is None or not checkpoint.is_complete(path):
        return ResumePlan(path, layout, False)
    client = checkpoint.read_client_state(path)
    check_same_model(client["config"], run, path)
    check_same_tokenizer(path, client.get("data_tokenizer_sha256"), data.tokenizer_sha256,
                         data.allow_tokenizer_change)  # fmt: skip
    saved_layout = reshard.saved_layout(client["config"])
    universal = reshard.needs_universal(saved_layout, layout, path)
    if universal:
        reshard.convert(path)
    return ResumePlan(path, saved_layout, universal)


def restore(
    run: RunConfig, module: TrainModule, data: DataSource, resume: ResumePlan
) -> tuple[TrainState, str | None]:
    """Load the planned checkpoint into module and data: (the trainer's state, the W&B run
    id to continue); a fresh state when there is none."""
    state = TrainState()
    if resume.path is None:
        return state, None
    layout = (run.world_size, run.deepspeed.zero_stage)
    resharded = resume.saved_layout != layout
    client_state, rank_states = module.load(resume.path, resharded, resume.universal)
    if not resharded:
        data.load_state_dict(rank_states[0]["data"])
    else:
        step = int(client_state["trainer"]["step"])
        data.load_resharded_state([r["data"] for r in rank_states], step)
        log.warning(
            "resumed %s, saved by %d rank(s) with ZeRO-%d, on %d rank(s) with ZeRO-%d: "
            "weights, Adam moments and LR schedule carried over exactly%s", resume.path,
            *resume.saved_layout, *layout,
            " (via DeepSpeed's universal checkpoint)" if resume.universal else "",
        )  # fmt: skip
    state.load_state_dict(client_state["trainer"])
    log.info("resumed from %s at step %d (%s tokens)", resume.path, state.step,
             f"{state.tokens:,}")  # fmt: skip
    return state, client_state.get("wandb_run_id")


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
        last_step(run), resume_step=state.step if resumed else None, wandb_run_id=wandb_run_id,
    )  # fmt: skip


def _saver(
    run: RunConfig, module: TrainModule, data: DataSource, loggers: Loggers | None,
    ckpt_dir: Path,
) -> Callable[[TrainState], Path]:  # fmt: skip
    """What saving a checkpoint at a state means for this run: the module's state, the
    data position, the trainer state and config, the tokenizer."""
    tokenizer = data.tokenizer  # travels with each checkpoint, for export
    files = {TOKENIZER_FILE: load_tokenizer(tokenizer).to_str()} if tokenizer else {}

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


def resume_path(run: RunConfig, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from: checkpoint.resume=auto|none|<step_N dir>."""
    if run.checkpoint.resume == "none":
        return None
    if run.checkpoint.resume == "auto":
        return checkpoint.choose_resume(ckpt_dir, run.checkpoint.verify)
    path = Path(run.checkpoint.resume)
    problems = (
        checkpoint.verify_timed(path)
        if run.checkpoint.verify and checkpoint.is_complete(path)
        else []
    )
    if problems:
        raise checkpoint.CheckpointError(
            f"checkpoint.resume={path} fails its checksums: {'; '.join(problems)}. Restore it "
            "from a copy, or resume from another checkpoint (checkpoint.verify=false loads it "
            "unchecked)"
        )
    return path


def check_same_model(saved: dict, run: RunConfig, path: Path) -> None:
    """Refuse to resume a checkpoint of another model shape, naming every differing key (the
    family's `shape_keys`; the attention kernel or dropout may differ)."""
    new = run.as_dict["model"]
    family = family_of(new)
    old = family.saved_fields(saved.get("model", {}))
    diff = [f"model.{k}: checkpoint {old.get(k)!r}, config {new.get(k)!r}"
            for k in family.shape_keys if k in old and old.get(k) != new.get(k)]  # fmt: skip
    rows = [family.table_rows(m) for m in (old, new)]
    if not diff and rows[0] != rows[1]:
        diff.append(
            f"model.vocab_multiple: checkpoint {old.get('vocab_multiple')!r} ({rows[0]} table "
            f"rows), config {new.get('vocab_multiple')!r} ({rows[1]} rows)"
        )
    if diff:
        raise ConfigError([
            f"{path} holds another model shape ({'; '.join(diff)}): use the checkpoint's "
            "model settings, or checkpoint.resume=none (or another run_dir) to start afresh"
        ])  # fmt: skip


def build_module(run: RunConfig) -> torch.nn.Module:
    """The model the config describes, with fresh weights (init_from is applied after)."""
    return family_of(run.model).build(model_fields(run.as_dict["model"]))


def data_context(run: RunConfig, split: str = "train") -> DataContext:
    """What this rank's data source is built for."""
    t = run.trainer
    return DataContext(run.vocab_size, t.seq_len, t.micro_batch_size, run.grad_accum, t.seed,
                       dist.data_rank(), dist.data_size(), split)  # fmt: skip


def build_data(run: RunConfig) -> DataSource:
    """This rank's stream of (micro_batch_size, seq_len + 1) token batches."""
    return _instantiate_data(run, data_context(run))


def build_val_data(run: RunConfig) -> Iterator[torch.Tensor]:
    """This rank's share of the val split: every rank reads the split whole (as the one rank
    of one, so a val split of a single shard serves any number of ranks) and keeps every
    data_size()-th micro-batch from its data rank on. The same batches at every call."""
    extra = {"num_workers": 0} if "num_workers" in run.data else {}  # a few batches per eval
    stream = _instantiate_data(run, data_context(run).alone("val"), **extra)
    return itertools.islice(stream, dist.data_rank(), None, dist.data_size())


def build_named_val_data(run: RunConfig, path: str, tokenizer: str | None) -> Iterator:
    """This rank's share of a trainer.eval_data set: a shard directory's val split, or every
    shard of a glob, read and strided like `build_val_data`."""
    manifest = Path(path).is_dir()  # a glob has no splits (all of it) and no tokenizer record
    ctx = data_context(run).alone("val" if manifest else "train")
    stream = shards_source(ctx, path=path, num_workers=0,
                           tokenizer=tokenizer if manifest else None)  # fmt: skip
    return itertools.islice(stream, dist.data_rank(), None, dist.data_size())


def _instantiate_data(run: RunConfig, ctx: DataContext, **extra: object) -> DataSource:
    """The data source of `run.data` (its `_target_` builder) for `ctx`."""
    try:
        return instantiate(run.data, ctx, **extra)
    except InstantiationException as e:  # Hydra wraps the data source's own error
        if isinstance(e.__cause__, DataError):
            raise e.__cause__ from None
        raise


def build_evaluator(
    run: RunConfig, engine: torch.nn.Module, train_data: DataSource
) -> Evaluator | None:
    """trainer.eval_every_steps > 0: the held-out scorer, `eval_tokens` over all ranks per set
    (with bits per byte when the training data names its tokenizer)."""
    t = run.trainer
    if not t.eval_every_steps:
        return None
    per_batch = t.micro_batch_size * t.seq_len * run.parallel.data
    n_batches = -(-t.eval_tokens // per_batch)
    tokenizer = train_data.tokenizer
    # Bits per byte need the bytes behind each token id.
    table = byte_lengths(load_tokenizer(tokenizer), run.vocab_size) if tokenizer else None
    sets = {"val": lambda: build_val_data(run)}
    for name, path in t.eval_data.items():  # their tokenizer was checked once, at start
        sets[f"val_{name}"] = functools.partial(build_named_val_data, run, path, None)
    return Evaluator(engine, sets, n_batches, engine.device, table)


def last_step(run: RunConfig) -> int:
    """The step this job ends at: trainer.max_steps, or trainer.stop_at_step when earlier."""
    stop = run.trainer.stop_at_step
    return run.trainer.max_steps if stop is None else min(stop, run.trainer.max_steps)


def model_flops_per_token(run: RunConfig) -> float | None:
    """Training FLOPs per token of the model (None: its family has no count)."""
    model = run.as_dict["model"]
    return family_of(model).flops_per_token(model_fields(model), run.trainer.seq_len)


def _saving(run: RunConfig) -> str:
    """What will be saved, when, and where, in words."""
    c, end = run.checkpoint, last_step(run)
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


def _log_summary(
    run: RunConfig, engine: object, state: TrainState, throughput: Throughput,
    peak_source: str, loggers: Loggers | None,
) -> None:  # fmt: skip
    """What a person checks first in a log: where, how big, how fast it should be."""
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    attn = run.model.get("attn_impl")
    if attn is not None:
        attn = resolve_impl(attn, engine.device, run.dtype)
    t = run.trainer
    end = last_step(run)
    flops = throughput.flops_per_token
    lines = [
        f"run        {run.run_name} -> {run.run_dir}",
        f"world      {run.world_size} rank(s) on {engine.device.type}"
        f" | ZeRO-{run.deepspeed.zero_stage} | {run.precision} | attention {attn or 'n/a'}"
        f" | compile {t.compile}",
        f"model      {n_params:,} parameters"
        + (f" | {flops:.4g} FLOP/token (6N + 12*L*T*d, full attention)" if flops else ""),
        f"batch      {run.tokens_per_step:,} tokens/step = {t.global_batch_size} seqs x {t.seq_len}"
        f" (micro {t.micro_batch_size} x accum {run.grad_accum} x world {run.world_size})",
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
