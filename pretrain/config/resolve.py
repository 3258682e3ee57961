"""From the composed Hydra config to a checked, frozen `RunConfig` and the DeepSpeed dict.

`resolve()` derives what the user does not set by hand (precision and device on this
machine, gradient accumulation, tokens per step), checks fields against each other, and
reports every problem at once, each naming its key and the fix, before any model is built.
Below the entry point nothing sees the raw Hydra config: each component gets its section.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pretrain.config.parallel import ParallelDims
from pretrain.config.schema import (
    CheckpointConfig,
    DeepSpeedConfig,
    LoggerConfig,
    OptimConfig,
    TrainerConfig,
)
from pretrain.model.family import family_of, model_fields

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
WANDB_MODES = ("online", "offline", "disabled")
PROGRESS_MODES = ("auto", "bar", "lines")
AC_POLICIES = ("none", "full", "selective")
ADAMW_IMPLS = ("auto", "fused", "foreach", "loop", "cpu_adam")


class ConfigError(ValueError):
    """One or more config problems; the message lists them all."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__(
            "invalid config:\n" + "\n".join(f"  - {e}" for e in errors)
            + "\nFix these keys (on the command line: key=value) and run again."
        )  # fmt: skip


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, checked and with derived values filled in."""

    model: DictConfig
    """The model section; its `_target_` names the model family (model/family.py)."""
    data: DictConfig
    """The data section; its `_target_` is the data family's builder (data/source.py)."""
    optim: OptimConfig
    deepspeed: DeepSpeedConfig
    trainer: TrainerConfig
    logger: LoggerConfig
    checkpoint: CheckpointConfig
    precision: str
    """bf16 | fp16 | fp32, after resolving auto for this machine."""
    device_type: str
    """cuda | cpu."""
    run_name: str
    run_dir: Path
    world_size: int
    """Every rank of the run (the product of `parallel`'s sizes)."""
    parallel: ParallelDims
    """The ranks' arrangement: `parallel.data` of them split each batch."""
    grad_accum: int
    """Micro-batches per rank per optimizer step: global / (micro * parallel.data)."""
    vocab_size: int
    as_dict: dict[str, Any]
    """The resolved config as plain data: written to config.yaml and sent to W&B."""

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype that `precision` stands for."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            self.precision
        ]

    @property
    def tokens_per_step(self) -> int:
        return self.trainer.global_batch_size * self.trainer.seq_len

    @property
    def last_step(self) -> int:
        """The step this job ends at (TrainerConfig.last_step)."""
        return self.trainer.last_step


