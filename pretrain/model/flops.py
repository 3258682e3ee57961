"""Parameter and FLOP counts as pure functions of the config: no model, no GPU needed.

`flops_per_token` follows the PaLM paper's appendix B (Chowdhery et al. 2022), the
convention of Megatron-LM and nanoGPT MFU figures:

    6 * N_matmul + 12 * n_layers * seq_len * n_heads * head_dim

N_matmul counts every weight that takes part in a matrix multiply (all projections and the
output head, tied or not) and leaves out the embedding lookup and the norm gains. In a
mixture-of-experts model it counts the weights a token goes through: the router and top_k
of each sparse block's experts, not all of them (active parameters, as MoE papers report
MFU); `num_params` counts every expert. The
second term is attention's QK^T and AV products, forward (x1) plus backward (x2), counted
over the full T x T score matrix; `causal=True` halves it to the work a causal kernel does.
"""

from __future__ import annotations

from pretrain.model.llama import LlamaConfig
from pretrain.model.moe_model import MoEConfig


def attention_params(cfg: LlamaConfig) -> int:
    """q, k, v and o projections of one block."""
    return cfg.d_model * cfg.head_size * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)


def norm_params(cfg: LlamaConfig) -> int:
    """Gains of one block: its two RMSNorms and any QK-norms."""
    qk = {"none": 0, "head": 2 * cfg.head_size,
          "full": (cfg.n_heads + cfg.n_kv_heads) * cfg.head_size}[cfg.qk_norm]  # fmt: skip
    return 2 * cfg.d_model + qk


def ffn_params(cfg: LlamaConfig, layer: int, active: bool = False) -> int:
    """Feed-forward weights of block `layer`: the SwiGLU's, or a sparse block's router,
    experts (`active`: the top_k experts a token goes through) and shared expert with its
    gate (every token goes through them)."""
    if not isinstance(cfg, MoEConfig) or not cfg.is_sparse(layer):
        return 3 * cfg.d_model * cfg.ffn_hidden  # gate, up, down
    experts = cfg.top_k if active else cfg.n_experts
    shared = 3 * cfg.d_model * cfg.shared_expert_hidden + (
        cfg.d_model if cfg.shared_expert_hidden else 0
    )
    return cfg.n_experts * cfg.d_model + experts * 3 * cfg.d_model * cfg.moe_ffn_hidden + shared


def expert_params(cfg: LlamaConfig) -> int:
    """The experts' weights (every sparse block's, all of them; 0 for a dense model)."""
    if not isinstance(cfg, MoEConfig):
        return 0
    sparse = sum(cfg.is_sparse(i) for i in range(cfg.n_layers))
    return sparse * cfg.n_experts * 3 * cfg.d_model * cfg.moe_ffn_hidden


def layer_params(cfg: LlamaConfig, layer: int = 0) -> int:
    """Parameters of Transformer block `layer`."""
    return attention_params(cfg) + ffn_params(cfg, layer) + norm_params(cfg)


def num_params(cfg: LlamaConfig) -> int:
    """Trainable parameters of the model of `cfg`, counting a tied embedding once and every
    expert."""
    embed = cfg.padded_vocab * cfg.d_model
    head = 0 if cfg.tie_embeddings else embed
    blocks = sum(layer_params(cfg, i) for i in range(cfg.n_layers))
    return embed + blocks + cfg.d_model + head


def matmul_params(cfg: LlamaConfig) -> int:
    """Weights that enter a matmul each token: all projections (top_k experts of a sparse
    block, and its router) plus the output head."""
    blocks = sum(attention_params(cfg) + ffn_params(cfg, i, active=True)
                 for i in range(cfg.n_layers))  # fmt: skip
    return blocks + cfg.padded_vocab * cfg.d_model  # the head computes them all


def flops_per_token(cfg: LlamaConfig, seq_len: int, causal: bool = False) -> int:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
    attn = 12 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_size
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
