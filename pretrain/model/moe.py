"""A mixture-of-experts feed-forward block: a router that sends each token to its top-k
SwiGLU experts, as the Hugging Face MoE families compute it (Qwen3-MoE, OLMoE, Mixtral).

Routing (`Router`): logits and softmax in fp32 over all experts, then the k largest; ties
go to the lower expert index (a stable sort, so the same on every run and device). With
`norm_topk_prob` the k weights are renormalised to sum to 1 (Mixtral always, Qwen3-MoE
and OLMoE by their config). No token is dropped: every token reaches its k experts.

Experts (`Experts`) are stored fused, as transformers 5 holds them in memory:
`gate_up_proj` (E, 2I, H), the gate rows first, and `down_proj` (E, H, I). The tokens are
sorted by expert once; each expert then runs one matmul over its contiguous run of tokens
(the fallback here: a loop over the experts that received tokens; a grouped matmul serves
the same layout on a GPU), and the weighted outputs are added back to their tokens.

The auxiliary load-balancing loss (`load_balancing_loss`) is the Switch Transformer's, as
transformers computes it over all layers (so its coefficient carries over).

Not yet wired into a model family (issue 23): this module is the block and its numerics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """Token -> (its k routing weights, its k experts, every expert's probability)."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k}: must be in [1, n_experts={n_experts}]")
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))  # HF: mlp.gate.weight
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, H) -> weights (N, k), experts (N, k) int64, probs (N, E); computed in fp32
        (or the input's wider dtype)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        probs = F.softmax(F.linear(x.to(dtype), self.weight.to(dtype)), dim=-1)
        # A stable descending sort: equal probabilities keep the lower expert first.
        order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
        experts = order[:, : self.top_k].contiguous()  # not a view keeping all E of order
        weights = probs.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts, probs


class Experts(nn.Module):
    """E SwiGLU experts of hidden width I, fused: gate_up_proj (E, 2I, H), down_proj
    (E, H, I)."""

    def __init__(
        self, d_model: int, ffn_hidden: int, n_experts: int, std: float = 0.02,
        down_std: float | None = None,
    ) -> None:  # fmt: skip
        """Normal init, std (down_proj: down_std, default std), here in the constructor:
        under ZeRO-3's zero.Init a module's parameters are sharded once it is built."""
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * ffn_hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, ffn_hidden))
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std if down_std is None else down_std)

    @property
    def n_experts(self) -> int:
        return self.gate_up_proj.size(0)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `e` on tokens x (n, H) -> (n, H): down(silu(gate x) * up x)."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
        counts: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """x (N, H); weights, experts (N, k) from the router, counts (E,) the slots each
        expert got -> (N, H): each token's weighted sum of its experts' outputs."""
        k = experts.size(1)
        flat = experts.reshape(-1)  # (N k,): slot j is token j // k's (j % k)-th choice
        order = torch.sort(flat, stable=True).indices  # slots grouped by expert, in order
        tokens = order // k
        grouped = x[tokens]  # (N k, H): each expert's tokens contiguous
        out = torch.empty_like(grouped)
        start = 0
        for e, n in enumerate(counts.tolist()):  # the CPU fallback of a grouped matmul
            if n:
                out[start : start + n] = self.expert(e, grouped[start : start + n])
            start += n
        scale = weights.reshape(-1)[order].to(out.dtype)[:, None]
        return torch.zeros_like(x).index_add_(0, tokens, out * scale)


class MoE(nn.Module):
    """The MoE feed-forward block: (B, T, H) -> (B, T, H). The routing of its last forward
    (`routing`: every expert's probability (N, E) and the slots each expert got (E,)) stays
    for the load-balancing loss; training forwards add up `routed` for the load logs."""

    def __init__(
        self, d_model: int, ffn_hidden: int, n_experts: int, top_k: int,
        norm_topk_prob: bool = False, std: float = 0.02, down_std: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.gate = Router(d_model, n_experts, top_k, norm_topk_prob)
        self.experts = Experts(d_model, ffn_hidden, n_experts, std, down_std)
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None
        self.n_experts = n_experts
        self.routed = torch.zeros(n_experts)
        """Slots routed to each expert by training forwards since `take_load` (on the
        device of the last forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))
        weights, experts, probs = self.gate(flat)
        counts = torch.bincount(experts.reshape(-1), minlength=self.n_experts)
        self.routing = probs, counts
        if self.training:
            self.routed = self.routed.to(counts.device) + counts
        return self.experts(flat, weights, experts, counts).view_as(x)

    def take_load(self) -> torch.Tensor:
        """(E,) each expert's fraction of the slots routed since the last call (zeros when
        none were), and start counting afresh."""
        load = self.routed / self.routed.sum().clamp(min=1)
        self.routed = torch.zeros_like(self.routed)
        return load


def load_balancing_loss(routings: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The Switch Transformer's auxiliary loss over every MoE layer's routing (probs (N, E),
    slots per expert (E,)), as transformers' `load_balancing_loss_func` computes it, so a
    `router_aux_loss_coef` carries over: E x sum_e f_e x P_e, where f_e is the number of
    slots that went to expert e per token and P_e its mean probability, both pooled over
    the layers (a gradient flows through P only). k for an even load."""
    n_experts = routings[0][0].size(1)
    counts = sum(c.float() for _, c in routings)
    probs = sum(p.sum(dim=0) for p, _ in routings)
    rows = sum(p.size(0) for p, _ in routings)
    return n_experts * ((counts / rows) * (probs / rows)).sum()
