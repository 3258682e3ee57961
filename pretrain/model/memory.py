"""Memory per GPU of a training run, by ZeRO stage: pure arithmetic on the config.

Parameters are every weight, all experts of a mixture-of-experts model included; with
expert parallelism (`expert` ranks per group) a rank holds 1/expert of the experts, which
ZeRO shards over the ranks holding the same ones. The model states follow the ZeRO paper
(Rajbhandari et al. 2020, section 3.1) as DeepSpeed
implements mixed precision: the model's own weights in the compute dtype (2 bytes for
bf16/fp16), their gradients in the same dtype, and the optimizer's share, which for AdamW is
an fp32 master copy (4 bytes; absent in fp32 training at ZeRO-0 only: DeepSpeed's ZeRO
optimizers always step an fp32 partition) plus two fp32 moments (8 bytes).
ZeRO-1 divides the optimizer share by the data-parallel size, ZeRO-2 the gradients too,
ZeRO-3 the weights too. ZeRO-3 also allocates, once, a flat buffer for its gradient
partitions (so they live beside the activations) and a reduce bucket of
`deepspeed.reduce_bucket_size` elements in the compute dtype.

Activations are what autograd keeps for backward, per token of a micro-batch. Per
Transformer block, with a fused attention kernel (no T x T score matrix is kept), in bytes,
w being the compute dtype's width (h = d_model, F = ffn_hidden, kv = n_kv_heads * head_dim):

    each of the 2 RMSNorms   4h (its fp32 input) + w*h (normed) + w*h (gained: next input)
    q, k, v after RoPE       w * (h + 2 kv)
    attention output         w * h (the kernel's output, which o_proj reads as a view)
    SwiGLU                   w * 4F (gate, up, silu(gate), their product)
    or a sparse block's      4E + k * (w * (2h + 4I) + 16) (+ 4h under bf16): router
      experts (MoE)          probabilities, per slot the expert's input, SwiGLU and weighted
                             output (`ffn_bytes_per_token`; I = moe_ffn_hidden, k = top_k),
                             and a shared expert's SwiGLU and gate

(a tiled MLP, model.mlp_chunk_tokens, keeps no SwiGLU intermediates without activation
checkpointing: it holds one piece's, w * 4F * chunk, while that piece is recomputed), which
is Korthikanti et al. 2022's count redone for RMSNorm, GQA and SwiGLU, and which
tests/model/test_memory.py checks against what a real forward pass leaves allocated. The
final norm keeps 4h + 2wh. With activation checkpointing `full` a block keeps only its
input (w*h); `selective` keeps its input and the outputs of its matmuls and attention
kernel: w * (3h + 2kv + 2F + h) and the kernel's fp32 log-sum-exp (4 per head). Under
either, one block's full set lives again while it is recomputed.

The loss (`loss_bytes`), with V the padded vocabulary: `model.loss_impl=full` keeps fp32
log-probabilities (4 bytes per vocabulary entry per token), and its backward holds them with
their fp32 gradient and the logits' fp32 gradient: 12 bytes per entry per token at the start
of backward. `chunked` keeps the hidden states' gradient (w*h per token) and peaks
during its forward with one chunk's fp32 logits (plus their compute-dtype copy under bf16)
and the head's weight gradient: w*V*h when one chunk holds the micro-batch, else its fp32
accumulator (4*V*h) and, under bf16, each chunk's product beside it (w*V*h).

Sequence parallelism (Ulysses, `sequence` ranks per sequence) gives each rank seq_len /
sequence tokens of every micro-batch: all of the above is per token, so it divides (the
exchanged q, k, v and attention output are as large as the local ones), and per block it
adds the attention output exchanged back, which o_proj keeps beside the kernel's (w*h), and,
with fewer key/value heads than ranks, their repeated copies (w * 2 * head_dim * (sequence
- n_kv_heads)); ZeRO shards over every rank, data and sequence.

The peak is the states plus the larger of activations and gradients: activations peak when
backward starts, before any gradient exists; gradients are complete at its end, when the
activations are gone. With gradient accumulation the gradients of earlier micro-batches
are there throughout, so both count (under ZeRO-3 they are states anyway).

Checked on one H100 with the full loss (bf16, seq 2048; docs/performance.md): the states
within 0.5%; the peak within 0.5% for llama_1b at micro-batch 2 and 4 and llama_125m at 8
and 16, 6% under for llama_1b at micro-batch 1, 3% over with full activation checkpointing;
within 1.2% on five held-out configurations (seq 4096, gradient accumulation, the 125M
model); ZeRO-3 0.25% under (it was 10% under before its buffer and bucket were counted).
On CPU (`tools/bench_train.py` measures the allocations there), for a 7.1M model on one
rank: ZeRO-0 and ZeRO-3 within 1% in fp32 and bf16. Not modelled: ZeRO-1/2's reduce
buckets, which DeepSpeed allocates when backward starts (`reduce_bucket_size` elements,
twice with `overlap_comm`): on CPU they add exactly that to the peak, yet at 1B on the H100
no such excess showed, so they wait for a GPU measurement; ZeRO-3's gathered parameters on
several ranks (a block, and the prefetch); allocator fragmentation. Leave 10-20% headroom.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.model.flops import expert_params, num_params
from pretrain.model.llama import LlamaConfig
from pretrain.model.moe_model import MoEConfig

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# What torch.cuda reports as total memory (GiB), by the GPU names of flops.PEAK_FLOPS.
GPU_MEMORY_GIB = {"H100": 79.2, "H100 PCIe": 79.2, "H200": 139.8, "A100": 79.2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of one training configuration."""

    weights: int
    grads: int
    optimizer: int
    """fp32 master weights (mixed precision only) and AdamW's two moments."""
    activations: int
    """Kept for backward by one micro-batch, at the start of its backward."""
    grad_accum: int = 1
    """Micro-batches per step: above 1, gradients and activations coexist."""
    buffers: int = 0
    """ZeRO-3's gradient reduce bucket (`deepspeed.reduce_bucket_size` elements), allocated
    once and kept."""
    grads_kept: bool = False
    """ZeRO-3 keeps its gradient partitions in one buffer allocated once (on the GPU unless
    the optimizer is offloaded), so they count in the states, beside the activations."""

    @property
    def states(self) -> int:
        """What persists between steps; gradients are freed once the optimizer has stepped,
        except ZeRO-3's partitions."""
        return self.weights + self.optimizer + self.buffers + (self.grads if self.grads_kept else 0)

    @property
    def total(self) -> int:
        """The peak (see the module docstring)."""
        if self.grads_kept:
            return self.states + self.activations
        if self.grad_accum > 1:
            return self.states + self.grads + self.activations
        return self.states + max(self.grads, self.activations)


