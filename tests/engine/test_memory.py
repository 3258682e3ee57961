"""The memory estimate against hand-computed values and against what autograd really keeps."""

from __future__ import annotations

import pytest
import torch

from pretrain.engine.memory import activation_bytes_per_token, estimate_memory
from pretrain.model.flops import num_params
from pretrain.model.llama import LlamaConfig, Transformer

SMALL = LlamaConfig(
    n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=512,
    max_seq_len=256, attn_impl="sdpa",
)  # fmt: skip


def test_activation_bytes_by_hand() -> None:
    # h=64, kv=2*16=32, F=192. bf16 (w=2): norm = 4*64 + 2*2*64 = 512;
    # block = 2*512 + 2*(64 + 64) + 2*64 + 2*768 = 2944; final norm 512; loss 12*512 = 6144.
    assert activation_bytes_per_token(SMALL, "bf16") == 2 * 2944 + 512 + 6144
    # fp32 (w=4): norm = 256 + 512 = 768; block = 1536 + 512 + 256 + 3072 = 5376.
    assert activation_bytes_per_token(SMALL, "fp32") == 2 * 5376 + 768 + 6144
    # Checkpointed: each block keeps its fp32 input (256), one block lives again.
    assert activation_bytes_per_token(SMALL, "fp32", True) == 2 * 256 + 5376 + 768 + 6144


def test_zero_stages_divide_what_they_shard() -> None:
    n = num_params(SMALL)
    act = 8 * 128 * activation_bytes_per_token(SMALL, "bf16")

    def est(stage: int, **kw: object) -> tuple[int, int, int, int]:
        e = estimate_memory(SMALL, seq_len=128, micro_batch_size=8, dp=4, zero_stage=stage, **kw)
        return e.weights, e.grads, e.optimizer, e.activations

    assert est(0) == (2 * n, 2 * n, 12 * n, act)  # bf16 weights/grads, fp32 master + 2 moments
    assert est(1) == (2 * n, 2 * n, 12 * n // 4, act)
    assert est(2) == (2 * n, 2 * n // 4, 12 * n // 4, act)
    assert est(3) == (2 * n // 4, 2 * n // 4, 12 * n // 4, act)
    assert est(2, offload_optimizer=True)[2] == 0
    fp32 = estimate_memory(SMALL, seq_len=128, micro_batch_size=8, dp=1, zero_stage=0,
                           precision="fp32")  # fmt: skip
    assert (fp32.weights, fp32.grads, fp32.optimizer) == (4 * n, 4 * n, 8 * n)  # no master copy
    assert fp32.states == 12 * n
    # One micro-batch: activations are gone before the gradients are complete ...
    assert fp32.total == 12 * n + max(4 * n, fp32.activations)
    # ... with accumulation, earlier micro-batches' gradients wait beside the activations.
    accum = estimate_memory(SMALL, seq_len=128, micro_batch_size=8, dp=1, zero_stage=0,
                            precision="fp32", grad_accum=4)  # fmt: skip
    assert accum.total == 16 * n + accum.activations
    with pytest.raises(ValueError, match="zero_stage=4"):
        estimate_memory(SMALL, seq_len=8, micro_batch_size=1, dp=1, zero_stage=4)


def test_activation_estimate_matches_what_autograd_saves() -> None:
    """Sum the distinct storages autograd keeps for backward in a real forward pass."""
    torch.manual_seed(0)
    model = Transformer(SMALL)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 2 and t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    B, T = 4, 128
    tokens = torch.randint(0, SMALL.vocab_size, (B, T + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    saved = sum(kept.values()) / (B * T)
    # The estimate's loss term counts 12 bytes per vocabulary entry: 4 kept, 8 in backward.
    expected = activation_bytes_per_token(SMALL, "fp32") - 8 * SMALL.vocab_size
    assert saved == pytest.approx(expected, rel=0.02)
    loss.backward()  # the graph was a real one
