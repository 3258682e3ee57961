"""A sparse Llama: Transformer blocks whose feed-forward is a top-k routed set of SwiGLU
experts (model/moe.py), as Qwen3-MoE, OLMoE and Mixtral build them (their QK-norm is
`LlamaConfig.qk_norm`; the export: model/moe_hf.py).

Block i is sparse when (i + 1) % moe_every == 0 (transformers' `decoder_sparse_step`),
dense otherwise. With targets, in training, `forward` returns the language-model loss plus
`aux_loss_coef` times the load-balancing loss over every sparse block (`aux_loss` keeps
the latter for the logs); in eval mode, the language-model loss alone (val_loss and
perplexity compare with dense models).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pretrain.model.expert_parallel import ExpertShard
from pretrain.model.llama import MLP, LlamaConfig, Transformer
from pretrain.model.moe import EXPERT_IMPLS, MoE, load_balancing_loss


@dataclass
class MoEConfig(LlamaConfig):
    """A Llama config with sparse feed-forward blocks (`ffn_hidden` sizes the dense ones)."""

    n_experts: int = 8
    """Experts per sparse block (transformers: num_experts)."""
    top_k: int = 2
    """Experts each token is sent to (num_experts_per_tok)."""
    moe_ffn_hidden: int = 128
    """Each expert's SwiGLU width (moe_intermediate_size)."""
    norm_topk_prob: bool = False
    """Renormalise the k routing weights to sum to 1 (Qwen3-MoE's and OLMoE's option)."""
    moe_every: int = 1
    """Block i is sparse when (i + 1) % moe_every == 0 (decoder_sparse_step); 1: all."""
    aux_loss_coef: float = 0.001
    """Weight of the load-balancing loss in the training loss (router_aux_loss_coef)."""
    router_bias_rate: float = 0.0
    """Auxiliary-loss-free balancing (DeepSeek-V3): each sparse block's router adds a
    per-expert bias to the scores it picks the top k by (not to the weights), and after every
    optimizer step the bias moves by this much, up for the experts that got fewer than the
    mean slots over the step (all ranks' tokens), down for the others (DeepSeek-V3: 0.001;
    usually with a small or zero aux_loss_coef). 0: off. The transformers families route
    without such a bias, so a model trained with it has no Hugging Face export."""
    capacity_factor: float = 0.0
    """0: no token is dropped (as the Hugging Face families compute). > 0: in training, each
    expert takes at most ceil(capacity_factor x tokens x top_k / n_experts) of a
    micro-batch's slots on a rank, first choices before second ones, earlier tokens first;
    a dropped slot adds nothing (the token keeps its residual). Evaluation never drops."""
    shared_expert_hidden: int = 0
    """Width of a shared SwiGLU expert in every sparse block, which every token goes
    through, scaled by a sigmoid of a learned projection of the token (Qwen2-MoE's
    shared_expert_intermediate_size and shared_expert_gate); 0: none."""
    experts_impl: str = "auto"
    """auto | grouped_mm | loop: how the experts run over their tokens (model/moe.py
    `Experts`): grouped_mm is torch's grouped matmul (CPU; CUDA bf16 on Hopper or later),
    loop one matmul per expert; auto takes grouped_mm where it runs."""

    def errors(self) -> list[str]:
        errs = super().errors()
        for key in ("n_experts", "top_k", "moe_ffn_hidden", "moe_every"):
            if getattr(self, key) < 1:
                errs.append(f"model.{key}={getattr(self, key)}: must be >= 1")
        if self.top_k > self.n_experts >= 1:
            errs.append(f"model.top_k={self.top_k} exceeds model.n_experts={self.n_experts}: "
                        "a token can go to at most every expert")  # fmt: skip
        for key in ("aux_loss_coef", "router_bias_rate", "capacity_factor",
                    "shared_expert_hidden"):  # fmt: skip
            if getattr(self, key) < 0:
                errs.append(f"model.{key}={getattr(self, key)}: must be >= 0 (0: off)")
        if self.experts_impl not in EXPERT_IMPLS:
            errs.append(f"model.experts_impl={self.experts_impl!r}: choose one of "
                        f"{', '.join(EXPERT_IMPLS)}")  # fmt: skip
        return errs

    def is_sparse(self, layer: int) -> bool:
        return (layer + 1) % self.moe_every == 0


