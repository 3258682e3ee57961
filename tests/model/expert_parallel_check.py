"""Run by tests/model/test_expert_parallel.py under torchrun (gloo): the MoE block with its
experts split over every rank equals the whole block on each rank's own tokens, in outputs
and in the gradients of the input and the router; each rank's experts get the gradient of
all ranks' tokens that reached them (the sum of the whole blocks' expert gradients)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from pretrain.model.expert_parallel import ExpertShard
from pretrain.model.moe import MoE

H, FFN, E = 32, 16, 8


def main(impl: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = ExpertShard(dist.new_group(list(range(world))), world, rank)
    torch.manual_seed(0)  # the same whole block on every rank
    whole = MoE(H, FFN, E, top_k=2, norm_topk_prob=True, std=0.3, impl=impl)
    torch.manual_seed(0)
    split = MoE(H, FFN, E, top_k=2, norm_topk_prob=True, std=0.3, impl=impl, shard=shard)
    local = shard.local_experts(E)
    assert split.experts.gate_up_proj.shape[0] == E // world  # only this rank's experts...
    for name in ("gate_up_proj", "down_proj"):  # ...initialised as the whole set's
        assert torch.equal(
            getattr(split.experts, name), getattr(whole.experts, name)[local.start : local.stop]
        )
    assert torch.equal(split.gate.weight, whole.gate.weight)

    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own tokens, a few of them
    x = torch.randn(2, 5 + 3 * rank, H, generator=gen)
    g = torch.randn(x.shape, generator=gen)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ref, ours = whole(xs[0]), split(xs[1])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    (ref * g).sum().backward()
    (ours * g).sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split.gate.weight.grad, whole.gate.weight.grad, rtol=1e-5, atol=1e-6)
    for name in ("gate_up_proj", "down_proj"):
        total = getattr(whole.experts, name).grad.clone()
        dist.all_reduce(total)  # every rank's tokens' gradient, for every expert
        torch.testing.assert_close(
            getattr(split.experts, name).grad, total[local.start : local.stop], rtol=1e-5, atol=1e-6
        )
    sent = split.routing[1].view(world, -1).sum(1).tolist()  # rows this rank sent each rank
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"sent": sent, "tokens": x.shape[1] * 2}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