def block_bytes_per_token(
    cfg: LlamaConfig, precision: str, policy: str = "none", layer: int = 0
) -> int:  # fmt: skip
    """Bytes Transformer block `layer` keeps for backward per token (module docstring). A
    tiled MLP (model.mlp_chunk_tokens) keeps none of its own without activation
    checkpointing; under it, the block's policy decides (selective keeps the MLP's matmul
    outputs still)."""
    w, h, kv = BYTES[precision], cfg.d_model, cfg.n_kv_heads * cfg.head_size
    ffn = ffn_bytes_per_token(cfg, precision, policy, layer)
    if policy == "full":
        return w * h
    if policy == "selective":  # input; q, k, v, o; attention out and its lse; the ffn's
        return w * h + w * (2 * h + 2 * kv) + w * h + 4 * cfg.n_heads + ffn
    norm = 4 * h + 2 * w * h
    return 2 * norm + w * (h + 2 * kv) + w * h + ffn


def ffn_bytes_per_token(cfg: LlamaConfig, precision: str, policy: str, layer: int) -> int:
    """What block `layer`'s feed-forward keeps per token, without checkpointing or under
    `selective` (its matmul outputs). A SwiGLU: 4F (2F + h selective; 0 tiled). A sparse
    block (k = top_k, I = moe_ffn_hidden, E = n_experts): the router's fp32 probabilities
    (4E) and, under bf16, the fp32 copy of its input (4h); per slot, the expert's gathered
    input and weighted output (2wh), its SwiGLU (4wI) and two int64 indices (16); selective:
    the router logits and, per slot, the expert's matmul outputs, w(2I + h). A shared expert
    (S = shared_expert_hidden) adds a SwiGLU's 4wS (0 tiled), its output beside the gate
    (wh) and the gate's logit and sigmoid (2w); selective: w(2S + h) and the logit (w)."""
    w, h = BYTES[precision], cfg.d_model
    if not isinstance(cfg, MoEConfig) or not cfg.is_sparse(layer):
        if policy == "selective":
            return w * (2 * cfg.ffn_hidden + h)
        return 0 if cfg.mlp_chunk_tokens > 0 else w * 4 * cfg.ffn_hidden
    k, i, e, sh = cfg.top_k, cfg.moe_ffn_hidden, cfg.n_experts, cfg.shared_expert_hidden
    if policy == "selective":
        shared = w * (2 * sh + h) + w if sh else 0
        return 4 * e + k * w * (2 * i + h) + shared
    swiglu = 0 if cfg.mlp_chunk_tokens > 0 else w * 4 * sh
    shared = swiglu + w * h + 2 * w if sh else 0
    return 4 * e + (4 * h if w < 4 else 0) + k * (w * (2 * h + 4 * i) + 16) + shared


def sequence_bytes_per_token(cfg: LlamaConfig, precision: str, sequence: int) -> int:
    """What sequence parallelism adds per token of a rank's slice (module docstring)."""
    if sequence == 1:
        return 0
    repeated = 2 * cfg.head_size * max(sequence - cfg.n_kv_heads, 0)
    return cfg.n_layers * BYTES[precision] * (cfg.d_model + repeated)


