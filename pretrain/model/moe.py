"""A mixture-of-experts feed-forward block: a router that sends each token to its top-k
SwiGLU experts, as the Hugging Face MoE families compute it (Qwen3-MoE, OLMoE, Mixtral;
Qwen2-MoE with a shared expert too).

Routing (`Router`): logits and softmax in fp32 over all experts, then the k largest; ties
go to the lower expert index (a stable sort, so the same on every run and device). With
`norm_topk_prob` the k weights are renormalised to sum to 1 (Mixtral always, Qwen3-MoE
and OLMoE by their config). By default no token is dropped: every token reaches its k
experts. Options: a capacity per expert in training (`drop_over_capacity`), and
DeepSeek-V3's auxiliary-loss-free balancing (a per-expert bias that chooses, not weighs).

Experts (`Experts`) are stored fused, as transformers 5 holds them in memory:
`gate_up_proj` (E, 2I, H), the gate rows first, and `down_proj` (E, H, I). The tokens are
sorted by expert once; then either torch's grouped matmul runs every expert over its
contiguous run of tokens in one kernel per projection (no Python loop), or,
where that kernel does not run, one matmul per expert that got tokens. The weighted
outputs are added back to their tokens.

The auxiliary load-balancing loss (`load_balancing_loss`) is the Switch Transformer's, as
transformers computes it over all layers (so its coefficient carries over).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrain.model.expert_parallel import ExpertExchange, ExpertShard


def fp32_zeros(*shape: int) -> torch.Tensor:
    """fp32 zeros also under zero.Init (which casts the float tensors made under it)."""
    return torch.zeros(*shape, dtype=torch.long).float()


class Router(nn.Module):
    """Token -> (its k routing weights, its k experts, every expert's probability).

    With `bias` (auxiliary-loss-free balancing, DeepSeek-V3), a per-expert bias (buffer
    `bias`) is added to the probabilities to choose the k experts, not to their weights;
    `update_bias` moves it towards an even load after each optimizer step."""

    def __init__(
        self, d_model: int, n_experts: int, top_k: int, norm_topk_prob: bool,
        bias: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k}: must be in [1, n_experts={n_experts}]")
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))  # HF: mlp.gate.weight
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        # fp32 whatever the model's dtype (its steps are small): made from an integer tensor,
        # since ZeRO-3's zero.Init casts every float tensor made while it builds the model,
        # and DeepSpeed's mixed precision casts parameters, not buffers. None: no bias, and
        # no entry in the state dict.
        self.bias: torch.Tensor | None
        self.register_buffer("bias", fp32_zeros(n_experts) if bias else None)
        nn.init.normal_(self.weight, std=0.02)

    @torch.no_grad()
    def update_bias(self, slots: torch.Tensor, rate: float) -> None:
        """One step of DeepSeek-V3's update: each expert's bias moves by `rate`, up when it got
        fewer than the mean of `slots` (E,), the slots routed to each over a step, down when
        more."""
        assert self.bias is not None
        slots = slots.to(self.bias.device, torch.float32)
        self.bias += rate * torch.sign(slots.mean() - slots).to(self.bias.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, H) -> weights (N, k), experts (N, k) int64, probs (N, E); computed in fp32
        (or the input's wider dtype)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        probs = F.softmax(F.linear(x.to(dtype), self.weight.to(dtype)), dim=-1)
        scores = probs if self.bias is None else probs + self.bias.to(dtype)
        # A stable descending sort: equal scores keep the lower expert first.
        order = torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices
        experts = order[:, : self.top_k].contiguous()  # not a view keeping all E of order
        weights = probs.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts, probs


EXPERT_IMPLS = ("auto", "grouped_mm", "loop")
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_fits(x: torch.Tensor, *widths: int) -> bool:
    """Whether torch's grouped matmul (`torch._grouped_mm`: one kernel over every expert's
    run of tokens) takes x's device and dtype and these inner widths: on CPU fp32, bf16 or
    fp16, on CUDA bf16 on Hopper (sm90) or later; each width a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in GROUPED_MM_DTYPES:
        return False
    if x.is_cuda and (x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)
                      < (9, 0)):  # fmt: skip
        return False
    return x.device.type in ("cpu", "cuda") and all(w * x.element_size() % 16 == 0
                                                    for w in widths)  # fmt: skip


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert on tokens x (n, H): down(silu(gate x) * up x), gate_up (2I, H) with the
    gate rows first, down (H, I)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


