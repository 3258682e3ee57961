"""The Llama model: attention backends agree, it is causal, parameter counts match the
formulas and the published sizes, and it is numerically the same as transformers' Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pretrain.config import conf_dir
from pretrain.model import LlamaConfig, Transformer, flops_per_token, num_params
from pretrain.model.attention import causal_attention, resolve_impl
from pretrain.model.family import model_fields
from pretrain.model.flops import matmul_params
from tests.conftest import compose_config, requires_gpu

PRESETS = sorted(
    p.stem for p in (Path(conf_dir()) / "model").glob("*.yaml") if "llama_schema" in p.read_text()
)


def _cfg(**kw: object) -> LlamaConfig:
    base = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=101)
    return LlamaConfig(**{**base, **kw})


def _preset(name: str) -> LlamaConfig:
    model = OmegaConf.to_object(compose_config([f"model={name}"]).model)
    return LlamaConfig(**model_fields(vars(model)))


@pytest.mark.parametrize(("n_heads", "n_kv_heads"), [(4, 4), (4, 2), (4, 1)])
def test_sdpa_matches_eager(n_heads: int, n_kv_heads: int) -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 17, n_heads, 8)
    k, v = torch.randn(2, 2, 17, n_kv_heads, 8).unbind(0)
    torch.testing.assert_close(
        causal_attention(q, k, v, "sdpa"), causal_attention(q, k, v, "eager"),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def test_whole_model_sdpa_matches_eager() -> None:
    torch.manual_seed(0)
    model = Transformer(_cfg(attn_impl="sdpa")).eval()
    tokens = torch.randint(0, 101, (2, 24))
    logits_sdpa = model(tokens)
    for layer in model.layers:
        layer.self_attn.attn_impl = "eager"
    torch.testing.assert_close(model(tokens), logits_sdpa, rtol=1e-5, atol=1e-5)


def test_auto_picks_sdpa_on_cpu_and_flash_is_refused_there() -> None:
    assert resolve_impl("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"
    with pytest.raises(RuntimeError, match="attn_impl=auto"):
        resolve_impl("flash", torch.device("cpu"), torch.bfloat16)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("n_kv_heads", [8, 2])
def test_flash_matches_sdpa_on_gpu(n_kv_heads: int) -> None:
    pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    q = torch.randn(2, 256, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 2, 256, n_kv_heads, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
    torch.testing.assert_close(
        causal_attention(q, k, v, "flash"), causal_attention(q, k, v, "sdpa"),
        rtol=2e-2, atol=2e-2,
    )  # fmt: skip
    assert resolve_impl("auto", q.device, q.dtype) == "flash"


def test_model_is_causal() -> None:
    torch.manual_seed(0)
    model = Transformer(_cfg()).eval()
    tokens = torch.randint(0, 101, (1, 20))
    changed = tokens.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 101
    torch.testing.assert_close(model(tokens)[:, :12], model(changed)[:, :12])
    assert not torch.allclose(model(tokens)[:, 12:], model(changed)[:, 12:])


def test_loss_is_cross_entropy_of_logits() -> None:
    torch.manual_seed(0)
    model = Transformer(_cfg(vocab_multiple=1))  # no padded rows: logits are the whole table
    tokens = torch.randint(0, 101, (2, 9))
    logits = model(tokens[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 101), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(model(tokens[:, :-1], tokens[:, 1:]), expected)


def test_tied_embeddings_share_one_tensor_and_are_counted_once() -> None:
    model = Transformer(_cfg(tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == num_params(model.config)


def test_residual_projections_get_scaled_init() -> None:
    torch.manual_seed(0)
    model = Transformer(_cfg(n_layers=8, d_model=256, n_heads=4, ffn_hidden=512))
    q_std = model.layers[0].self_attn.q_proj.weight.std().item()
    o_std = model.layers[0].self_attn.o_proj.weight.std().item()
    assert q_std == pytest.approx(0.02, rel=0.05)
    assert o_std == pytest.approx(0.02 / 4.0, rel=0.05)  # 0.02 / sqrt(2 * 8)


def test_dropout_is_active_only_in_training() -> None:
    torch.manual_seed(0)
    model = Transformer(_cfg(dropout=0.5))
    tokens = torch.randint(0, 101, (2, 16))
    model.eval()
    torch.testing.assert_close(model(tokens), model(tokens))
    model.train()
    assert not torch.allclose(model(tokens), model(tokens))


def test_invalid_shape_is_refused_with_the_key_named() -> None:
    msg = r"model\.n_heads=4 is not a multiple of model\.n_kv_heads=3"
    with pytest.raises(ValueError, match=msg):
        Transformer(_cfg(n_kv_heads=3))


@pytest.mark.parametrize("preset", PRESETS)
def test_param_count_formula_matches_the_module(preset: str) -> None:
    cfg = _preset(preset)
    with torch.device("meta"):  # no memory, even for 70B
        model = Transformer(cfg)
    unique = {id(p): p for p in model.parameters()}
    assert sum(p.numel() for p in unique.values()) == num_params(cfg)


@pytest.mark.parametrize(
    ("preset", "published"),
    [
        ("llama_7b", 6_738_415_616),  # Llama 2 7B
        ("llama_70b", 68_976_648_192),  # Llama 2 70B
        ("llama_1b", 1_235_814_400),  # Llama 3.2 1B
        ("llama_125m", 123_587_328),  # GPT-3 Small shape, Llama blocks, tied
    ],
)
def test_presets_have_their_published_sizes(preset: str, published: int) -> None:
    assert num_params(_preset(preset)) == published


def test_flops_per_token_by_hand() -> None:
    cfg = _cfg(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=101)
    # per layer: q, o 64*64 each; k, v 64*32 each; mlp 3*64*96 -> 8192 + 4096 + 18432 = 30720;
    # the head computes all 128 padded rows of the 101-token vocabulary.
    assert matmul_params(cfg) == 2 * 30720 + 128 * 64
    attn = 12 * 2 * 128 * 4 * 16
    assert flops_per_token(cfg, seq_len=128) == 6 * (2 * 30720 + 8192) + attn
    assert flops_per_token(cfg, seq_len=128, causal=True) == 6 * (2 * 30720 + 8192) + attn // 2


@pytest.mark.parametrize(
    ("n_kv_heads", "tie"), [(4, False), (2, True), (1, False)], ids=["mha", "gqa-tied", "mqa"]
)
def test_logits_match_transformers_llama(n_kv_heads: int, tie: bool) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = _cfg(n_kv_heads=n_kv_heads, tie_embeddings=tie, d_model=48, n_heads=4, ffn_hidden=80)
    ours = Transformer(cfg).eval()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.padded_vocab, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=tie,
        attention_bias=False, mlp_bias=False,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {
        (k if k.startswith("lm_head") else f"model.{k}"): v for k, v in ours.state_dict().items()
    }
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    tokens = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        diff = (hf(tokens).logits[..., : cfg.vocab_size] - ours(tokens)).abs().max().item()
    assert diff < 1e-5
