"""The MoE family's Hugging Face export and import (pretrain/model/moe_hf.py), proven
against transformers: Qwen3-MoE, OLMoE, Mixtral and Qwen2-MoE directories that transformers
loads with our logits (fp32, < 1e-5) and our greedy generations; the per-expert layout on
disk; a fresh model initialised from them gives their logits; a mismatched shape is
named."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.export import load_hf_weights, write_hf
from pretrain.eval.generate import GenerationConfig, generate
from pretrain.model.llama import LlamaConfig
from pretrain.model.llama_family import LLAMA
from pretrain.model.moe_family import MOE
from pretrain.model.moe_hf import architecture_errors
from pretrain.model.moe_model import MoEConfig, MoETransformer

transformers = pytest.importorskip("transformers")

BASE = dict(n_layers=3, d_model=48, n_heads=4, n_kv_heads=2, ffn_hidden=40, vocab_size=300,
            n_experts=6, top_k=2, moe_ffn_hidden=24, max_seq_len=64, attn_impl="sdpa",
            init_std=0.1)  # fmt: skip
FAMILIES = {
    # Qwen3-MoE: per-head QK-norm, head_dim apart from d_model / n_heads, a dense block.
    "qwen3_moe": ("Qwen3MoeForCausalLM",
                  dict(qk_norm="head", head_dim=16, moe_every=2, norm_topk_prob=True)),
    # OLMoE: QK-norm over all heads at once, every block sparse, no renormalisation.
    "olmoe": ("OlmoeForCausalLM", dict(qk_norm="full", norm_topk_prob=False, top_k=3)),
    # Mixtral: no QK-norm, renormalised top-k, tied embeddings.
    "mixtral": ("MixtralForCausalLM",
                dict(qk_norm="none", norm_topk_prob=True, tie_embeddings=True)),
    # Qwen2-MoE: a gated shared expert beside the routed ones, a dense block.
    "qwen2_moe": ("Qwen2MoeForCausalLM",
                  dict(qk_norm="none", shared_expert_hidden=20, moe_every=2)),
}  # fmt: skip


def _model(shape: dict) -> tuple[MoETransformer, dict]:
    torch.manual_seed(0)
    cfg = MoEConfig(**{**BASE, **shape})
    model = MoETransformer(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a swapped or dropped weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model, {"_target_": MOE.target, **dataclasses.asdict(cfg)}


def _logits(model: torch.nn.Module, hf: bool) -> torch.Tensor:
    tokens = torch.randint(0, BASE["vocab_size"], (2, 21),
                           generator=torch.Generator().manual_seed(1))  # fmt: skip
    with torch.no_grad():
        return model(tokens).logits if hf else model(tokens)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_in_transformers_with_our_logits_and_imports_back(
    tmp_path: Path, family: str
) -> None:
    arch, shape = FAMILIES[family]
    ours, section = _model(shape)
    out = tmp_path / "hf"
    write_hf(ours.state_dict(), section, out, max_shard_size="100KB")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [arch]
    # On disk: one tensor per expert and projection, as every HF MoE checkpoint holds them.
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    sparse = "block_sparse_moe" if family == "mixtral" else "mlp"
    gate = "w1" if family == "mixtral" else "gate_proj"
    assert f"model.layers.1.{sparse}.experts.5.{gate}.weight" in names  # sparse in each
    assert not any("gate_up_proj" in n for n in names)

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    assert (_logits(hf, hf=True) - _logits(ours, hf=False)).abs().max() < 1e-5

    torch.manual_seed(123)  # import: fresh weights take the directory's
    fresh = MOE.build(section).eval()
    load_hf_weights(fresh, out, section)
    assert (_logits(hf, hf=True) - _logits(fresh, hf=False)).abs().max() < 1e-5
    for name, p in ours.state_dict().items():  # bar the tables' padding rows (not exported)
        assert torch.equal(
            p[: BASE["vocab_size"]], fresh.state_dict()[name][: BASE["vocab_size"]]
        ), name

    # Greedy generation: ours (KV cache, left-padded prompts) equals transformers'.
    prompts = [[5, 9, 2, 7, 30], [11, 3]]
    got = generate(ours, prompts, GenerationConfig(max_new_tokens=8))
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    for prompt, row in zip(prompts, got, strict=True):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=8)  # fmt: skip
        assert row == theirs[0, len(prompt) :].tolist()


def test_import_refuses_another_moe_shape_naming_each_key(tmp_path: Path) -> None:
    ours, section = _model(FAMILIES["qwen3_moe"][1])
    write_hf(ours.state_dict(), section, tmp_path)
    other = {**section, "n_experts": 8, "top_k": 1, "head_dim": 12}
    with pytest.raises(ValueError) as e:
        load_hf_weights(MOE.build(other), tmp_path, other)
    for fragment in ("num_experts: checkpoint has 6, model has 8",
                     "num_experts_per_tok: checkpoint has 2, model has 1",
                     "head_dim: checkpoint has 16, model has 12"):  # fmt: skip
        assert fragment in str(e.value)
    olmoe = {**section, "qk_norm": "full", "head_dim": None, "moe_every": 1}
    with pytest.raises(ValueError, match="model_type: checkpoint has 'qwen3_moe'"):
        load_hf_weights(MOE.build(olmoe), tmp_path, olmoe)


def test_import_refuses_a_directory_missing_an_expert(tmp_path: Path) -> None:
    """Every expert's projections must be there: a fused tensor partly set would keep
    random rows without a word."""
    from safetensors.torch import load_file, save_file

    ours, section = _model(FAMILIES["olmoe"][1])
    write_hf(ours.state_dict(), section, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.2.mlp.experts.4.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.2\.mlp\.experts\.gate_up_proj: .* lacks some"):
        load_hf_weights(MOE.build(section), tmp_path, section)


def test_a_model_no_hf_family_holds_is_named_with_the_fix() -> None:
    assert architecture_errors(MoEConfig(**{**BASE, "qk_norm": "head", "moe_every": 2})) == []
    errs = architecture_errors(MoEConfig(**{**BASE, "qk_norm": "full", "moe_every": 2,
                                            "head_dim": 16}))  # fmt: skip
    assert any("model.moe_every=2: olmoe makes every block sparse" in e for e in errs)
    assert any("model.head_dim=16: OLMoE's QK-norm needs" in e for e in errs)
    errs = architecture_errors(MoEConfig(**{**BASE, "qk_norm": "none"}))
    assert any("Mixtral always renormalises" in e for e in errs)
    with pytest.raises(ValueError, match="no Hugging Face family for this model"):
        MOE.hf.config({**BASE, "qk_norm": "none"}, "float32", {})
    errs = architecture_errors(MoEConfig(**{**BASE, "qk_norm": "head",
                                            "shared_expert_hidden": 8}))  # fmt: skip
    assert any("Qwen2-MoE, the family with a shared expert, has no QK-norm" in e for e in errs)


def test_a_qwen2_moe_directory_with_qkv_biases_is_refused(tmp_path: Path) -> None:
    """Published Qwen2-MoE checkpoints have q/k/v biases, which this model lacks: named, not
    silently dropped."""
    ours, section = _model(FAMILIES["qwen2_moe"][1])
    write_hf(ours.state_dict(), section, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "qkv_bias": True}))
    with pytest.raises(ValueError, match="qkv_bias=true: its q, k and v projections"):
        load_hf_weights(MOE.build(section), tmp_path, section)


def test_llama_with_its_own_head_dim_exports_and_qk_norm_is_refused(tmp_path: Path) -> None:
    """head_dim set apart from d_model / n_heads (wider q_proj) still exports to Llama;
    QK-norm has no LlamaForCausalLM counterpart and says so."""
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=12,
                      vocab_size=200, attn_impl="sdpa")  # fmt: skip
    ours = LLAMA.build(vars(cfg)).eval()
    assert ours.layers[0].self_attn.q_proj.weight.shape == (48, 32)
    section = {"_target_": LLAMA.target, **dataclasses.asdict(cfg)}
    write_hf(ours.state_dict(), section, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, 200, (1, 9))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"model\.qk_norm=head: transformers' LlamaForCausalLM"):
        LLAMA.hf.config({**vars(cfg), "qk_norm": "head"}, "float32", {})