class Experts(nn.Module):
    """E SwiGLU experts of hidden width I, fused: gate_up_proj (E, 2I, H), down_proj
    (E, H, I). `impl`: grouped_mm (one kernel per projection over all experts, no loop and
    no host sync of its own; a capacity and expert parallelism's exchange sync once each),
    loop (one matmul per expert that got tokens, after a host sync for the counts: the
    fallback) or auto (grouped_mm where `grouped_mm_fits`, else loop)."""

    def __init__(
        self, d_model: int, ffn_hidden: int, n_experts: int, std: float = 0.02,
        down_std: float | None = None, impl: str = "auto", shard: ExpertShard | None = None,
    ) -> None:  # fmt: skip
        """Normal init, std (down_proj: down_std, default std), here in the constructor:
        under ZeRO-3's zero.Init a module's parameters are sharded once it is built. With
        `shard` (expert parallelism) it holds only its group rank's experts, initialised as
        those experts of the whole set would be (the same draws as one rank's)."""
        super().__init__()
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"model.experts_impl={impl!r}: choose one of {EXPERT_IMPLS}")
        self.impl, self.shard = impl, shard
        local = range(n_experts) if shard is None else shard.local_experts(n_experts)
        gate_up = torch.empty(n_experts, 2 * ffn_hidden, d_model)
        down = torch.empty(n_experts, d_model, ffn_hidden)
        nn.init.normal_(gate_up, std=std)
        nn.init.normal_(down, std=std if down_std is None else down_std)
        self.gate_up_proj = nn.Parameter(gate_up[local.start : local.stop].clone())
        self.down_proj = nn.Parameter(down[local.start : local.stop].clone())
        for p in (self.gate_up_proj, self.down_proj):
            for key, value in ({} if shard is None else shard.param_attrs).items():
                setattr(p, key, value)

    @property
    def n_experts(self) -> int:
        """The experts this module holds (with a shard, its rank's share)."""
        return self.gate_up_proj.size(0)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `e` on tokens x (n, H) -> (n, H): down(silu(gate x) * up x)."""
        return swiglu(x, self.gate_up_proj[e], self.down_proj[e])

    def _grouped(self, grouped: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every expert on its run of `grouped` (the runs in expert order, counts (E,) long)."""
        impl = self.impl
        if impl == "auto":
            fits = grouped_mm_fits(grouped, grouped.size(1), self.down_proj.size(2))
            impl = "grouped_mm" if fits else "loop"
        if impl == "grouped_mm":
            offs = counts.cumsum(0).to(torch.int32)  # each run's end
            gate, up = torch._grouped_mm(grouped, self.gate_up_proj.transpose(1, 2),
                                         offs=offs).chunk(2, dim=-1)  # fmt: skip
            return torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offs)
        sizes = counts.tolist()
        if not any(sizes):  # no rows here (expert parallelism): still a gradient, of zeros,
            return self.expert(0, grouped)  # so every rank reduces the same parameters
        # One view per expert from unbind, whose backward stacks their gradients once
        # (indexing each expert apart made a whole-tensor gradient per expert).
        gate_ups, downs = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        pieces = [swiglu(rows, gate_ups[e], downs[e])
                  for e, rows in enumerate(grouped.split(sizes)) if sizes[e]]  # fmt: skip
        return torch.cat(pieces)

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
        counts: torch.Tensor, kept: int | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """x (N, H); weights, experts (N, k) from the router, counts (E,) the slots each
        expert takes -> (N, H): each token's weighted sum of its experts' outputs. A slot
        whose expert is E was dropped (`drop_over_capacity`): `kept` slots are left."""
        k = experts.size(1)
        flat = experts.reshape(-1)  # (N k,): slot j is token j // k's (j % k)-th choice
        order = torch.sort(flat, stable=True).indices  # slots grouped by expert, in order
        if kept is not None:
            order = order[:kept]  # the dropped slots sort last
        tokens = order // k
        rows = x[tokens]  # each expert's tokens contiguous
        if self.shard is None:
            out = self._grouped(rows, counts)
        else:  # to the ranks that hold the experts, and back
            exchange = ExpertExchange(self.shard)
            out = exchange.combine(self._grouped(*exchange.dispatch(rows, counts)))
        scale = weights.reshape(-1)[order].to(out.dtype)[:, None]
        return torch.zeros_like(x).index_add_(0, tokens, out * scale)


