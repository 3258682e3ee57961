"""HF export and import, proven against transformers: the same logits (fp32, < 1e-5).

In-process here, for several shapes; tests/checkpoint/test_reshard.py exports a real
two-rank ZeRO-3 checkpoint through the CLI and the end-of-training hook.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.export import load_hf_weights, write_hf
from pretrain.data.tokenizer import byte_tokenizer
from pretrain.model.llama import LlamaConfig, Transformer
from pretrain.model.llama_family import LLAMA

transformers = pytest.importorskip("transformers")

SHAPES = {
    "mha-untied": dict(d_model=64, n_heads=4, n_kv_heads=4, tie_embeddings=False),
    "gqa-tied": dict(d_model=64, n_heads=8, n_kv_heads=2, tie_embeddings=True),
    "mqa-untied": dict(d_model=48, n_heads=4, n_kv_heads=1, tie_embeddings=False),
    # Odd sizes: vocab not a multiple of anything, head_dim 6, ffn 70, 3 layers, eps 1e-6.
    "odd": dict(
        d_model=30,
        n_heads=5,
        n_kv_heads=5,
        ffn_hidden=70,
        vocab_size=333,
        n_layers=3,
        norm_eps=1e-6,
        rope_theta=500000.0,
    ),
}


def _model(shape: dict) -> tuple[Transformer, dict]:
    torch.manual_seed(0)
    cfg = LlamaConfig(**{"n_layers": 2, "vocab_size": 300, "attn_impl": "sdpa", **shape})
    model = Transformer(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a swapped or dropped weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model, {"_target_": LLAMA.target, **dataclasses.asdict(cfg)}  # a model section


def _logits_diff(a: torch.nn.Module, b: torch.nn.Module, vocab: int, hf_first: bool) -> float:
    tokens = torch.randint(0, vocab, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        la = a(tokens).logits if hf_first else a(tokens)
        lb = b(tokens)
    return (la - lb).abs().max().item()


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_export_matches_transformers_and_import_matches_us(tmp_path: Path, shape: str) -> None:
    ours, cfg = _model(SHAPES[shape])
    out = tmp_path / "hf"
    write_hf(ours.state_dict(), cfg, out, tokenizer=byte_tokenizer(), max_shard_size="40KB")
    assert not (tmp_path / "hf.partial").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert _logits_diff(hf, ours, cfg["vocab_size"], hf_first=True) < 1e-5
    # Our tables are padded to a multiple of 128 rows (300 -> 384, 333 -> 384); HF's hold the
    # tokenizer's ids only, so downstream tools never pick an id no tokenizer has.
    assert ours.embed_tokens.weight.shape[0] == 384
    assert hf.get_input_embeddings().weight.shape[0] == hf.config.vocab_size == cfg["vocab_size"]
    # Sharded: the index names every tensor, and tied embeddings store one matrix.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert ("lm_head.weight" in index["weight_map"]) != cfg["tie_embeddings"]
    assert len(set(index["weight_map"].values())) > 1

    # Import: a fresh model of the same shape takes the HF weights and gives HF's logits.
    torch.manual_seed(123)
    fresh = LLAMA.build(cfg).eval()
    load_hf_weights(fresh, out, cfg)
    assert _logits_diff(hf, fresh, cfg["vocab_size"], hf_first=True) < 1e-5
    if cfg["tie_embeddings"]:
        assert fresh.lm_head.weight is fresh.embed_tokens.weight


def test_exported_tokenizer_and_generation_work_in_transformers(tmp_path: Path) -> None:
    ours, cfg = _model(SHAPES["gqa-tied"])
    tok = byte_tokenizer()
    write_hf(ours.state_dict(), cfg, tmp_path, tokenizer=tok, dtype="bfloat16")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "def f(x):\n    return x + 1  # é"
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids
    assert hf_tok.decode(tok.encode(text).ids) == text
    assert hf_tok.eos_token == "<|eos|>" and hf_tok.pad_token == "<|pad|>"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert config["eos_token_id"] == tok.token_to_id("<|eos|>")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert next(hf.parameters()).dtype == torch.bfloat16
    prompt = hf_tok("import os", return_tensors="pt")
    generated = hf.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 6)


def test_import_refuses_another_shape_naming_each_key(tmp_path: Path) -> None:
    ours, cfg = _model(SHAPES["mha-untied"])
    write_hf(ours.state_dict(), cfg, tmp_path)
    other = {**cfg, "n_layers": 3, "n_kv_heads": 2}
    with pytest.raises(ValueError) as e:
        load_hf_weights(LLAMA.build(other), tmp_path, other)
    assert "num_hidden_layers: checkpoint has 2, model has 3" in str(e.value)
    assert "num_key_value_heads: checkpoint has 4, model has 2" in str(e.value)


def test_resuming_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    """A checkpoint that recorded no fingerprint (older ones) is held to the tokenizer.json
    it carries; one without either has nothing to check."""
    from pretrain.checkpoint.export import check_same_tokenizer
    from pretrain.data.stream import DataError
    from pretrain.data.tokenizer import fingerprint, train_bpe

    ckpt = tmp_path / "step_2"
    ckpt.mkdir()
    byte_tokenizer().save(str(ckpt / "tokenizer.json"))
    ours = fingerprint(byte_tokenizer())
    check_same_tokenizer(ckpt, None, ours)  # the same one: fine
    other = fingerprint(train_bpe(["def f(x):\n    return x\n"] * 50, 300))
    with pytest.raises(DataError, match="was trained on data tokenized by sha256"):
        check_same_tokenizer(ckpt, None, other)
    with pytest.raises(DataError, match="allow_tokenizer_change"):
        check_same_tokenizer(tmp_path, ours, other)  # the fingerprint the checkpoint recorded
    check_same_tokenizer(tmp_path, ours, other, allow=True)  # warned about, not refused
    check_same_tokenizer(tmp_path, None, other)  # a checkpoint without either: nothing to check
