"""tools/quantize.py and tools/prune.py on one real demo run: the reports say what the written
directories hold (sizes from the files, sparsity from the weights), transformers loads each
directory and its loss on the report's windows is the report's, our tools read them too,
and bad requests fail before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.compress import prune, quantize
from pretrain.data.stream import build_loader
from tests.conftest import REPO, subprocess_env, train

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compress")
    train(root / "run", ["data=demo", "data.max_bytes=300000", "trainer.max_steps=80",
                         "optim.lr=3e-3", "trainer.log_every=10", "trainer.micro_batch_size=8",
                         "trainer.global_batch_size=16", "checkpoint.save_final=true"],
          env={"PRETRAIN_DATA_DIR": str(root / "data")})  # fmt: skip
    return root / "run"


def tool(name: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=subprocess_env())  # fmt: skip


def transformers_loss(hf_dir: Path, report: dict) -> float:
    """transformers' own model of `hf_dir`, scored on the report's windows by hand."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    windows = build_loader(report["data"], model.config.vocab_size, report["seq_len"],
                           report["batch_size"], seed=report["seed"], split="val",
                           num_workers=0, epochs=1)  # fmt: skip
    nats, tokens = 0.0, 0
    with torch.no_grad():
        for batch in windows:
            logits = model(batch[:, :-1]).logits
            nats += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            tokens += batch[:, 1:].numel()
    assert tokens == report["before"]["tokens"]
    return float(nats) / tokens


