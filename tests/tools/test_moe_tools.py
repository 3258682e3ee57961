"""A MoE run (model=moe_tiny, Qwen3-MoE-shaped) through the tools a dense run uses: the
export loads in transformers with our logits, tools/eval_ppl.py scores the checkpoint and the
export as the in-loop validation did, tools/generate.py prints what transformers generates,
lm-eval's perplexity agrees with ours, and model.init_from starts a ZeRO-3 run from the
export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.checkpoint import export
from pretrain.data.synthetic import SyntheticStream
from pretrain.model.moe import load_balancing_loss
from tests.conftest import EXACT, REPO, export_and_compare, read_metrics, subprocess_env, train
from tests.tools.test_eval_tools import DOCS, PPL_YAML, write_jsonl

pytestmark = pytest.mark.multiprocess

EVAL_TOKENS = 1024
PROMPT = "import os\ndef "


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("moe-eval")
    train(root / "run", ["model=moe_tiny", "data=demo", "data.max_bytes=300000",
                         "trainer.max_steps=12", "optim.lr=3e-3", "checkpoint.save_final=true",
                         "trainer.eval_every_steps=12", f"trainer.eval_tokens={EVAL_TOKENS}"],
          env={"PRETRAIN_DATA_DIR": str(root / "data")})  # fmt: skip
    return root / "run"


@pytest.fixture(scope="module")
def hf_dir(run_dir: Path) -> Path:
    """tools/export_hf.py: transformers' Qwen3MoeForCausalLM with our logits (< 1e-5)."""
    weights = export.consolidated_state_dict(run_dir / "checkpoints" / "step_12")
    hf = export_and_compare(run_dir, weights, run_dir.parent / "hf")
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    return run_dir.parent / "hf"


def tool(name: str, *args: object, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:  # fmt: skip
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**subprocess_env(), **(env or {})})  # fmt: skip


def test_eval_ppl_scores_checkpoint_and_export_as_the_loop_did(run_dir: Path, hf_dir: Path
                                                              ) -> None:  # fmt: skip
    """The language model alone (no aux term): the in-loop val_loss, from the checkpoint
    and from the transformers export alike."""
    (last,) = [r for r in read_metrics(run_dir) if "val_loss" in r]
    shards = run_dir.parent / "data" / "demo" / "shards"
    proc = tool("eval_ppl.py", run_dir, "--data", shards, "--tokens", EVAL_TOKENS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    same = ["--data", shards, "--tokens", EVAL_TOKENS, "--seq-len", 32, "--batch-size", 4,
            "--seed", 7]  # fmt: skip
    ckpt, hf = (tool("eval_ppl.py", source, *same) for source in (run_dir, hf_dir))
    assert hf.returncode == 0, hf.stderr[-2000:]
    assert json.loads(hf.stdout)["loss"] == pytest.approx(json.loads(ckpt.stdout)["loss"],
                                                          rel=1e-5)  # fmt: skip


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_prints_what_transformers_generates(run_dir: Path, hf_dir: Path, beams: int
                                                     ) -> None:  # fmt: skip
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = tok(PROMPT, return_tensors="pt")
    out = hf.generate(**ids, max_new_tokens=10, num_beams=beams, do_sample=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    expected = tok.decode([t for t in new if t != tok.pad_token_id]) + "\n"
    for source in (run_dir, hf_dir):
        proc = tool("generate.py", source, "--prompt", PROMPT, "--max-new-tokens", 10,
                    "--num-beams", beams)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout == expected


def test_lm_eval_harness_agrees_with_eval_ppl(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    (tasks / "tiny_ppl.yaml").write_text(PPL_YAML.format(data=docs))
    out = tmp_path / "harness.json"
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = tool("eval_harness.py", run_dir, "--tasks", "tiny_ppl", "--include-path", tasks,
                "--output", out, "--max-length", 32, env=offline)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    bpb = json.loads(out.read_text())["results"]["tiny_ppl"]["bits_per_byte,none"]
    ours = tool("eval_ppl.py", run_dir, "--text", docs, "--seq-len", 32)
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert json.loads(ours.stdout)["bpb"] == pytest.approx(bpb, rel=1e-5)


def test_init_from_the_export_starts_a_zero3_run_from_its_weights(
    hf_dir: Path, tmp_path: Path
) -> None:
    """The first step's loss is the export's on that step's micro-batches: language model
    plus aux_loss_coef x the load-balancing loss (the router logits transformers returns,
    pooled as ours), averaged over the 4 micro-batches."""
    transformers = pytest.importorskip("transformers")
    started = train(tmp_path, ["model=moe_tiny", *EXACT, "trainer.max_steps=1",
                               f"model.init_from={hf_dir}", "deepspeed.zero_stage=3"])  # fmt: skip
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    batch = next(SyntheticStream(512, 32, 8, 1, seed=1234))
    coef = hf.config.router_aux_loss_coef
    losses = []
    with torch.no_grad():
        for micro in batch.split(2):
            out = hf(micro[:, :-1], output_router_logits=True)
            lm = F.cross_entropy(out.logits.flatten(0, 1), micro[:, 1:].flatten())
            routings = []
            for logits in out.router_logits:
                probs = F.softmax(logits.float(), dim=-1)
                chosen = probs.topk(hf.config.num_experts_per_tok, dim=-1).indices.flatten()
                routings.append((probs, torch.bincount(chosen, minlength=probs.size(1))))
            losses.append(lm + coef * load_balancing_loss(routings))
    assert started[0]["loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-4)