def _section(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.to_object(cfg[key])


def resolve(cfg: DictConfig, world_size: int, cuda_available: bool | None = None) -> RunConfig:
    """Check `cfg` for a run on `world_size` ranks; raise ConfigError listing every problem."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    errors: list[str] = []
    trainer: TrainerConfig = _section(cfg, "trainer")
    optim: OptimConfig = _section(cfg, "optim")
    ds: DeepSpeedConfig = _section(cfg, "deepspeed")
    logger: LoggerConfig = _section(cfg, "logger")
    checkpoint: CheckpointConfig = _section(cfg, "checkpoint")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    device_type, precision = _device_and_precision(trainer, cfg.precision, cuda_available, errors)
    parallel = ParallelDims.for_world(world_size, int(cfg.parallel.sequence),
                                      int(cfg.parallel.expert))  # fmt: skip
    errors.extend(parallel.errors(world_size))
    grad_accum = _batch_geometry(trainer, parallel, errors)
    _check_model(model, trainer, ds, parallel, errors)
    _check_optim(optim, ds, errors)
    _check_engine(trainer, ds, errors)
    _check_evaluation(trainer, errors)
    _check_callbacks(trainer, errors)
    _check_logger(logger, errors)
    _check_checkpoint(checkpoint, errors)

    if errors:
        raise ConfigError(errors)

    as_dict = OmegaConf.to_container(cfg, resolve=True)
    as_dict["precision"] = precision
    as_dict["trainer"]["global_batch_size"] = trainer.global_batch_size
    as_dict["trainer"]["activation_checkpointing"] = trainer.activation_checkpointing
    as_dict["derived"] = {
        "device": device_type,
        "world_size": world_size,
        "parallel": parallel.as_dict(),
        "grad_accum": grad_accum,
        "tokens_per_step": trainer.global_batch_size * trainer.seq_len,
    }
    return RunConfig(
        model=cfg.model,
        data=cfg.data,
        optim=optim,
        deepspeed=ds,
        trainer=trainer,
        logger=logger,
        checkpoint=checkpoint,
        precision=precision,
        device_type=device_type,
        run_name=cfg.run_name,
        run_dir=Path(cfg.run_dir),
        world_size=world_size,
        parallel=parallel,
        grad_accum=grad_accum,
        vocab_size=int(cfg.model.vocab_size),
        as_dict=as_dict,
    )


def _device_and_precision(
    trainer: TrainerConfig, precision: str, cuda_available: bool, errors: list[str]
) -> tuple[str, str]:
    """(device type, precision) on this machine, `auto` resolved."""
    device_type = trainer.device
    if device_type == "auto":
        device_type = "cuda" if cuda_available else "cpu"
    elif device_type not in ("cpu", "cuda"):
        errors.append(f"trainer.device={device_type!r}: choose auto, cpu or cuda")
    elif device_type == "cuda" and not cuda_available:
        errors.append("trainer.device=cuda but torch sees no CUDA GPU: use trainer.device=auto")
    if precision not in PRECISIONS:
        errors.append(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    elif precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    elif precision == "fp16" and device_type != "cuda":
        errors.append(
            "precision=fp16 needs a GPU (DeepSpeed refuses fp16 on CPU): use bf16 or fp32"
        )

    return device_type, precision


def _batch_geometry(trainer: TrainerConfig, parallel: ParallelDims, errors: list[str]) -> int:
    """Micro-batches per optimizer step (global = micro x accum x data ranks); fills in
    global_batch_size from global_batch_tokens."""
    for key in (
        "max_steps",
        "global_batch_size",
        "micro_batch_size",
        "seq_len",
        "log_every",
        "max_bad_steps",
    ):
        if getattr(trainer, key) < 1:
            errors.append(f"trainer.{key}={getattr(trainer, key)}: must be >= 1")
    if trainer.hang_timeout_s < 0:
        errors.append(
            f"trainer.hang_timeout_s={trainer.hang_timeout_s}: must be >= 0 (0: no hang timeout)"
        )
    tokens = trainer.global_batch_tokens
    if tokens is not None and trainer.seq_len >= 1:
        if tokens < 1 or tokens % trainer.seq_len:
            errors.append(
                f"trainer.global_batch_tokens={tokens} is not a positive multiple of "
                f"trainer.seq_len={trainer.seq_len}: batches hold whole sequences"
            )
        else:
            trainer.global_batch_size = tokens // trainer.seq_len
    grad_accum = 1
    per_step = trainer.micro_batch_size * parallel.data
    if per_step >= 1 and trainer.global_batch_size >= 1:
        if trainer.global_batch_size % per_step:
            errors.append(
                f"trainer.global_batch_size={trainer.global_batch_size} is not divisible by "
                f"trainer.micro_batch_size={trainer.micro_batch_size} x data-parallel ranks="
                f"{parallel.data}"
                f" = {per_step}: make global_batch_size a multiple of {per_step} "
                "or change micro_batch_size"
            )
        else:
            grad_accum = trainer.global_batch_size // per_step

    return grad_accum


def _check_model(
    model: dict[str, Any], trainer: TrainerConfig, ds: DeepSpeedConfig, parallel: ParallelDims,
    errors: list[str],
) -> None:  # fmt: skip
    """The model family's own checks, its sequence parallelism, the initialisation source,
    the sequence length, and its block among ZeRO-3's leaves when compiled."""
    try:
        family = family_of(model)
    except ValueError as e:
        errors.append(str(e))
        return
    errors.extend(family.errors(model_fields(model)))
    if parallel.sequence > 1:
        errors.extend(family.sequence_errors(model_fields(model), parallel.sequence,
                                             trainer.seq_len))  # fmt: skip
    if parallel.expert > 1:
        errors.extend(family.expert_errors(model_fields(model), parallel.expert))
    init_from = model.get("init_from")
    if init_from and family.hf is None:
        errors.append(f"model.init_from={init_from}: {model['_target_']} has no Hugging Face "
                      "counterpart to initialise from")  # fmt: skip
    elif init_from and not (Path(init_from) / "config.json").is_file():
        errors.append(
            f"model.init_from={init_from}: no config.json there; give a Hugging Face "
            f"{' or '.join(family.hf.model_types)} directory (tools/export_hf.py writes one)"
        )
    if model.get("keep_zeros") and ds.zero_stage == 3:
        errors.append("model.keep_zeros masks the gradients of whole weights, which ZeRO-3 "
                      "partitions: use deepspeed=zero0, zero1 or zero2")  # fmt: skip
    _check_compiled_block(family.target, family.block, trainer, ds, errors)
    max_seq_len = model.get("max_seq_len")
    if max_seq_len is not None and trainer.seq_len > max_seq_len:
        errors.append(
            f"trainer.seq_len={trainer.seq_len} exceeds model.max_seq_len={max_seq_len}: "
            "shorten trainer.seq_len or raise model.max_seq_len"
        )


def _check_compiled_block(
    target: str, block: str | None, trainer: TrainerConfig, ds: DeepSpeedConfig,
    errors: list[str],
) -> None:  # fmt: skip
    """Compiled under ZeRO-3, the family's block must be a ZeRO-3 leaf (by class name, or
    qualified by the model's module)."""
    if not (trainer.compile and ds.zero_stage == 3 and block):
        return
    qualified = f"{target.rpartition('.')[0]}.{block}"
    if not {block, qualified} & set(ds.stage3_leaf_modules):
        errors.append(
            f"trainer.compile=true with deepspeed.zero_stage=3 and "
            f"deepspeed.stage3_leaf_modules={list(ds.stage3_leaf_modules)}: ZeRO-3's hooks "
            f"inside a compiled block recompile it at every module; keep {block} in "
            "stage3_leaf_modules (the default) or set trainer.compile=false"
        )


def _check_optim(optim: OptimConfig, ds: DeepSpeedConfig, errors: list[str]) -> None:
    if optim.lr <= 0:
        errors.append(f"optim.lr={optim.lr}: must be > 0")
    if not 0.0 <= optim.min_lr_ratio <= 1.0:
        errors.append(f"optim.min_lr_ratio={optim.min_lr_ratio}: must be in [0, 1]")
    if optim.warmup_steps < 0:
        errors.append(f"optim.warmup_steps={optim.warmup_steps}: must be >= 0")
    if optim.weight_decay < 0:
        errors.append(f"optim.weight_decay={optim.weight_decay}: must be >= 0")
    if optim.grad_clip < 0:
        errors.append(f"optim.grad_clip={optim.grad_clip}: must be >= 0 (0 disables clipping)")
    if optim.impl not in ADAMW_IMPLS:
        errors.append(f"optim.impl={optim.impl!r}: choose one of {', '.join(ADAMW_IMPLS)}")
    if optim.impl == "cpu_adam" and not ds.offload_optimizer:
        errors.append(
            "optim.impl=cpu_adam is DeepSpeed's CPU AdamW, for optimizer state offloaded to "
            "CPU: set deepspeed.offload_optimizer=true, or choose optim.impl=auto"
        )


def _check_engine(trainer: TrainerConfig, ds: DeepSpeedConfig, errors: list[str]) -> None:
    """Activation checkpointing (normalised: true/false mean full/none), ZeRO and compile."""
    # Activation checkpointing: true/false (the field's first form) mean full/none.
    policy = {"true": "full", "false": "none"}.get(
        str(trainer.activation_checkpointing).lower(), trainer.activation_checkpointing
    )
    if policy not in AC_POLICIES:
        errors.append(
            f"trainer.activation_checkpointing={trainer.activation_checkpointing!r}: choose "
            f"one of {', '.join(AC_POLICIES)}"
        )
    trainer.activation_checkpointing = policy

    # ZeRO.
    if ds.zero_stage not in (0, 1, 2, 3):
        errors.append(f"deepspeed.zero_stage={ds.zero_stage}: choose 0, 1, 2 or 3")
    if ds.offload_optimizer and ds.zero_stage == 0:
        errors.append("deepspeed.offload_optimizer=true needs deepspeed.zero_stage >= 1")
    if ds.offload_params and ds.zero_stage != 3:
        errors.append("deepspeed.offload_params=true needs deepspeed.zero_stage=3")


def _check_callbacks(trainer: TrainerConfig, errors: list[str]) -> None:
    """Each trainer.callbacks entry names an importable Callback subclass (so a typo fails
    now, not after the model is built)."""
    from pretrain.train.callbacks import Callback

    for i, spec in enumerate(trainer.callbacks):
        target = spec.get("_target_") if isinstance(spec, dict) else None
        where = f"trainer.callbacks[{i}]"
        if not isinstance(target, str):
            errors.append(f"{where}={spec!r}: give {{_target_: module.Class, <its arguments>}}")
            continue
        module, _, name = target.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as e:
            errors.append(f"{where}._target_={target}: cannot be imported ({e})")
            continue
        if not (isinstance(cls, type) and issubclass(cls, Callback)):
            errors.append(f"{where}._target_={target} is not a subclass of "
                          "pretrain.train.callbacks.Callback")  # fmt: skip


def _check_evaluation(trainer: TrainerConfig, errors: list[str]) -> None:
    """Evaluation, early stopping and profiling settings."""
    if trainer.eval_every_steps < 0:
        errors.append(f"trainer.eval_every_steps={trainer.eval_every_steps}: must be >= 0")
    if trainer.eval_every_steps and trainer.eval_tokens < 1:
        errors.append(f"trainer.eval_tokens={trainer.eval_tokens}: must be >= 1")
    if trainer.early_stopping_patience < 0 or trainer.early_stopping_min_delta < 0:
        errors.append("trainer.early_stopping_patience and early_stopping_min_delta must be >= 0")
    if trainer.early_stopping_patience and not trainer.eval_every_steps:
        errors.append(
            f"trainer.early_stopping_patience={trainer.early_stopping_patience} needs "
            "evaluations: set trainer.eval_every_steps > 0"
        )
    if trainer.eval_data and not trainer.eval_every_steps:
        errors.append("trainer.eval_data needs evaluations: set trainer.eval_every_steps > 0")
    bad_names = [n for n in trainer.eval_data if not n.isidentifier()]
    if bad_names:
        errors.append(
            f"trainer.eval_data names {bad_names}: use letters, digits and _ (they become "
            "metric names val_<name>_loss)"
        )
    if len(trainer.profile_steps) not in (0, 2) or (
        trainer.profile_steps
        and not 1 <= trainer.profile_steps[0] <= trainer.profile_steps[1] <= trainer.max_steps
    ):
        errors.append(
            f"trainer.profile_steps={list(trainer.profile_steps)}: give [first, last] optimizer "
            "steps with 1 <= first <= last <= trainer.max_steps (e.g. [10,12]), or [] to "
            "profile nothing"
        )


def _check_logger(logger: LoggerConfig, errors: list[str]) -> None:
    if logger.progress not in PROGRESS_MODES:
        errors.append(f"logger.progress={logger.progress!r}: choose {', '.join(PROGRESS_MODES)}")
    if logger.peak_tflops is not None and logger.peak_tflops <= 0:
        errors.append(f"logger.peak_tflops={logger.peak_tflops}: must be > 0, or null")
    if logger.wandb.init_timeout_s <= 0:
        errors.append(f"logger.wandb.init_timeout_s={logger.wandb.init_timeout_s}: must be > 0")
    if logger.wandb.mode not in WANDB_MODES:
        errors.append(f"logger.wandb.mode={logger.wandb.mode!r}: choose {', '.join(WANDB_MODES)}")
    if logger.wandb.id is not None and (
        not logger.wandb.id or any(c in logger.wandb.id for c in "/\\#?%: ")
    ):
        errors.append(
            f"logger.wandb.id={logger.wandb.id!r}: W&B run ids cannot be empty or hold "
            "/ \\ # ? % : or spaces; use letters, digits, - and _"
        )


def _check_checkpoint(checkpoint: CheckpointConfig, errors: list[str]) -> None:
    if checkpoint.resume not in ("auto", "none") and not Path(checkpoint.resume).is_dir():
        errors.append(
            f"checkpoint.resume={checkpoint.resume}: not a directory; give a step_N checkpoint "
            "directory, auto (newest complete one in the run dir) or none"
        )
    if checkpoint.every_steps < 0:
        errors.append(f"checkpoint.every_steps={checkpoint.every_steps}: must be >= 0")
    if checkpoint.every_minutes < 0:
        errors.append(f"checkpoint.every_minutes={checkpoint.every_minutes}: must be >= 0")


def deepspeed_config(run: RunConfig) -> dict[str, Any]:
    """The DeepSpeed config dict: the one place it is generated from the typed config."""
    ds, trainer = run.deepspeed, run.trainer
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(
            overlap_comm=ds.overlap_comm,
            contiguous_gradients=ds.contiguous_gradients,
            reduce_bucket_size=ds.reduce_bucket_size,
        )
    if ds.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if ds.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
            leaf_module={"classes": list(ds.stage3_leaf_modules)},
            memory_efficient_linear=ds.stage3_memory_efficient_linear,
            # DeepSpeed's default, named: every gradient bucket is reduce-scattered, which
            # engine/module.py counts on under sequence parallelism.
            reduce_scatter=True,
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": run.device_type == "cuda"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": run.device_type == "cuda"}
    return {
        "train_batch_size": trainer.global_batch_size,
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": run.grad_accum,
        "gradient_clipping": run.optim.grad_clip,
        "bf16": {"enabled": run.precision == "bf16"},
        # Dynamic loss scaling from 2^16, halved on overflow (Micikevicius et al. 2018).
        "fp16": {
            "enabled": run.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_optimization": zero,
        # Our client optimizer is torch's AdamW, which ZeRO supports but does not whitelist,
        # under offload too (torch's fused CPU kernel outsteps DeepSpeedCPUAdam: optim.impl).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,  # our loggers report progress; silence DeepSpeed's own
        "wall_clock_breakdown": False,
        # What zero.Init, which takes no sequence-parallel unit, counts data ranks by.
        **({"sequence_parallel_size": run.parallel.sequence} if run.parallel.sequence > 1 else {}),
    }