def files_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_directories_load_in_transformers_at_the_reported_loss(
    run_dir: Path, tmp_path: Path, method: str
) -> None:
    out = tmp_path / method
    proc = tool("quantize.py", run_dir, "--method", method, "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "quantization.json").read_text())
    assert json.loads(proc.stdout) == report
    assert report["group_size"] == (64 if method == "int4" else None)  # 128 divides no 192
    assert report["size_bytes"]["after"] == files_bytes(out)
    plain = tmp_path / "plain"
    assert tool("export_hf.py", run_dir, plain).returncode == 0
    assert report["size_bytes"]["before"] == files_bytes(plain)
    assert report["size_bytes"]["after"] < 0.7 * report["size_bytes"]["before"]
    assert report["after"]["loss"] == pytest.approx(transformers_loss(out, report), rel=1e-6)
    assert report["before"]["loss"] == pytest.approx(transformers_loss(plain, report), rel=1e-6)
    assert 0 < abs(report["after"]["loss"] - report["before"]["loss"]) < 0.05
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert (out / "tokenizer.json").is_file()
    # Our tools read it (dequantised): the same windows, the same loss within the kernels'.
    ppl = tool("eval_ppl.py", out, "--data", report["data"], "--seq-len", report["seq_len"],
               "--batch-size", report["batch_size"], "--seed", report["seed"])  # fmt: skip
    assert ppl.returncode == 0, ppl.stderr[-3000:]
    assert json.loads(ppl.stdout)["loss"] == pytest.approx(report["after"]["loss"], rel=1e-4)


def test_bad_quantization_requests_fail_before_any_work(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    bad = tool("quantize.py", run_dir, "--method", "int4", "--group-size", "48", "--output", out)
    assert bad.returncode == 2 and "--group-size 48 must divide" in bad.stderr
    assert "intermediate_size (down_proj)=192" not in bad.stderr  # 48 divides 192, not 64
    assert "hidden_size (q/k/v, gate/up projections)=64" in bad.stderr
    assert not out.exists() and not out.with_name("q.partial").exists()
    assert "choose one of int8, int4" in tool("quantize.py", run_dir, "--method", "int3",
                                              "--output", out).stderr  # fmt: skip
    moe = {"model_type": "qwen3_moe", "hidden_size": 64}
    assert "fused 3-D tensors" in quantize.errors(moe, "int8", None)[0]
    assert "fused 3-D tensors" in prune.errors(moe, 0.5, "unstructured")[0]
    zero = tool("quantize.py", run_dir, "--method", "int4", "--group-size", "0", "--output", out)
    assert zero.returncode == 2 and "--group-size 0: must be positive" in zero.stderr
    odd = {"model_type": "llama", "hidden_size": 72, "num_attention_heads": 4,
           "intermediate_size": 200}  # fmt: skip
    assert "no group size of" in quantize.errors(odd, "int4", None)[0]
    hf = tool("quantize.py", run_dir / "nowhere", "--method", "int8", "--output", out)
    assert hf.returncode == 2 and "does not exist" in hf.stderr


def test_pruning_reports_the_written_sparsity_and_fine_tuning_keeps_it(
    run_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "pruned"
    proc = tool("prune.py", run_dir, "--sparsity", "0.5", "--output", out, "--finetune-steps", 8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "pruning.json").read_text())
    weights = load_file(out / "model.safetensors")
    linear = [k for k in weights if k.endswith("proj.weight")]
    zeros = sum(int((weights[k] == 0).sum()) for k in linear)
    assert zeros / sum(weights[k].numel() for k in linear) == report["sparsity"]["linear"] == 0.5
    assert all((weights[k] != 0).all() for k in weights if "norm" in k or "embed" in k)
    assert report["size_bytes"]["after"] == files_bytes(out) == report["size_bytes"]["before"]
    # Pruning costs loss, the masked fine-tuning wins some back; transformers agrees.
    assert report["pruned"]["loss"] > report["before"]["loss"] > 0
    assert report["finetuned"]["loss"] < report["pruned"]["loss"]
    assert report["finetuned"]["loss"] == pytest.approx(transformers_loss(out, report), rel=1e-6)


def test_two_of_four_and_bad_pruning_requests(run_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "p24"
    proc = tool("prune.py", run_dir, "--sparsity", "0.5", "--pattern", "2:4", "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "pruning.json").read_text())
    assert report["pruned"]["loss"] == pytest.approx(transformers_loss(out, report), rel=1e-6)
    for name, w in load_file(out / "model.safetensors").items():
        if name.endswith("proj.weight"):  # exactly two zeros in every four inputs
            assert ((w.reshape(w.size(0), -1, 4) == 0).sum(-1) == 2).all(), name
    bad = tool("prune.py", run_dir, "--sparsity", "0.3", "--pattern", "2:4", "--output", out)
    assert bad.returncode == 2 and "prunes exactly half" in bad.stderr
    hf_only = tool("prune.py", out, "--sparsity", "0.5", "--output", tmp_path / "x",
                   "--finetune-steps", "3", "--data", report["data"])  # fmt: skip
    assert hf_only.returncode == 2 and "give a run dir" in hf_only.stderr


def test_held_zeros_stay_zero_through_adamw_with_weight_decay() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    prune.prune(model, 0.5, "unstructured")
    zero = [layer.weight == 0 for _, layer in prune.prunable(model)]
    assert prune.keep_zeros(model) == sum(int(z.sum()) for z in zero) == 128
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    for z, (_, layer) in zip(zero, prune.prunable(model), strict=True):
        assert (layer.weight[z] == 0).all() and (layer.weight[~z] != 0).all()


def test_a_batch_with_no_counted_target_measures_0_not_nan() -> None:
    """An SFT val split shorter than the evaluation ends in padding windows whose labels all
    say ignore: their loss is 0 (and they count nothing), not NaN, which would poison the
    report's mean; the 4D document mask keeps two documents apart as our model does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pretrain.compress.heldout import hf_loss
    from pretrain.data.source import Batch
    from pretrain.model.documents import DocumentSplit

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         initializer_range=0.5))  # fmt: skip
    tokens = torch.randint(0, 15, (2, 9))
    ignored = Batch(tokens, labels=torch.full((2, 8), -100))
    assert hf_loss(model.eval())(ignored).item() == 0.0
    # Two documents (EOS = 15 ends the first): the second's loss alone equals its own.
    doc = torch.randint(0, 15, (1, 5))
    packed = torch.cat([doc[:, :3], torch.tensor([[15]]), doc], dim=1)  # (1, 9)
    labels = torch.full((1, 8), -100)
    labels[:, 4:] = packed[:, 5:]  # the second document's targets after its first token
    split = DocumentSplit(eos=15, reset=True)
    within = hf_loss(model, split, masked=True)(Batch(packed, labels=labels))
    alone = hf_loss(model)(Batch(doc, labels=doc[:, 1:]))
    assert within.item() == pytest.approx(alone.item(), rel=1e-5)
    across = hf_loss(model)(Batch(packed, labels=labels))  # no mask: sees the first document
    assert abs(across.item() - alone.item()) > 0.01
