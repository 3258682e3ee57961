"""Entry point: `python -m pretrain [hydra overrides]` (also the `pretrain` console script).

The whole data flow, top to bottom: compose config (Hydra) -> resolve and check it ->
process group -> `pretrain.train.run.train`: model (sharded at birth under ZeRO-3) ->
DeepSpeed engine -> data -> Trainer.fit(). Only this module sees the raw Hydra config.
"""

from __future__ import annotations

import faulthandler
import logging
import sys
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pretrain import dist
from pretrain.checkpoint.manager import CheckpointError
from pretrain.config import ConfigError, compose, conf_dir, register, resolve
from pretrain.data.stream import DataError
from pretrain.train.run import train
from pretrain.train.signals import EXIT_PREEMPTED, Preempted
from pretrain.train.trainer import EXIT_DIVERGED, TrainingDiverged

log = logging.getLogger("pretrain")


def _exit(code: int) -> NoReturn:
    """sys.exit(code), first recording the code for slurm/launch_node.sh."""
    dist.write_exit_code(code)
    sys.exit(code)


EXIT_DATA = 4
"""The data is missing, unreadable, corrupt or too small for the run (pretrain.data.DataError)."""


def _data_message(e: DataError) -> str:
    """The error's own words: one raised in a DataLoader worker arrives wrapped in the
    worker's traceback, whose last line is the original message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return f"data error: {text}"


MULTIRUN_REFUSED = (
    "Hydra's multirun (-m/--multirun, hydra.mode=MULTIRUN) is not supported: its jobs would "
    "share one process, and a run's process groups and DeepSpeed's do not outlive it. Run one "
    "command per setting, or a Slurm array: sbatch --array=0-N slurm/sweep.sh FILE "
    "(docs/cluster.md)"
)


@hydra.main(config_path=conf_dir(), config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    dist.setup_logging()
    if HydraConfig.get().mode == RunMode.MULTIRUN:  # also set by a config, or --multi
        if dist.is_main():
            log.error(MULTIRUN_REFUSED)
        _exit(2)
    try:
        run = resolve(cfg, world_size=dist.world_size())
    except ConfigError as e:
        if dist.is_main():
            log.error("%s", e)
        _exit(2)
    dist.init(run.device_type, dist.process_group_timeout(run.trainer.hang_timeout_s))
    dist.init_parallel(run.parallel)
    dist.setup_logging()
    code: int | None = None  # set when every rank ended the run the same, normal way
    try:
        train(run)
        code = 0
    except Preempted as e:  # every rank stops at the same step, after the same save
        log.warning("%s: checkpoint saved; run the same command to resume", e)
        code = EXIT_PREEMPTED
    except TrainingDiverged as e:  # every rank counts the same skipped steps
        log.error("%s", e)
        code = EXIT_DIVERGED
    except ConfigError as e:  # a value only the built model can check
        if dist.is_main():
            log.error("%s", e)
        _exit(2)
    except DataError as e:
        log.error("%s", _data_message(e))
        _exit(EXIT_DATA)
    except CheckpointError as e:  # a full disk, a corrupt or unsafe checkpoint: one message
        log.error("%s", e)
        _exit(1)
    finally:
        if code is None:  # not waiting for the other ranks: one may have died
            dist.destroy()
    # Out here, the exception and its frames are gone, and with them the data loader (its
    # workers shut down); all is saved: leave without the interpreter's teardown.
    dist.write_exit_code(code)
    dist.finish(code)


def _check_composes(args: list[str]) -> None:
    """Exit 2 with one message, before Hydra makes the run dir, when the overrides do not
    compose (a misspelt key, a wrong type, an unknown option; Hydra itself would print its
    own report and exit 1) or do not resolve (a bad value, values that disagree). Hydra's
    flags (--cfg, --help) and hydra.* settings are Hydra's, but not its multirun."""
    if any(a in ("-m", "--multirun") or a.lstrip("+").startswith("hydra.mode=MULTIRUN")
           for a in args):  # fmt: skip
        dist.setup_logging()
        if dist.is_main():
            log.error(MULTIRUN_REFUSED)
        _exit(2)
    if any(a.startswith(("-", "hydra.", "+hydra.", "~hydra.")) for a in args):
        return
    try:
        # Resolved too: a value that composes but is wrong (or two that disagree) is refused
        # here, before Hydra makes the run dir.
        resolve(compose(args), world_size=dist.world_size())
    except ConfigError as e:
        dist.setup_logging()
        if dist.is_main():
            log.error("%s", e)
        _exit(2)


def main() -> None:
    faulthandler.enable(all_threads=True)  # a rank killed by a fatal signal prints its stacks
    register()
    _check_composes(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
