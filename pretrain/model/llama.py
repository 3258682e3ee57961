"""A Llama-style decoder-only Transformer, in the order `forward` uses it.

RMSNorm, rotary position embeddings (RoPE), SwiGLU feed-forward and grouped-query
attention (GQA), with optionally tied input/output embeddings. Module and parameter names
follow transformers' `LlamaForCausalLM` (minus its leading `model.`), and RoPE uses the same
half-split layout, so export is a rename and the logits match exactly.

The model knows nothing about parallelism: DeepSpeed shards it from outside (ZeRO-3 wraps
construction in `deepspeed.zero.Init`, which also gathers parameters around `Module.apply`,
so the initialisation below is correct on sharded parameters too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from pretrain.model.attention import ATTN_IMPLS, cached_attention, causal_attention
from pretrain.model.documents import POSITION_MODES, DocumentLayout, positions_in_documents
from pretrain.model.loss import LOSS_IMPLS, linear_cross_entropy


@dataclass
class LlamaConfig:
    """Shape and numerics of the Transformer. Presets live in `conf/model/*.yaml`."""

    n_layers: int = 2
    """Number of Transformer blocks."""
    d_model: int = 64
    """Width of the residual stream."""
    n_heads: int = 4
    """Number of query heads."""
    head_dim: int | None = None
    """Width of each attention head; None: d_model / n_heads (`head_size` is the width in
    use). Qwen3-style models set it apart (e.g. 128 with d_model 2048 and 32 heads: q_proj
    is then wider than d_model)."""
    n_kv_heads: int | None = None
    """Number of key/value heads (GQA); None means n_heads (plain multi-head attention)."""
    ffn_hidden: int | None = None
    """SwiGLU hidden width; None derives Llama's rule: 8/3 * d_model rounded up to 256."""
    vocab_size: int = 256
    """Token ids the model reads and predicts: at least the tokenizer's vocabulary."""
    vocab_multiple: int = 128
    """Pad the embedding and output tables to a multiple of this many rows (`padded_vocab`),
    so the largest matmul, the output head, has tensor-core-aligned dimensions (Megatron-LM's
    make-vocab-size-divisible-by). The extra rows are never a target; training pushes their
    logits down, and `forward` without targets returns only the first vocab_size. 1: no
    padding."""
    max_seq_len: int = 2048
    """Longest sequence the model is meant for (exported as max_position_embeddings)."""
    qk_norm: str = "none"
    """RMSNorm on the queries and keys before RoPE (QK-norm, for stable attention logits):
    none | head: over each head's head_dim, shared by the heads (Qwen3, Qwen3-MoE) | full:
    over all heads of the q (and of the k) projection at once (OLMo 2, OLMoE)."""
    rope_theta: float = 10000.0
    """RoPE base frequency (Llama 2: 1e4, Llama 3: 5e5)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon (Llama 2/3 use 1e-5)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection (saves vocab * d_model params)."""
    dropout: float = 0.0
    """Dropout on attention probabilities and residual branches; 0 as in modern pretraining."""
    attn_impl: str = "auto"
    """auto | flash | sdpa | eager (see pretrain.model.attention)."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections get init_std / sqrt(2 * n_layers)."""
    loss_impl: str = "chunked"
    """chunked: the output head and cross-entropy run over loss_chunk_tokens tokens at a time,
    so the whole micro-batch's fp32 logits never exist (pretrain/model/loss.py) | full: the
    plain logits-then-cross-entropy."""
    mlp_chunk_tokens: int = 0
    """Tiled MLP for long sequences: the SwiGLU runs over this many tokens at a time, each
    piece recomputed in backward (one more MLP forward), so its 4 x ffn_hidden-wide
    intermediates exist for one piece only instead of being kept for every token. 0: off."""
    document_mask: bool = False
    """Attend only within each document of a packed window (documents end with EOS, as the
    shards hold them): the training loop passes each window's document ids
    (model/documents.py). False: a window is one sequence, documents attend to each other."""
    document_positions: str = "continue"
    """continue: RoPE positions run through the window | reset: they restart at each
    document (with document_mask, a document's predictions are then those it gets alone,
    but for one cut by the window's start: model/documents.py)."""
    loss_chunk_tokens: int = 2048
    """Tokens per chunk of the chunked loss: its transient memory is about 6 bytes x this x
    padded_vocab (1.6 GB at 128K entries), and larger chunks make larger, faster matmuls."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = 256 * math.ceil(int(8 * self.d_model / 3) / 256)

    @property
    def head_size(self) -> int:
        """The width of each attention head: head_dim, or d_model / n_heads. (Derived here,
        not stored in head_dim, so `dataclasses.replace` with another d_model or n_heads
        derives it again.)"""
        return self.head_dim if self.head_dim is not None else self.d_model // max(self.n_heads, 1)

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and output tables: vocab_size rounded up to vocab_multiple."""
        return pad_vocab(self.vocab_size, self.vocab_multiple)

    def errors(self) -> list[str]:
        """Every inconsistency in this config, as 'model.<key>: what is wrong, what to do'."""
        errs = []
        for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size",
                    "vocab_multiple", "loss_chunk_tokens"):  # fmt: skip
            if getattr(self, key) < 1:
                errs.append(f"model.{key}={getattr(self, key)}: must be >= 1")
        if self.n_heads >= 1 and self.head_dim is None and self.d_model % self.n_heads:
            errs.append(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"
                ": pick n_heads dividing d_model, or set model.head_dim"
            )
        elif self.n_heads >= 1 and (self.head_size < 2 or self.head_size % 2):
            errs.append(f"model.head_dim={self.head_size} (default d_model / n_heads) must be "
                        "even and >= 2 for RoPE")  # fmt: skip
        if self.qk_norm not in QK_NORMS:
            errs.append(f"model.qk_norm={self.qk_norm!r}: choose one of {', '.join(QK_NORMS)}")
        if self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads:
            errs.append(
                f"model.n_heads={self.n_heads} is not a multiple of "
                f"model.n_kv_heads={self.n_kv_heads}: pick n_kv_heads dividing n_heads"
            )
        if not 0.0 <= self.dropout < 1.0:
            errs.append(f"model.dropout={self.dropout}: must be in [0, 1)")
        if self.attn_impl not in ATTN_IMPLS:
            errs.append(f"model.attn_impl={self.attn_impl!r}: choose one of {ATTN_IMPLS}")
        if self.loss_impl not in LOSS_IMPLS:
            errs.append(f"model.loss_impl={self.loss_impl!r}: choose one of {LOSS_IMPLS}")
        if self.mlp_chunk_tokens < 0:
            errs.append(f"model.mlp_chunk_tokens={self.mlp_chunk_tokens}: must be >= 0 (0: off)")
        if self.document_positions not in POSITION_MODES:
            errs.append(f"model.document_positions={self.document_positions!r}: choose one of "
                        f"{', '.join(POSITION_MODES)}")  # fmt: skip
        return errs