def update_router_bias(model: MoETransformer, stepped: bool) -> None:
    """After an optimizer step, on every rank (a collective): each sparse block's router bias
    moves towards an even load of the step's slots, summed over all ranks (so every rank
    holds the same bias). `stepped` false (a skipped update): the slots are dropped."""
    rate = model.config.router_bias_rate
    blocks = model.moe_blocks()
    if rate <= 0 or not blocks:
        return
    slots = torch.stack([b.take_step_slots().float() for b in blocks])  # (blocks, E)
    if not stepped:
        return
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(slots)
    for block, s in zip(blocks, slots, strict=True):
        block.gate.update_bias(s, rate)


def moe_config(fields: Mapping[str, Any]) -> MoEConfig:
    """The MoEConfig of a model section (keys that are not its fields are left out)."""
    return MoEConfig(**{k: v for k, v in fields.items() if k in MoEConfig.__dataclass_fields__})


class MoETransformer(Transformer):
    """The Llama Transformer with `MoE` feed-forward blocks where `MoEConfig.is_sparse`."""

    config: MoEConfig

    def __init__(
        self, config: MoEConfig | None = None, expert: ExpertShard | None = None,
        **fields: object,
    ) -> None:  # fmt: skip
        """`expert`: this rank's place in its expert-parallel group (each sparse block then
        holds and runs its share of the experts)."""
        self._expert_shard = expert  # read by feed_forward, which the base __init__ calls
        super().__init__(config if config is not None else MoEConfig(**fields))
        self.aux_loss: torch.Tensor | None = None
        """The load-balancing loss of the last forward with targets."""
        self.sequence_group: Any = None
        """Sequence parallelism's group (set by `MoEFamily.parallelize`): its ranks hold
        slices of the same sequences, whose tokens the load-balancing loss pools."""
        self._aux: list[torch.Tensor] = []  # training forwards' aux losses since moe_metrics

    def feed_forward(self, layer: int) -> nn.Module | None:
        cfg = self.config
        if not cfg.is_sparse(layer):
            return None
        # Residual outputs scaled as the dense down_proj is (Transformer._init_weights).
        # The shared expert is the dense SwiGLU at its own width (initialised with the
        # model's projections by Transformer.__init__).
        shared = (MLP(dataclasses.replace(cfg, ffn_hidden=cfg.shared_expert_hidden))
                  if cfg.shared_expert_hidden else None)  # fmt: skip
        return MoE(cfg.d_model, cfg.moe_ffn_hidden, cfg.n_experts, cfg.top_k,
                   cfg.norm_topk_prob, cfg.init_std,
                   down_std=cfg.init_std / math.sqrt(2 * cfg.n_layers),
                   capacity_factor=cfg.capacity_factor, router_bias=cfg.router_bias_rate > 0,
                   impl=cfg.experts_impl, shard=self._expert_shard, shared=shared)  # fmt: skip

    def moe_blocks(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor:  # fmt: skip
        out = super().forward(tokens, targets, **kwargs)
        blocks = self.moe_blocks()
        if targets is None or not blocks or not self.training:
            return out  # evaluation scores the language model alone
        self.aux_loss = load_balancing_loss([b.routing for b in blocks], self.sequence_group)
        if self.training:
            self._aux.append(self.aux_loss.detach())
        return out + self.config.aux_loss_coef * self.aux_loss

    def moe_metrics(self) -> dict[str, float]:
        """Since the last call (a step's micro-batches on this rank): the mean load-balancing
        loss (`moe_aux_loss`, before its coefficient; k for an even load) and each sparse
        block's least and most loaded expert, as fractions of its routed slots
        (`moe_load_min/<block>`, `moe_load_max/<block>`; 1/n_experts each when even, and
        the max near 1 when the router collapsed onto one expert), with the extremes over
        the blocks (`moe_load_min`, `moe_load_max`); with a capacity, the mean fraction of
        slots dropped (`moe_dropped`)."""
        figures: dict[str, float] = {}
        if self._aux:
            figures["moe_aux_loss"] = float(torch.stack(self._aux).mean())
            self._aux = []
        dropped = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, MoE):
                load, drop = layer.mlp.take_load()
                figures[f"moe_load_min/{i}"] = float(load.min())
                figures[f"moe_load_max/{i}"] = float(load.max())
                dropped.append(drop)
        if self.config.capacity_factor > 0 and dropped:
            figures["moe_dropped"] = sum(dropped) / len(dropped)
        mins = [v for k, v in figures.items() if k.startswith("moe_load_min/")]
        maxs = [v for k, v in figures.items() if k.startswith("moe_load_max/")]
        if mins:
            figures["moe_load_min"], figures["moe_load_max"] = min(mins), max(maxs)
        return figures
