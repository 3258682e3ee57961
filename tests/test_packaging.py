"""The wheel carries the Hydra configs, and an installed copy finds and composes them."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("hatchling")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return next(out.glob("pretrain-*.whl"))


def test_wheel_contains_every_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for yaml in (REPO / "conf").rglob("*.yaml"):
        assert f"pretrain/conf/{yaml.relative_to(REPO / 'conf')}" in names


def test_installed_wheel_composes_its_own_configs(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    probe = (
        "from hydra import compose, initialize_config_dir\n"
        "from pretrain.config import conf_dir, register\n"
        "register()\n"
        "with initialize_config_dir(conf_dir(), version_base=None):\n"
        "    cfg = compose('config', overrides=['model=llama_7b'])\n"
        "print(conf_dir()); print(cfg.model.n_layers)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    conf, n_layers = proc.stdout.split()[-2:]
    assert Path(conf) == site / "pretrain" / "conf"  # not the checkout's conf/
    assert n_layers == "32"