def tiled_mlp_bytes(cfg: LlamaConfig, precision: str, tokens: int) -> int:
    """What a tiled MLP holds at once, for a micro-batch of `tokens`: one piece's four
    ffn_hidden-wide intermediates, while it is recomputed (0 untiled)."""
    if cfg.mlp_chunk_tokens <= 0:
        return 0
    return BYTES[precision] * 4 * cfg.ffn_hidden * min(cfg.mlp_chunk_tokens, tokens)


def activation_bytes_per_token(
    cfg: LlamaConfig, precision: str, activation_checkpointing: str = "none"
) -> int:
    """Bytes the blocks and the final norm keep per token of a micro-batch, plus one block
    recomputed under activation checkpointing; the loss is `loss_bytes`."""
    w, h = BYTES[precision], cfg.d_model
    policy = activation_checkpointing
    layers = range(cfg.n_layers)
    recompute = 0 if policy == "none" else max(block_bytes_per_token(cfg, precision, "none", i)
                                               for i in layers)  # fmt: skip
    final_norm = 4 * h + 2 * w * h
    blocks = sum(block_bytes_per_token(cfg, precision, policy, i) for i in layers)
    return blocks + recompute + final_norm


def loss_bytes(
    cfg: LlamaConfig, precision: str, tokens: int, loss_impl: str = "chunked",
    chunk_tokens: int = 2048,
) -> int:  # fmt: skip
    """Peak bytes of the output head's loss for a micro-batch of `tokens` (module docstring)."""
    w, h, V = BYTES[precision], cfg.d_model, cfg.padded_vocab
    if loss_impl == "full":
        return 12 * V * tokens
    chunk = min(chunk_tokens, tokens)
    logits = (4 + (w if w < 4 else 0)) * chunk * V  # fp32 (+ the compute-dtype product)
    # dL/dW: one product of the compute dtype, or an fp32 accumulator (+ each chunk's product)
    head = w * V * h if tokens <= chunk_tokens else 4 * V * h + (w * V * h if w < 4 else 0)
    return w * h * tokens + head + logits


def estimate_memory(
    cfg: LlamaConfig,
    *,
    seq_len: int,
    micro_batch_size: int,
    dp: int,
    zero_stage: int,
    precision: str = "bf16",
    activation_checkpointing: str = "none",
    offload_optimizer: bool = False,
    grad_accum: int = 1,
    reduce_bucket_size: int = 500_000_000,
    sequence: int = 1,
    expert: int = 1,
) -> MemoryEstimate:
    """Bytes per GPU for `dp` data-parallel ranks at ZeRO `zero_stage` (0-3);
    `reduce_bucket_size`: `deepspeed.reduce_bucket_size` (ZeRO-3 allocates that bucket).
    `sequence`: parallel.sequence, ranks that split each sequence (Ulysses): each holds
    seq_len / sequence tokens of the micro-batch's activations, and ZeRO shards over all
    dp x sequence ranks. `expert`: parallel.expert, ranks that split the experts: each holds
    1 / expert of them, sharded over dp / expert ranks (activations are counted as without
    it: a rank runs as many expert slots as it sends when the router is balanced; an
    unbalanced one sends some rank more, which no capacity bounds by default)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage}: choose 0, 1, 2 or 3")
    # Dense weights are held by every rank and sharded over all of them; with expert
    # parallelism each rank holds 1/expert of the experts, sharded over the ranks holding
    # the same ones (all ranks / expert): held / shards weighs each part per rank.
    n_expert = expert_params(cfg)
    n_dense = num_params(cfg) - n_expert
    ranks = dp * sequence  # ZeRO partitions over every rank

    def per_rank(sharded: bool) -> float:
        if not sharded:
            return n_dense + n_expert / expert
        return n_dense / ranks + n_expert / expert / (ranks // expert)

    width = BYTES[precision]
    # DeepSpeed's ZeRO optimizers step an fp32 partition of the weights, in fp32 training too.
    master = 4 if precision != "fp32" or zero_stage >= 1 else 0
    weights = int(width * per_rank(zero_stage >= 3))
    grads = int(width * per_rank(zero_stage >= 2))
    optimizer = int((master + 8) * per_rank(zero_stage >= 1))
    if offload_optimizer:
        optimizer = 0  # master weights and moments live in host memory
    tokens = seq_len * micro_batch_size // sequence  # this rank's share of the micro-batch
    activations = tokens * activation_bytes_per_token(cfg, precision, activation_checkpointing)
    activations += tokens * sequence_bytes_per_token(cfg, precision, sequence)
    activations += tiled_mlp_bytes(cfg, precision, tokens)
    activations += loss_bytes(cfg, precision, tokens, cfg.loss_impl, cfg.loss_chunk_tokens)
    zero3 = zero_stage == 3
    buffers = width * reduce_bucket_size if zero3 else 0
    kept = zero3 and not offload_optimizer
    return MemoryEstimate(weights, grads, optimizer, activations, grad_accum, buffers, kept)
