"""Checkpoints you can trust: per-file checksums verified on resume with a fallback that
says why, a full disk named as such, and no code run from a crafted file, ours or
DeepSpeed's, on resume or export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import manager
from tests.conftest import EXACT, REPO, TINY, launch, read_metrics, subprocess_env, train

pytestmark = pytest.mark.multiprocess

RUN = [*EXACT, "trainer.max_steps=4", "checkpoint.every_steps=2", "deepspeed.zero_stage=1"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run dir with complete checkpoints step_2 and step_4."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    train(run_dir, RUN)
    return run_dir


def _copy(saved: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved, tmp_path / "run")
    return tmp_path / "run"


def _resume(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [*TINY, f"run_dir={run_dir}", *RUN, "trainer.max_steps=6", *extra]
    return launch(args)


def test_the_marker_records_a_checksum_per_file(saved: Path) -> None:
    ckpt = saved / "checkpoints" / "step_4"
    files = json.loads((ckpt / manager.MARKER).read_text())["files"]
    assert {"rank_0.pt", "client_state.json", "mp_rank_00_model_states.pt"} <= set(files)
    for name, entry in files.items():
        assert entry == {"size": (ckpt / name).stat().st_size,
                         "crc32": manager.file_crc32(ckpt / name)}  # fmt: skip


def test_same_size_corruption_falls_back_to_the_previous_checkpoint(
    saved: Path, tmp_path: Path
) -> None:
    """Bytes of step_4's optimizer file flipped in place (same size: the marker's sizes
    pass), and a newer step_6 whose save died: resume skips both, says why, and goes on from
    step_2, logging what the verification read and how long it took."""
    run_dir = _copy(saved, tmp_path)
    ckpts = run_dir / "checkpoints"
    victim = next((ckpts / "step_4").glob("*optim_states.pt"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)
    victim.write_bytes(bytes(data))
    shutil.copytree(ckpts / "step_4", ckpts / "step_6")
    (ckpts / "step_6" / manager.MARKER).unlink()
    proc = _resume(run_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stderr
    assert f"not resuming from {ckpts}/step_6: no {manager.MARKER}: its save was interrupted" in log
    assert f"not resuming from {ckpts}/step_4: {victim.name} fails its checksum" in log, log
    assert "verified step_2: " in log and "(checkpoint.verify=false skips this)" in log
    assert f"resumed from {ckpts}/step_2 at step 2" in log
    assert [m["step"] for m in read_metrics(run_dir)][-4:] == [3, 4, 5, 6]


def test_when_every_checkpoint_fails_its_checksum_the_run_stops(
    saved: Path, tmp_path: Path
) -> None:
    run_dir = _copy(saved, tmp_path)
    for ckpt in (run_dir / "checkpoints").glob("step_*"):
        victim = ckpt / "rank_0.pt"
        data = bytearray(victim.read_bytes())
        data[-30] ^= 0xFF
        victim.write_bytes(bytes(data))
    proc = _resume(run_dir)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "every complete checkpoint in" in proc.stderr and "checkpoint.resume=none" in proc.stderr
    assert "Traceback" not in proc.stderr


class _Payload:
    """Unpickling runs `touch <marker>`: what a crafted checkpoint file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["rank_0.pt", "mp_rank_00_model_states.pt"])
def test_a_crafted_pickle_runs_no_code_on_resume_or_export(
    saved: Path, tmp_path: Path, victim: str
) -> None:
    """Our own file (rank_0.pt) and DeepSpeed's (mp_rank_00_model_states.pt) replaced by a
    pickle that would run a shell command, the marker rewritten to match: resume and
    tools/export_hf.py refuse it with a message, and the command never runs."""
    run_dir = _copy(saved, tmp_path)
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    ckpt = run_dir / "checkpoints" / "step_4"
    torch.save({"module": _Payload(marker)}, ckpt / victim)
    listed = json.loads((ckpt / manager.MARKER).read_text())  # a thorough attacker's marker
    listed["files"][victim] = {"size": (ckpt / victim).stat().st_size,
                               "crc32": manager.file_crc32(ckpt / victim)}  # fmt: skip
    (ckpt / manager.MARKER).write_text(json.dumps(listed))
    proc = _resume(run_dir)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert f"refused to load {run_dir}/checkpoints/step_4: a file in it holds a Python " \
           "object that is not data" in proc.stderr  # fmt: skip
    assert not marker.exists()
    if victim == "mp_rank_00_model_states.pt":  # export reads DeepSpeed's file
        export = subprocess.run(
            [sys.executable, str(REPO / "tools" / "export_hf.py"), str(run_dir),
             str(tmp_path / "hf")],
            capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=300,
        )  # fmt: skip
        assert export.returncode == 1
        assert "\nerror: refused to load" in export.stderr, export.stderr[-3000:]
        assert "Traceback" not in export.stderr
        assert not marker.exists()


def test_a_full_disk_names_the_path_and_the_size(tmp_path: Path) -> None:
    """The run dir on a 1 MB tmpfs: config and metrics fit, the first checkpoint does not."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        run_dir = mount / "run"
        proc = launch([*TINY, f"run_dir={run_dir}", *RUN])
        assert proc.returncode == 1, proc.stderr[-4000:]
        assert f"no space left on {run_dir}/checkpoints while saving step_2" in proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
        assert not manager.complete_checkpoints(run_dir / "checkpoints")
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
