"""Parameter and FLOP counts as pure functions of the config: no model, no GPU needed.

`flops_per_token` follows the PaLM paper's appendix B (Chowdhery et al. 2022), the
convention of Megatron-LM and nanoGPT MFU figures:

    6 * N_matmul + 12 * n_layers * seq_len * n_heads * head_dim

N_matmul counts every weight that takes part in a matrix multiply (all projections and the
output head, tied or not) and leaves out the embedding lookup and the norm gains. The
second term is attention's QK^T and AV products, forward (x1) plus backward (x2), counted
over the full T x T score matrix; `causal=True` halves it to the work a causal kernel does.
"""

from __future__ import annotations

from pretrain.model.llama import LlamaConfig


def layer_params(cfg: LlamaConfig) -> int:
    """Parameters of one Transformer block."""
    attn = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)  # q, o, k, v
    mlp = 3 * cfg.d_model * cfg.ffn_hidden  # gate, up, down
    norms = 2 * cfg.d_model
    return attn + mlp + norms


def num_params(cfg: LlamaConfig) -> int:
    """Trainable parameters of `Transformer(cfg)`, counting a tied embedding once."""
    embed = cfg.vocab_size * cfg.d_model
    head = 0 if cfg.tie_embeddings else embed
    return embed + cfg.n_layers * layer_params(cfg) + cfg.d_model + head


def matmul_params(cfg: LlamaConfig) -> int:
    """Weights that enter a matmul each token: all projections plus the output head."""
    per_layer = layer_params(cfg) - 2 * cfg.d_model
    return cfg.n_layers * per_layer + cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: LlamaConfig, seq_len: int, causal: bool = False) -> int:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
    attn = 12 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    if causal:
        attn //= 2
    return 6 * matmul_params(cfg) + attn


# Dense peak throughput in FLOP/s by (GPU name fragment, precision), from the vendors' data
# sheets (no 2:4 sparsity). MFU = achieved model FLOP/s / this peak.
PEAK_FLOPS = {
    ("H100 PCIe", "bf16"): 756e12, ("H100 PCIe", "fp16"): 756e12, ("H100 PCIe", "fp32"): 51e12,
    ("H200", "bf16"): 989e12, ("H200", "fp16"): 989e12, ("H200", "fp32"): 67e12,
    ("H100", "bf16"): 989e12, ("H100", "fp16"): 989e12, ("H100", "fp32"): 67e12,
    ("A100", "bf16"): 312e12, ("A100", "fp16"): 312e12, ("A100", "fp32"): 19.5e12,
}  # fmt: skip


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a GPU named like `torch.cuda.get_device_name()`, or None if unknown."""
    for (fragment, prec), flops in PEAK_FLOPS.items():
        if fragment in device_name and prec == precision:
            return flops
    return None
