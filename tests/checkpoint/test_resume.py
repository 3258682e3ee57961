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
from tests.conftest import (
    EXACT,
    REPO,
    TINY,
    curve,
    export_and_compare,
    launch,
    subprocess_env,
    train,
)

pytestmark = pytest.mark.multiprocess

RUN = [*EXACT, "trainer.max_steps=8", "checkpoint.every_steps=2"]


def _stopped_then_resumed(run_dir: Path, extra: list[str], nproc: int) -> list[dict]:
    train(run_dir, [*RUN, *extra, "trainer.stop_at_step=4"], nproc=nproc)
    assert [p.name for p in manager.complete_checkpoints(run_dir / "checkpoints")] == [
        "step_2", "step_4",
    ]  # fmt: skip
    # A save that died half-way: a newer step directory without its marker is ignored.
    shutil.copytree(run_dir / "checkpoints" / "step_4", run_dir / "checkpoints" / "step_6")
    (run_dir / "checkpoints" / "step_6" / manager.MARKER).unlink()
    return train(run_dir, [*RUN, *extra], nproc=nproc)


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """2 ranks under ZeRO-3 (ZeRO-2 passed the same way when this was written). One rank is
    tested in tests/checkpoint/test_interrupt.py, through SIGTERM and kill -9."""
    nproc, extra = 2, ["deepspeed.zero_stage=3"]
    straight = curve(train(tmp_path / "straight", [*RUN, *extra], nproc=nproc))
    resumed = curve(_stopped_then_resumed(tmp_path / "resumed", extra, nproc))
    assert [s for s, _, _ in resumed] == list(range(1, 9))
    assert resumed == straight  # bit for bit
    final = [export.consolidated_state_dict(tmp_path / run / "checkpoints" / "step_8")
             for run in ("straight", "resumed")]  # fmt: skip
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])  # the weights too

    # The straight run's final checkpoint (ZeRO-3 shards of 2 ranks) exports through the CLI
    # to a LlamaForCausalLM with our logits.
    export_and_compare(tmp_path / "straight", final[0], tmp_path / "hf")

    # ZeRO-3 on 2 ranks -> ZeRO-1 on 1 rank, from the stopped run's step 4.
    moved = tmp_path / "moved"
    (moved / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "resumed" / "checkpoints" / "step_4",
                    moved / "checkpoints" / "step_4")  # fmt: skip
    other = curve(train(moved, [*RUN, "deepspeed.zero_stage=1"], nproc=1))
    assert [s for s, _, _ in other] == [5, 6, 7, 8]
    # Weights, Adam moments, LR schedule and clipping carried over: the same curve up to the
    # order of floating-point sums (bit-exact needs the same layout).
    for (_, loss, gnorm), (_, ref_loss, ref_gnorm) in zip(other, straight[4:], strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert gnorm == pytest.approx(ref_gnorm, rel=1e-4)
    assert manager.is_complete(moved / "checkpoints" / "step_4")  # still complete


def test_resume_with_data_workers_is_exact(tmp_path: Path) -> None:
    """The shard loader's reader positions travel in the checkpoint (2 DataLoader workers);
    so do the tokenizer (for export) and the W&B run id (a resumed run continues it).
    The resumed run also evaluates on the val split: that must not change its curve."""
    extra = ["data=demo", "data.max_bytes=300000", "data.num_workers=2", "trainer.seq_len=32"]
    env = {"PRETRAIN_DATA_DIR": str(tmp_path / "data")}
    straight = curve(train(tmp_path / "straight", [*RUN, *extra], env=env))

    run_dir = tmp_path / "resumed"
    wandb = ["logger.wandb.mode=offline", "trainer.eval_every_steps=2", "trainer.eval_tokens=256"]
    env_wandb = {**env, "WANDB_MODE": "offline"}
    train(run_dir, [*RUN, *extra, *wandb, "trainer.stop_at_step=3", "checkpoint.save_final=true"],
          env=env_wandb)  # fmt: skip
    ckpt = manager.complete_checkpoints(run_dir / "checkpoints")[-1]
    assert ckpt.name == "step_3" and (ckpt / "tokenizer.json").is_file()
    run_id = manager.read_client_state(ckpt)["wandb_run_id"]
    resumed = train(run_dir, [*RUN, *extra, *wandb, "checkpoint.export_hf=true"], env=env_wandb)
    assert curve(resumed) == straight
    assert [r["step"] for r in resumed if "val_loss" in r] == [2, 3, 4, 6, 8]  # + each job's end
    assert all(0 < r["val_bpb"] < r["val_loss"] for r in resumed if "val_loss" in r)
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(f"-{run_id}" in r.name for r in wandb_runs)

    # checkpoint.export_hf=true: <run_dir>/hf with the run's tokenizer, usable by transformers.
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(run_dir / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    prompt = tok("import os\n", return_tensors="pt")
    out = hf.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8
    assert isinstance(tok.decode(out[0]), str)


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

    listing = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_ckpt.py"),
                              str(tmp_path)], capture_output=True, text=True, check=True,
                             cwd=REPO, env=subprocess_env()).stdout.splitlines()  # fmt: skip
    rows = {line.split()[0]: line for line in listing[1:]}
    assert list(rows) == ["step_3", "step_6", "step_7", "step_8"]
    assert rows["step_7"].split()[1:3] == ["7", "1,792"] and rows["step_7"].endswith("complete")
    assert "INCOMPLETE" in rows["step_8"]

    # Resuming that run with another model shape is refused, naming the key, before building.
    proc = launch([*TINY, f"run_dir={tmp_path}", *RUN, "model.n_layers=3"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "model.n_layers: checkpoint 2, config 3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_checkpoints_from_before_vocab_padding_resume_when_the_tables_match() -> None:
    """A model section saved before model.vocab_multiple existed had vocab_size rows."""
    from types import SimpleNamespace

    from pretrain.checkpoint.resume import check_same_model

    llama = "pretrain.model.llama.Transformer"

    def run(vocab: int, multiple: int) -> SimpleNamespace:
        model = {"_target_": llama, "vocab_size": vocab, "vocab_multiple": multiple}
        return SimpleNamespace(as_dict={"model": model})

    def saved(vocab: int, **more: int) -> dict:
        return {"model": {"_target_": llama, "vocab_size": vocab, **more}}

    check_same_model(saved(512), run(512, 128), Path("old"))  # 512 rows both
    check_same_model(saved(333, vocab_multiple=128), run(333, 128), Path("new"))
    check_same_model(saved(333), run(333, 1), Path("old"))
    with pytest.raises(ValueError) as info:
        check_same_model(saved(333), run(333, 128), Path("old"))
    assert "model.vocab_multiple: checkpoint 1 (333 table rows), config 128 (384 rows)" in str(
        info.value
    )
