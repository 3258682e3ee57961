"""Typed configuration: Hydra schemas, where the YAML lives, and resolution into a RunConfig."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from pretrain.config.resolve import ConfigError, RunConfig, deepspeed_config, resolve
from pretrain.config.schema import register

__all__ = [
    "ConfigError",
    "RunConfig",
    "compose",
    "conf_dir",
    "deepspeed_config",
    "register",
    "resolve",
]


def conf_dir() -> str:
    """Absolute path of the Hydra config tree: `conf/` in a checkout, `pretrain/conf` in a wheel."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"no Hydra config tree (conf/config.yaml) next to {package} or inside it: "
        "reinstall the package (pip install .) or run from a checkout"
    )


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config `python -m pretrain OVERRIDES` would get, composed without running it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(conf_dir(), version_base=None):
        return hydra_compose("config", overrides=list(overrides or []))
