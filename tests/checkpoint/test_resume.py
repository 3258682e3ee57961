"""Crash-safe checkpoints and exact resume, through real training runs.

A run of 8 steps must equal a run stopped after 4 (as a time-boxed job stops), resumed from
its checkpoint and run to 8: the same losses and gradient norms, bit for bit (fp32, CPU).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import export, manager
from pretrain.model.llama import Transformer
from tests.conftest import REPO, launch, subprocess_env, train

pytestmark = pytest.mark.multiprocess

RUN = [
    "precision=fp32", "trainer.max_steps=8", "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2", "optim.lr=3e-3", "optim.warmup_steps=2",
    "checkpoint.every_steps=2",
]  # fmt: skip


def _curve(metrics: list[dict]) -> list[tuple[int, float, float]]:
    return [(m["step"], m["loss"], m["grad_norm"]) for m in metrics]


def _stopped_then_resumed(run_dir: Path, extra: list[str], nproc: int) -> list[dict]:
    train(run_dir, [*RUN, *extra, "trainer.stop_at_step=4"], nproc=nproc)
    assert [p.name for p in manager.complete_checkpoints(run_dir / "checkpoints")] == [
        "step_2", "step_4",
    ]  # fmt: skip
    # A save that died half-way: a newer step directory without its marker is ignored.
    shutil.copytree(run_dir / "checkpoints" / "step_4", run_dir / "checkpoints" / "step_6")
    (run_dir / "checkpoints" / "step_6" / manager.MARKER).unlink()
    return train(run_dir, [*RUN, *extra], nproc=nproc)


@pytest.mark.parametrize(
    ("nproc", "extra"),
    [
        (1, []),
        # ZeRO-2 passes the same way (seen when this was written); CI runs the stage that
        # shards most, to keep the suite under its 15-minute budget.
        (2, ["deepspeed.zero_stage=3"]),
    ],
    ids=["1rank", "2ranks-zero3"],
)
def test_stop_and_resume_equals_an_uninterrupted_run(
    tmp_path: Path, nproc: int, extra: list[str]
) -> None:
    straight = _curve(train(tmp_path / "straight", [*RUN, *extra], nproc=nproc))
    resumed = _curve(_stopped_then_resumed(tmp_path / "resumed", extra, nproc))
    assert [s for s, _, _ in resumed] == list(range(1, 9))
    assert resumed == straight  # bit for bit
    final = [export.consolidated_state_dict(tmp_path / run / "checkpoints" / "step_8")
             for run in ("straight", "resumed")]  # fmt: skip
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])  # the weights too

    # The straight run's final checkpoint (ZeRO-0 on 1 rank, ZeRO-3 shards on 2) exports
    # through the CLI to a LlamaForCausalLM with our logits.
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"),
                           str(tmp_path / "straight"), str(out)], capture_output=True, text=True,
                          cwd=REPO, env=subprocess_env(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = Transformer(**{k: v for k, v in manager.read_client_state(
        tmp_path / "straight" / "checkpoints" / "step_8")["config"]["model"].items()
        if k not in ("_target_", "init_from")}).eval()  # fmt: skip
    ours.load_state_dict(final[0])
    tokens = torch.randint(0, 512, (2, 17))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() < 1e-5

    if nproc == 2:  # ZeRO-3 on 2 ranks -> ZeRO-1 on 1 rank, from the stopped run's step 4
        moved = tmp_path / "moved"
        (moved / "checkpoints").mkdir(parents=True)
        shutil.copytree(tmp_path / "resumed" / "checkpoints" / "step_4",
                        moved / "checkpoints" / "step_4")  # fmt: skip
        other = _curve(train(moved, [*RUN, "deepspeed.zero_stage=1"], nproc=1))
        assert [s for s, _, _ in other] == [5, 6, 7, 8]
        # Weights, Adam moments and the LR schedule carried over: the same curve up to the
        # order of floating-point sums (bit-exact needs the same layout).
        for (_, loss, gnorm), (_, ref_loss, ref_gnorm) in zip(other, straight[4:], strict=True):
            assert loss == pytest.approx(ref_loss, rel=1e-5)
            assert gnorm == pytest.approx(ref_gnorm, rel=1e-4)
        assert manager.is_complete(moved / "checkpoints" / "step_4")  # still complete


def test_resume_with_data_workers_is_exact(tmp_path: Path) -> None:
    """The shard loader's reader positions travel in the checkpoint (2 DataLoader workers)."""
    extra = ["data=demo", "data.max_bytes=300000", "data.num_workers=2", "trainer.seq_len=32"]
    env_dir = {"PRETRAIN_DATA_DIR": str(tmp_path / "data")}
    straight = _curve(train(tmp_path / "straight", [*RUN, *extra], env=env_dir))
    resumed = _curve(_stopped_then_resumed_env(tmp_path / "resumed", extra, env_dir))
    assert resumed == straight


def _stopped_then_resumed_env(run_dir: Path, extra: list[str], env: dict) -> list[dict]:
    train(run_dir, [*RUN, *extra, "trainer.stop_at_step=3", "checkpoint.save_final=true"], env=env)
    assert manager.complete_checkpoints(run_dir / "checkpoints")[-1].name == "step_3"
    return train(run_dir, [*RUN, *extra], env=env)


def test_resume_with_another_model_shape_is_refused(tmp_path: Path) -> None:
    train(tmp_path, [*RUN, "trainer.stop_at_step=2", "trainer.max_steps=2"])
    proc = launch(["model=tiny", "data=synthetic", "trainer.device=cpu", "trainer.seq_len=32",
                   "logger.wandb.mode=disabled", f"run_dir={tmp_path}", *RUN,
                   "model.n_layers=3"])  # fmt: skip
    assert proc.returncode != 0
    assert "model.n_layers: checkpoint 2, config 3" in proc.stderr


def test_retention_and_a_truncated_file(tmp_path: Path) -> None:
    train(tmp_path, [*RUN, "checkpoint.every_steps=1", "checkpoint.keep_last=2",
                     "checkpoint.keep_every=3"])  # fmt: skip
    names = [p.name for p in manager.complete_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_3", "step_6", "step_7", "step_8"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(names)
    # Truncate one file of the newest: it is no longer complete, and step_7 becomes newest.
    ckpt = tmp_path / "checkpoints" / "step_8"
    assert manager.is_complete(ckpt)
    listed = json.loads((ckpt / manager.MARKER).read_text())["files"]
    assert "rank_0.pt" in listed and any("model_states" in f for f in listed)
    victim = ckpt / "rank_0.pt"
    victim.write_bytes(victim.read_bytes()[:-1])
    assert not manager.is_complete(ckpt)
    assert manager.complete_checkpoints(tmp_path / "checkpoints")[-1].name == "step_7"
