"""Where metrics go: the console, metrics.jsonl in the run dir, and Weights & Biases.

The trainer hands every optimizer step's record to `Loggers.log`. metrics.jsonl keeps each
one; the console and W&B get one per log interval (`trainer.log_every`, and the last step),
with times and rates averaged over the interval so one slow step does not stand for it.
Records that are not a training step's (an evaluation's) pass at once.

Only rank 0 builds loggers. A logger that fails is reported once and dropped: a full disk
or a W&B outage never stops training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import string
import sys
from pathlib import Path
from typing import Any, Protocol

from pretrain.config.schema import LoggerConfig, WandbConfig
from pretrain.train.metrics import RATE_KEYS, TIME_KEYS

log = logging.getLogger("pretrain")


class Logger(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...
    def close(self) -> None: ...


class Interval:
    """Passes `logger` one training record per `every` steps (and the last step).

    A step with an evaluation (val_loss) is passed on too. Times (TIME_KEYS) are the mean
    over the steps since the previous record; rates (RATE_KEYS: tokens/s, MFU) are rescaled
    to that mean, i.e. the interval's tokens over its seconds. Everything else is the
    interval's last step's value.
    """

    def __init__(self, logger: Logger, every: int, last_step: int) -> None:
        self.logger, self.every, self.last_step = logger, every, last_step
        self._sums = dict.fromkeys(TIME_KEYS, 0.0)
        self._steps = 0

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if "step_time_s" not in metrics:  # not a training step: pass it on now
            self.logger.log(metrics, step)
            return
        for key in TIME_KEYS:
            self._sums[key] += metrics.get(key, 0.0)
        self._steps += 1
        if step % self.every and step != self.last_step and "val_loss" not in metrics:
            return  # (an evaluation's step is always passed on)
        record = dict(metrics)
        mean_step = self._sums["step_time_s"] / self._steps
        for key in TIME_KEYS:
            if key in record:
                record[key] = self._sums[key] / self._steps
        for key in RATE_KEYS:
            if key in record:
                record[key] = metrics[key] * metrics["step_time_s"] / mean_step
        self._sums = dict.fromkeys(TIME_KEYS, 0.0)
        self._steps = 0
        self.logger.log(record, step)

    def close(self) -> None:
        self.logger.close()


def format_line(metrics: dict[str, Any], step: int, last_step: int) -> str:
    """One console line for a training record (with its evaluation's results, if any)."""
    val = ""
    if "val_loss" in metrics:
        val = f" | val_loss {metrics['val_loss']:.4f} | val_ppl {metrics['val_ppl']:.2f}"
        if "val_bpb" in metrics:
            val += f" | val_bpb {metrics['val_bpb']:.4f}"
        for key, value in metrics.items():  # trainer.eval_data's named sets
            if key.startswith("val_") and key.endswith("_loss") and key != "val_loss":
                val += f" | {key} {value:.4f}"
    if "step_time_s" not in metrics:
        return f"step {step}/{last_step}{val}"
    parts = [
        f"step {step}/{last_step}",
        f"loss {metrics['loss']:.4f}",
        f"lr {metrics['lr']:.2e}",
        f"grad_norm {metrics['grad_norm']:.3f}",
        f"{metrics['tokens_per_s']:,.0f} tok/s ({metrics['tokens_per_s_per_gpu']:,.0f}/dev)"
        if metrics.get("tokens_per_s_per_gpu", metrics["tokens_per_s"]) != metrics["tokens_per_s"]
        else f"{metrics['tokens_per_s']:,.0f} tok/s",
    ]
    if "mfu" in metrics:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    step_time = metrics["step_time_s"]
    wait = metrics.get("data_wait_s")
    parts.append(
        f"{step_time:.3f} s/step" + (f" (data {100 * wait / step_time:.0f}%)" if wait else "")
    )
    if "mem_peak_gib" in metrics:
        parts.append(f"mem {metrics['mem_allocated_gib']:.1f}/{metrics['mem_peak_gib']:.1f} GiB")
    if "loss_scale" in metrics:
        parts.append(f"scale {metrics['loss_scale']:g}")
    if step < last_step:
        parts.append(f"ETA {format_duration((last_step - step) * step_time)}")
    return " | ".join(parts) + val


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 75 -> '1m15s'."""
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


class ConsoleLogger:
    """One plain line per record through the `pretrain` logger (wrap it in `Interval`)."""

    def __init__(self, last_step: int) -> None:
        self.last_step = last_step

    def log(self, metrics: dict[str, Any], step: int) -> None:
        log.info("%s", format_line(metrics, step, self.last_step))

    def close(self) -> None:
        pass


class ProgressBar:
    """A live tqdm bar on stderr (step, loss, tokens/s, MFU, ETA), updated every step.

    While it is shown, the `pretrain` logger's lines are printed above the bar instead of
    through it.
    """

    def __init__(self, last_step: int, first_step: int = 0) -> None:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._stack = contextlib.ExitStack()
        try:  # a terminal reporting no size (some pseudo-terminals) would get no bar at all
            sized = os.get_terminal_size(sys.stderr.fileno()).columns > 0
        except (OSError, ValueError, AttributeError):
            sized = False
        self._bar = tqdm(
            total=last_step, initial=first_step, unit="step", dynamic_ncols=sized,
            ncols=None if sized else 100, nrows=None if sized else 20, file=sys.stderr,
            desc="train",
        )  # fmt: skip
        self._stack.enter_context(logging_redirect_tqdm(loggers=[log]))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if "step_time_s" not in metrics:
            return
        postfix = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tokens_per_s']:,.0f}"}
        if "mfu" in metrics:
            postfix["MFU"] = f"{100 * metrics['mfu']:.1f}%"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()
        self._stack.close()


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


# W&B groups charts by the prefix before "/": each metrics.jsonl key gets its section.
WANDB_SECTIONS = {
    "perf": (*RATE_KEYS, *TIME_KEYS),
    "memory": ("mem_allocated_gib", "mem_reserved_gib", "mem_peak_gib"),
}
PREFIX_SECTIONS = {"val_": "val", "data_": "data"}  # val_loss -> val/loss


def wandb_key(key: str) -> str:
    """metrics.jsonl key -> W&B key: `loss` -> `train/loss`, `mfu` -> `perf/mfu`,
    `val_ppl` -> `val/ppl`, `data_skipped_shards` -> `data/skipped_shards`."""
    if "/" in key:
        return key
    section = next((s for s, keys in WANDB_SECTIONS.items() if key in keys), None)
    if section is not None:
        return f"{section}/{key}"
    for prefix, section in PREFIX_SECTIONS.items():
        if key.startswith(prefix):
            return f"{section}/{key[len(prefix) :]}"
    return f"train/{key}"


class WandbLogger:
    """A W&B run; `offline` writes under the run dir and needs no account or network."""

    def __init__(
        self, cfg: WandbConfig, run_name: str, run_dir: Path, config: dict,
        run_id: str | None = None,
    ) -> None:  # fmt: skip
        """`run_id` (kept in checkpoints) continues that W&B run after a resume or requeue."""
        import wandb

        self._wandb = wandb
        # One id for both tries below, so an offline fallback still syncs into the same run.
        run_id = run_id or cfg.id or new_run_id()
        kwargs = {
            "project": cfg.project,
            "entity": cfg.entity,
            "name": cfg.name or run_name,
            "group": cfg.group,
            "tags": list(cfg.tags),
            "dir": cfg.dir or str(run_dir),
            "config": config,
            "id": run_id,
            "resume": "allow",
            "settings": wandb.Settings(init_timeout=cfg.init_timeout_s),
        }
        mode = cfg.mode
        if mode == "online" and not _has_wandb_credentials(wandb):
            log.warning(
                "logger.wandb.mode=online but no W&B API key (set WANDB_API_KEY or run "
                "`wandb login`): logging offline under the run dir; `wandb sync` uploads later"
            )
            mode = "offline"
        try:
            self._run = wandb.init(mode=mode, **kwargs)
        except Exception as e:
            if mode != "online":
                raise
            log.warning(
                "W&B could not reach its server (%s: %s): logging offline under the run dir; "
                "`wandb sync` uploads later", type(e).__name__, str(e).splitlines()[0],
            )  # fmt: skip
            wandb.teardown()  # the failed run still holds its id in W&B's service process
            self._run = wandb.init(mode="offline", **kwargs)
        self.run_id: str = self._run.id
        self.log_checkpoints = cfg.log_checkpoints

    @property
    def where(self) -> str:
        """The run's URL when online, else the directory `wandb sync` uploads."""
        url = getattr(self._run, "url", None)
        if url:
            return url
        return f"offline: {Path(self._run.dir).parent} (`wandb sync` it to upload)"

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._run.log({wandb_key(k): v for k, v in metrics.items()}, step=step)

    def log_checkpoint(self, path: Path, step: int) -> None:
        """A model artifact that references the checkpoint directory (nothing is uploaded)."""
        if not self.log_checkpoints:
            return
        artifact = self._wandb.Artifact(f"{self._run.id}-checkpoint", type="model",
                                        metadata={"step": step})  # fmt: skip
        artifact.add_reference(f"file://{path.resolve()}", checksum=False)
        self._run.log_artifact(artifact, aliases=[f"step_{step}", "latest"])

    def close(self) -> None:
        self._run.finish()


def new_run_id() -> str:
    """A fresh W&B-style run id: 8 random lowercase letters and digits."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


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
    def wandb(self) -> WandbLogger | None:
        for logger in self._loggers:
            inner = getattr(logger, "logger", logger)
            if isinstance(inner, WandbLogger):
                return inner
        return None

    @property
    def wandb_run_id(self) -> str | None:
        """The W&B run's id, saved in checkpoints so a resumed run continues the same run."""
        return self.wandb.run_id if self.wandb else None

    def log_checkpoint(self, path: Path, step: int) -> None:
        """Tell W&B about a committed checkpoint (when logger.wandb.log_checkpoints)."""
        wandb = self.wandb
        if wandb is None:
            return
        try:
            wandb.log_checkpoint(path, step)
        except Exception as e:
            log.warning("W&B could not record checkpoint %s (%s: %s)", path, type(e).__name__, e)

    def close(self) -> None:
        self._call("close")


def use_progress_bar(mode: str) -> bool:
    """logger.progress: bar | lines | auto (a bar only when stderr is a terminal)."""
    if mode == "auto":
        return sys.stderr.isatty()
    return mode == "bar"


def build_loggers(
    cfg: LoggerConfig, run_name: str, run_dir: Path, config: dict, log_every: int,
    last_step: int, resume_step: int | None = None, wandb_run_id: str | None = None,
) -> Loggers:  # fmt: skip
    """The rank-0 loggers for a run; W&B is skipped (with a warning) if it cannot start."""
    loggers: list[Logger] = []
    if use_progress_bar(cfg.progress):
        loggers.append(ProgressBar(last_step, resume_step or 0))
    loggers += [
        Interval(ConsoleLogger(last_step), log_every, last_step),
        JsonlLogger(run_dir / "metrics.jsonl", resume_step),
    ]
    if cfg.wandb.mode != "disabled":
        try:
            wandb = WandbLogger(cfg.wandb, run_name, run_dir, config, wandb_run_id)
            loggers.append(Interval(wandb, log_every, last_step))
        except Exception as e:
            log.warning("W&B could not start (%s: %s); continuing without it", type(e).__name__, e)
    return Loggers(loggers)
