"""Where metrics go: the console, metrics.jsonl in the run dir, and Weights & Biases.

Only rank 0 builds loggers. A logger that fails is reported once and dropped: a full disk
or a W&B outage never stops training.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from pretrain.config.schema import WandbConfig

log = logging.getLogger("pretrain")


class Logger(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...
    def close(self) -> None: ...


class ConsoleLogger:
    """One concise line every `every` steps (and on the last step)."""

    def __init__(self, every: int, max_steps: int) -> None:
        self.every, self.max_steps = every, max_steps

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if step % self.every and step != self.max_steps:
            return
        log.info(
            "step %d/%d | loss %.4f | lr %.2e | grad_norm %.3f | %s tok/s | %.3f s/step",
            step, self.max_steps, metrics["loss"], metrics["lr"], metrics["grad_norm"],
            f"{metrics['tokens_per_s']:,.0f}", metrics["step_time_s"],
        )  # fmt: skip

    def close(self) -> None:
        pass


class JsonlLogger:
    """metrics.jsonl: one JSON object per optimizer step, flushed as written."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        """A fresh run starts a fresh file; a resumed one keeps the records up to its step."""
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = ""
        if resume_step is not None and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = "".join(
                line for line in lines
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            )  # fmt: skip
        self._file = path.open("w", encoding="utf-8")
        self._file.write(kept)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class WandbLogger:
    """A W&B run; `offline` writes under the run dir and needs no account or network."""

    def __init__(
        self, cfg: WandbConfig, run_name: str, run_dir: Path, config: dict,
        run_id: str | None = None,
    ) -> None:  # fmt: skip
        """`run_id` (kept in checkpoints) continues that W&B run after a resume or requeue."""
        import wandb

        run_id = run_id or cfg.id

        mode = cfg.mode
        if mode == "online" and not _has_wandb_credentials(wandb):
            log.warning(
                "logger.wandb.mode=online but no W&B API key (set WANDB_API_KEY or run "
                "`wandb login`): logging offline under the run dir; `wandb sync` uploads later"
            )
            mode = "offline"
        self._run = wandb.init(
            mode=mode,
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_name,
            group=cfg.group,
            tags=list(cfg.tags),
            dir=cfg.dir or str(run_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run_id: str = self._run.id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


def _has_wandb_credentials(wandb: Any) -> bool:
    """True when an API key is configured; never prompts and never touches the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:  # no usable credentials
        return False


class Loggers:
    """Fan-out to several loggers; any that raises is warned about and dropped."""

    def __init__(self, loggers: list[Logger]) -> None:
        self._loggers = list(loggers)

    def _call(self, method: str, *args: Any) -> None:
        for logger in list(self._loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as e:
                log.warning("%s failed (%s: %s); it is disabled", type(logger).__name__,
                            type(e).__name__, e)  # fmt: skip
                self._loggers.remove(logger)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._call("log", metrics, step)

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run's id, saved in checkpoints so a resumed run continues the same run."""
        return next((lg.run_id for lg in self._loggers if isinstance(lg, WandbLogger)), None)

    def close(self) -> None:
        self._call("close")


def build_loggers(
    wandb_cfg: WandbConfig, run_name: str, run_dir: Path, config: dict, log_every: int,
    max_steps: int, resume_step: int | None = None, wandb_run_id: str | None = None,
) -> Loggers:  # fmt: skip
    """The rank-0 loggers for a run; W&B is skipped (with a warning) if it cannot start."""
    loggers: list[Logger] = [
        ConsoleLogger(log_every, max_steps),
        JsonlLogger(run_dir / "metrics.jsonl", resume_step),
    ]
    if wandb_cfg.mode != "disabled":
        try:
            loggers.append(WandbLogger(wandb_cfg, run_name, run_dir, config, wandb_run_id))
        except Exception as e:
            log.warning("W&B could not start (%s: %s); continuing without it", type(e).__name__, e)
    return Loggers(loggers)