def drop_over_capacity(
    experts: torch.Tensor, counts: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing with each expert keeping at most `capacity` slots (GShard, Switch): first
    choices before second ones, earlier tokens first. experts (N, k), counts (E,) ->
    experts with a dropped slot's expert set to E, and the slots each expert keeps."""
    n, k = experts.shape
    by_priority = experts.t().reshape(-1)  # every token's first choice, then second, ...
    order = torch.sort(by_priority, stable=True).indices
    starts = counts.cumsum(0) - counts  # each expert's first place in `order`
    place = torch.arange(n * k, device=experts.device) - starts[by_priority[order]]
    keep = torch.empty_like(place, dtype=torch.bool)
    keep[order] = place < capacity
    keep = keep.view(k, n).t()
    return torch.where(keep, experts, counts.numel()), counts.clamp(max=capacity)


class MoE(nn.Module):
    """The MoE feed-forward block: (B, T, H) -> (B, T, H). The routing of its last forward
    (`routing`: every expert's probability (N, E) and the slots routed to each (E,)) stays
    for the load-balancing loss; training forwards add up `routed` (and, with a capacity,
    `dropped`) for the load logs, and `step_slots` for the router bias's update.

    `capacity_factor` > 0: in training forwards each expert takes at most
    ceil(capacity_factor x slots / E) of a micro-batch's slots (`drop_over_capacity`); a
    dropped slot adds nothing (its token keeps the residual). Evaluation never drops, as
    the Hugging Face families compute. `router_bias`: auxiliary-loss-free balancing (the
    router's `bias`). `shard`: expert parallelism, this rank's place in its group (it holds
    and runs E / N of the experts; model/expert_parallel.py). `shared`: a shared expert
    every token goes through, its output scaled by sigmoid(`shared_expert_gate` x) and
    added to the routed experts' (Qwen2-MoE)."""

    def __init__(
        self, d_model: int, ffn_hidden: int, n_experts: int, top_k: int,
        norm_topk_prob: bool = False, std: float = 0.02, down_std: float | None = None,
        capacity_factor: float = 0.0, router_bias: bool = False, impl: str = "auto",
        shard: ExpertShard | None = None, shared: nn.Module | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.gate = Router(d_model, n_experts, top_k, norm_topk_prob, router_bias)
        self.experts = Experts(d_model, ffn_hidden, n_experts, std, down_std, impl, shard)
        self.shared_expert = shared
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False) if shared else None
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None
        self.n_experts, self.capacity_factor = n_experts, capacity_factor
        # Counts, as integers (exact at any size, and left alone by zero.Init's casts).
        self.routed = torch.zeros(n_experts, dtype=torch.long)
        """Slots routed to each expert by training forwards since `take_load` (on the
        device of the last forward)."""
        self.dropped = torch.zeros((), dtype=torch.long)
        """Slots dropped over capacity by training forwards since `take_load`."""
        self.step_slots = torch.zeros(n_experts, dtype=torch.long)
        """Slots routed to each expert since the router bias's last update."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))
        out = self._routed(flat)
        if self.shared_expert is not None:
            gate = torch.sigmoid(self.shared_expert_gate(flat))
            out = out + gate * self.shared_expert(flat)
        return out.view_as(x)

    def _routed(self, flat: torch.Tensor) -> torch.Tensor:
        """The routed experts' output for tokens `flat` (N, H)."""
        weights, experts, probs = self.gate(flat)
        counts = torch.bincount(experts.reshape(-1), minlength=self.n_experts)
        self.routing = probs, counts
        if not self.training:
            return self.experts(flat, weights, experts, counts)
        self.routed = self.routed.to(counts.device) + counts
        if self.gate.bias is not None:
            self.step_slots = self.step_slots.to(counts.device) + counts
        if self.capacity_factor <= 0:
            return self.experts(flat, weights, experts, counts)
        capacity = math.ceil(self.capacity_factor * experts.numel() / self.n_experts)
        experts, kept = drop_over_capacity(experts, counts, capacity)
        self.dropped = self.dropped.to(counts.device) + (counts - kept).sum()
        return self.experts(flat, weights, experts, kept, int(kept.sum()))

    def take_load(self) -> tuple[torch.Tensor, float]:
        """(E,) each expert's fraction of the slots routed since the last call (zeros when
        none were), and the fraction of them dropped over capacity; then count afresh."""
        total = self.routed.sum().clamp(min=1).double()
        load, dropped = (self.routed / total).float(), float(self.dropped / total)
        self.routed, self.dropped = torch.zeros_like(self.routed), torch.zeros_like(self.dropped)
        return load, dropped

    def take_step_slots(self) -> torch.Tensor:
        """(E,) the slots routed to each expert since the last call; then count afresh."""
        slots, self.step_slots = self.step_slots, torch.zeros_like(self.step_slots)
        return slots


class _SumOverGroup(torch.autograd.Function):
    """A sum over the ranks of a group (all-reduce) whose backward sums the ranks'
    gradients (torch.distributed.nn's, deprecated, did the same)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def load_balancing_loss(
    routings: list[tuple[torch.Tensor, torch.Tensor]], group: Any = None
) -> torch.Tensor:  # fmt: skip
    """The Switch Transformer's auxiliary loss over every MoE layer's routing (probs (N, E),
    slots per expert (E,)), as transformers' `load_balancing_loss_func` computes it, so a
    `router_aux_loss_coef` carries over: E x sum_e f_e x P_e, where f_e is the number of
    slots that went to expert e per token and P_e its mean probability, both pooled over
    the layers (a gradient flows through P only). k for an even load.

    `group`: the ranks that each hold a slice of the same sequences (sequence parallelism)
    pool their tokens, so every rank of it gets the loss of the whole sequences. The
    probabilities are summed by a differentiable all-reduce whose backward sums the ranks'
    gradients: with each rank's loss its share of the group's (model/sequence.py `share`,
    shares summing to 1), each rank's router gets the gradient of the whole loss."""
    n_experts = routings[0][0].size(1)
    counts = sum(c.float() for _, c in routings)
    probs = sum(p.sum(dim=0) for p, _ in routings)
    rows = sum(p.size(0) for p, _ in routings)
    if group is not None:
        counts = counts.clone()
        dist.all_reduce(counts, group=group)
        probs = _SumOverGroup.apply(probs, group)
        rows *= dist.get_world_size(group)  # every rank: an equal slice
    return n_experts * ((counts / rows) * (probs / rows)).sum()
