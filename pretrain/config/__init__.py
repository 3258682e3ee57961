"""Typed configuration: Hydra schemas, where the YAML lives, and resolution into a RunConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pretrain.config.resolve import ConfigError, RunConfig, deepspeed_config, resolve
from pretrain.config.schema import register

__all__ = [
    "ConfigError",
    "RunConfig",
    "compose",
    "conf_dir",
    "deepspeed_config",
    "from_saved",
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
    """The config `python -m pretrain OVERRIDES` would get, composed without running it.

    Raises ConfigError naming the override at fault (a misspelt key, a wrong type, an
    unknown config group option), as the tools that compose report it: a message, not a
    traceback."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    register()
    with initialize_config_dir(conf_dir(), version_base=None):
        try:
            return hydra_compose("config", overrides=list(overrides or []))
        except HydraException as e:
            raise ConfigError([_composition_error(e)]) from e


def from_saved(saved: dict[str, Any], overrides: list[str]) -> DictConfig:
    """The config of a saved run (a checkpoint's `config`), typed as `compose` gives it: its
    model and data sections over the presets of the same families (by `_target_`), every
    other section over the defaults, then `overrides` (key=value)."""
    from omegaconf import OmegaConf, open_dict

    groups = [f"{group}={_preset(group, saved[group]['_target_'])}" for group in ("model", "data")]
    cfg = compose(groups)
    sections = {k: v for k, v in saved.items() if k != "derived"}
    # Open: a dict field's own keys (trainer.eval_data.NAME, given as +key=) merge in; a
    # typed section still refuses a key its schema lacks.
    with open_dict(cfg):
        merged = OmegaConf.merge(cfg, sections, OmegaConf.from_dotlist(overrides))
    OmegaConf.set_struct(merged, True)
    return merged


def _preset(group: str, target: str) -> str:
    """A preset of config group `group` whose `_target_` is `target`."""
    for path in sorted(Path(conf_dir(), group).glob("*.yaml")):
        if compose([f"{group}={path.stem}"])[group].get("_target_") == target:
            return path.stem
    raise ConfigError([f"no {group} preset builds {target}: this checkpoint's {group} family "
                       "is not in this version's conf/"])  # fmt: skip


def _composition_error(e: Exception) -> str:
    """Hydra's message, with the schema's reason (OmegaConf's first line) and without the
    search path or the advice to append a key (`+key=...`), which a typo does not need."""
    lines = str(e).split("\nConfig search path")[0].strip().splitlines()
    if lines and lines[-1].startswith("To append to your config"):
        lines.pop()
    if e.__cause__ is not None:
        lines[0] += f" ({str(e.__cause__).splitlines()[0]})"
    if type(e).__name__ == "OverrideParseException":  # it does not say which override
        lines[0] = f"an override is not key=value syntax: {lines[0]}"
    return "\n    ".join(line for line in lines if line.strip())
