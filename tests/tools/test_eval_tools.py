"""The evaluation tools on one real run (demo data, a BPE tokenizer, in-loop validation):
tools/generate.py and tools/eval_ppl.py read the checkpoint and its HF export alike."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, read_metrics, subprocess_env, train

pytestmark = pytest.mark.multiprocess

PROMPT = "import os\ndef "


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    train(root / "run", [*TINY, "data=demo", "data.max_bytes=300000", "trainer.max_steps=30",
                         "optim.lr=3e-3", "checkpoint.export_hf=true", "trainer.log_every=10",
                         "trainer.eval_every_steps=30", f"trainer.eval_tokens={EVAL_TOKENS}"],
          env={"PRETRAIN_DATA_DIR": str(root / "data")})  # fmt: skip
    return root / "run"


EVAL_TOKENS = 2048


def tool(name: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=subprocess_env())  # fmt: skip


def cli(*args: object) -> subprocess.CompletedProcess:
    return tool("generate.py", *args)


def test_eval_ppl_repeats_the_in_loop_validation(run_dir: Path, tmp_path: Path) -> None:
    """With the checkpoint's seq_len, micro-batch and seed, --tokens eval_tokens scores the
    windows of the last in-loop evaluation: the same loss, from the checkpoint and the export."""
    (last,) = [r for r in read_metrics(run_dir) if "val_loss" in r]
    shards = run_dir.parent / "data" / "demo" / "shards"
    out = tmp_path / "ppl.json"
    ckpt = tool("eval_ppl.py", run_dir, "--data", shards, "--tokens", EVAL_TOKENS, "--output", out)
    assert ckpt.returncode == 0, ckpt.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    assert figures["bpb"] == pytest.approx(last["val_bpb"], rel=1e-6)
    assert figures["tokens"] == EVAL_TOKENS and figures["ppl"] == pytest.approx(last["val_ppl"])
    hf = tool("eval_ppl.py", run_dir / "hf", "--data", shards, "--tokens", EVAL_TOKENS,
              "--seq-len", 32, "--batch-size", 4, "--seed", 1234)  # fmt: skip
    assert hf.returncode == 0, hf.stderr[-2000:]
    assert json.loads(hf.stdout)["loss"] == pytest.approx(last["val_loss"], rel=1e-5)
    whole = json.loads(tool("eval_ppl.py", run_dir, "--data", shards).stdout)
    assert whole["tokens"] > EVAL_TOKENS  # the whole val split
    bad = tool("eval_ppl.py", run_dir, "--data", shards / "*.tar")
    assert bad.returncode == 2 and "has no val split" in bad.stderr


@pytest.mark.parametrize("beams", [1, 3])
def test_checkpoint_export_and_transformers_agree(run_dir: Path, beams: int) -> None:
    transformers = pytest.importorskip("transformers")
    args = ["--prompt", PROMPT, "--max-new-tokens", 12, "--num-beams", beams]
    from_ckpt, from_hf = cli(run_dir, *args), cli(run_dir / "hf", *args)
    assert from_ckpt.returncode == 0, from_ckpt.stderr[-2000:]
    assert from_hf.returncode == 0, from_hf.stderr[-2000:]
    assert from_ckpt.stdout == from_hf.stdout and from_ckpt.stdout.strip()
    tok = transformers.AutoTokenizer.from_pretrained(run_dir / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    ids = tok(PROMPT, return_tensors="pt")
    out = hf.generate(**ids, max_new_tokens=12, num_beams=beams, do_sample=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    new = [t for t in new if t != tok.pad_token_id]
    assert from_ckpt.stdout == tok.decode(new) + "\n"  # the completion alone


def test_prompt_file_gives_one_json_line_per_prompt(run_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (PROMPT, "x", "class A")))
    proc = cli(run_dir, "--prompt-file", prompts, "--max-new-tokens", 6, "--temperature", 0.7,
               "--top-k", 20, "--top-p", 0.9, "--seed", 1)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == [PROMPT, "x", "class A"]
    assert all(isinstance(r["completion"], str) for r in rows)


def test_bad_input_is_named(tmp_path: Path, run_dir: Path) -> None:
    proc = cli(tmp_path / "nowhere", "--prompt", "x")
    assert proc.returncode == 2 and "nowhere does not exist" in proc.stderr
    proc = cli(run_dir, "--prompt", "x", "--top-p", "0")
    assert proc.returncode == 2 and "top_p=0.0: must be in (0, 1]" in proc.stderr