QK_NORMS = ("none", "head", "full")


def pad_vocab(vocab_size: int, multiple: int) -> int:
    """vocab_size rounded up to a multiple of `multiple` (at least 1)."""
    multiple = max(multiple, 1)
    return -(-vocab_size // multiple) * multiple


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 like HF Llama."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables at `positions` (T,) or (B, T): (..., head_dim), in the half-split
    layout of HF Llama."""
    device = positions.device
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: (B, T, H, D) by position. cos, sin: (T, D), or (B, T, D) per row."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]  # (T, 1, D) or (B, T, 1, D): over heads
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


@dataclass
class KVCache:
    """Keys and values of every layer during generation, so each new token costs one
    position: k[layer], v[layer] are (B, S_max, H_kv, D), filled up to `length`.

    `real` (B, S_max) marks real tokens; left-padded prompts of different lengths leave
    padding slots that no query attends to.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    real: torch.Tensor
    length: int = 0

    @classmethod
    def empty(
        cls, cfg: LlamaConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_size)
        zeros = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        return cls(zeros, [z.clone() for z in zeros],
                   torch.ones(batch, max_len, dtype=torch.bool, device=device))  # fmt: skip

    def store(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions' k, v (B, T, H_kv, D); return all so far (B, S, H_kv, D)."""
        end = self.length + k.size(1)
        self.k[layer][:, self.length : end] = k
        self.v[layer][:, self.length : end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def mask(self, T: int) -> torch.Tensor:
        """(B, 1, T, S) bool: new query i sees cache slots up to its own that hold real tokens
        (and always itself, so a padding query never has every key masked)."""
        S = self.length + T
        slots = torch.arange(S, device=self.real.device)
        queries = self.length + torch.arange(T, device=self.real.device)
        causal = slots[None, :] <= queries[:, None]  # (T, S)
        own = slots[None, :] == queries[:, None]
        return (causal & (self.real[:, None, :S] | own))[:, None]  # (B, 1, T, S)

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows `rows` (beam search: each surviving beam's parent)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.real = self.real.index_select(0, rows)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, and QK-norm as `LlamaConfig.qk_norm` says
    (`q_norm`, `k_norm`: transformers' names in Qwen3 and OLMoE)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        self.attn_impl, self.dropout = cfg.attn_impl, cfg.dropout
        self.attend = causal_attention  # sequence parallelism wraps it (model/sequence.py)
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_size, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_size, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_size, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_size, cfg.d_model, bias=False)
        self.o_proj.is_residual_out = True
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            q_width, k_width = (
                (cfg.head_size, cfg.head_size)
                if cfg.qk_norm == "head"
                else (cfg.n_heads * cfg.head_size, cfg.n_kv_heads * cfg.head_size)
            )
            self.q_norm = RMSNorm(q_width, cfg.norm_eps)
            self.k_norm = RMSNorm(k_width, cfg.norm_eps)

    def _qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected (and QK-normed) queries (B, T, H, D) and keys (B, T, H_kv, D)."""
        B, T, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        cache: KVCache | None = None, layer: int = 0, documents: DocumentLayout | None = None,
    ) -> torch.Tensor:  # fmt: skip
        B, T, _ = x.shape
        q, k = self._qk(x)  # (B, T, H, D), (B, T, H_kv, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # generation: attend over everything cached so far
            k, v = cache.store(layer, k, v)  # (B, S, H_kv, D)
            y = cached_attention(q, k, v, cache.mask(T))  # (B, T, H, D)
        else:
            dropout_p = self.dropout if self.training else 0.0
            y = self.attend(q, k, v, self.attn_impl, dropout_p, documents)  # (B, T, H, D)
        return self.o_proj(y.reshape(B, T, -1))  # (B, T, d_model)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)
        self.down_proj.is_residual_out = True
        self.chunk_tokens = cfg.mlp_chunk_tokens

    def _swiglu(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.chunk_tokens
        if n <= 0 or not torch.is_grad_enabled() or x.shape[:-1].numel() <= n:
            return self._swiglu(x)
        # Tiled (model.mlp_chunk_tokens): each piece's intermediates are dropped after its
        # forward and recomputed in backward, which keeps only the input (kept anyway).
        pieces = x.reshape(-1, x.size(-1)).split(n)
        out = [torch.utils.checkpoint.checkpoint(self._swiglu, p, use_reentrant=False)
               for p in pieces]  # fmt: skip
        return torch.cat(out).view(*x.shape[:-1], -1)


class LMHead(nn.Linear):
    """The output projection; given targets, it returns the loss instead of the logits.

    The loss is computed inside this module's forward so that ZeRO-3, which gathers a
    module's parameters around its forward, has the (possibly tied) weight whole there.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__(cfg.d_model, cfg.padded_vocab, bias=False)
        self.loss_impl, self.chunk_tokens = cfg.loss_impl, cfg.loss_chunk_tokens
        self.compile_loss = False  # trainer.compile sets it: fuse the chunked loss's pointwise

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return F.linear(x, self.weight)  # (B, T, padded_vocab)
        return linear_cross_entropy(x, self.weight, targets, self.loss_impl, self.chunk_tokens,
                                    compiled=self.compile_loss)  # fmt: skip


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x)). `mlp`: the
    feed-forward module (default: the SwiGLU `MLP`; a mixture-of-experts family passes its
    own, model/moe_model.py)."""

    def __init__(self, cfg: LlamaConfig, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = mlp if mlp is not None else MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        cache: KVCache | None = None, layer: int = 0, documents: DocumentLayout | None = None,
    ) -> torch.Tensor:  # fmt: skip
        attn = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, documents)
        x = x + self.resid_dropout(attn)
        return x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    """Llama-style causal LM. `forward(tokens)` gives logits; with `targets`, the mean loss.

    Built either from a `LlamaConfig` or, as `hydra.utils.instantiate` does, from its fields.
    """

    def __init__(self, config: LlamaConfig | None = None, **fields: object) -> None:
        super().__init__()
        self.config = cfg = config if config is not None else LlamaConfig(**fields)
        errs = cfg.errors()
        if errs:
            raise ValueError("invalid model config:\n  " + "\n  ".join(errs))
        self.embed_tokens = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, self.feed_forward(i)) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = LMHead(cfg)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Module by module (the projections and tables; what `_init_weights` sets), in the
        # order `self.apply` would visit them: under ZeRO-3's zero.Init each `apply` gathers
        # the module's parameters, and a module whose parameters another family initialises
        # itself (a mixture-of-experts block's experts, sharded over a group of their own)
        # is never gathered here.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.apply(self._init_weights)

    def feed_forward(self, layer: int) -> nn.Module | None:
        """Block `layer`'s feed-forward module; None: the SwiGLU MLP (a subclass chooses)."""
        return None

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the model is meant for (positions beyond are refused)."""
        return self.config.max_seq_len

    def empty_cache(
        self, rows: int, length: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        """A KV cache for `rows` sequences of up to `length` positions (`forward(cache=)`)."""
        return KVCache.empty(self.config, rows, length, device, dtype)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_out", False):
                # GPT-2 / Megatron: keep the residual stream's variance independent of depth.
                std = std / math.sqrt(2 * self.config.n_layers)
            if module is not self.lm_head or not self.config.tie_embeddings:
                nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
        cache: KVCache | None = None, positions: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """tokens: (B, T) int. Returns logits (B, T, vocab_size), or the mean cross-entropy
        against targets (B, T) (over all padded_vocab entries; -100 marks a target to skip).

        `positions` (T,) or (B, T), default 0..T-1: each token's position. Generation
        passes a `cache` (the new tokens attend to everything cached, and are added to it)
        and per-row positions, which differ when prompts are left-padded; a rank of a
        sequence-parallel group passes its slice's.

        `documents` (B, T_attended) int, the packed documents' ids (model/documents.py):
        with `document_mask`, attention stays within each (T_attended: the whole sequence,
        which a sequence-parallel rank's attention sees too); with `document_positions=
        reset` and no `positions`, positions restart at each document.
        """
        T = tokens.size(1)
        x = self.embed_dropout(self.embed_tokens(tokens))  # (B, T, d_model)
        if (
            positions is None
            and documents is not None
            and self.config.document_positions == "reset"
        ):
            positions = positions_in_documents(documents)
        elif positions is None:
            positions = torch.arange(T, device=x.device)
        cos, sin = rope_cos_sin(positions, self.config.head_size, self.config.rope_theta)
        if documents is not None and cache is not None:
            raise ValueError("documents= is for training windows; generation (cache=) attends "
                             "over its cache as given")  # fmt: skip
        masked = (
            DocumentLayout(documents)
            if self.config.document_mask and documents is not None
            else None
        )
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, masked)
        if cache is not None:
            cache.length += T
        if targets is not None:
            return self.lm_head(self.norm(x), targets)  # the mean loss
        logits = self.lm_head(self.norm(x))  # (B, T, padded_vocab)
        return logits[..., : self.config.vocab_size]  # (B, T, V): only ids a tokenizer has
