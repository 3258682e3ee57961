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
    embed = cfg.padded_vocab * cfg.d_model
    head = 0 if cfg.tie_embeddings else embed
    return embed + cfg.n_layers * layer_params(cfg) + cfg.d_model + head


def matmul_params(cfg: LlamaConfig) -> int:
    """Weights that enter a matmul each token: all projections plus the output head."""
    per_layer = layer_params(cfg) - 2 * cfg.d_model
    return cfg.n_layers * per_layer + cfg.padded_vocab * cfg.d_model  # the head computes them all


def flops_per_token(cfg: LlamaConfig, seq_len: int, causal: bool = False) -> int:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
    attn = 12 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    if causal:
        attn //= 2
    return 6 * matmul_params(cfg) + attn


# Dense peak FLOP/s by (GPU name fragment, precision), from the vendors' data sheets (no 2:4
# sparsity; fp32 is the CUDA-core rate: torch keeps TF32 off for matmuls by default).
# MFU = achieved model FLOP/s / this peak. Matched in order against
# `torch.cuda.get_device_name()`, so a fragment comes before any fragment it contains
# ("H100 PCIe" before "H100", "GB200" before "B200", "L40S" before "L4").
# logger.peak_tflops overrides it for anything missing or different (clocks, power caps).
_TENSOR_PEAKS = [  # (fragment, bf16 = fp16 TFLOP/s, fp32 TFLOP/s)
    ("H100 PCIe", 756, 51), ("H100 NVL", 835, 60), ("H100", 989, 67), ("H800", 989, 67),
    ("H200", 989, 67),  # also GH200
    ("GB200", 2500, 80), ("B200", 2250, 80),
    ("A100", 312, 19.5), ("A800", 312, 19.5),
    ("L40S", 362, 91.6), ("L4", 121, 30.3),
    ("MI300X", 1307.4, 163.4), ("MI250X", 383, 47.9),
]  # fmt: skip
PEAK_FLOPS: dict[tuple[str, str], float] = {}
for _fragment, _half, _fp32 in _TENSOR_PEAKS:
    PEAK_FLOPS.update({(_fragment, "bf16"): _half * 1e12, (_fragment, "fp16"): _half * 1e12,
                       (_fragment, "fp32"): _fp32 * 1e12})  # fmt: skip
PEAK_FLOPS[("V100", "fp16")] = 125e12  # no bf16 on Volta
PEAK_FLOPS[("V100", "fp32")] = 15.7e12


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a GPU named like `torch.cuda.get_device_name()`, or None if unknown."""
    for (fragment, prec), flops in PEAK_FLOPS.items():
        if fragment in device_name and prec == precision:
            return flops
    return None
