"""The mixture-of-experts block (pretrain/model/moe.py): routing and experts against a
token-by-token reference, deterministic ties, and transformers' Qwen3-MoE block and
load-balancing loss on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.model.flops import matmul_params, num_params
from pretrain.model.llama_family import LLAMA
from pretrain.model.moe import Experts, MoE, drop_over_capacity, load_balancing_loss
from pretrain.model.moe_family import MOE
from pretrain.model.moe_model import MoEConfig, MoETransformer, moe_config

H, FFN, E = 32, 16, 8


def reference(block: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: softmax over all experts in fp32, the k largest
    (lower index first on ties), weights renormalised when asked, the weighted SwiGLUs."""
    flat = x.reshape(-1, x.size(-1))
    rows = []
    for token in flat:
        dtype = torch.promote_types(token.dtype, torch.float32)  # fp32, or float64 here
        probs = F.softmax(token.to(dtype) @ block.gate.weight.to(dtype).T, dim=-1)
        p = probs.tolist()
        chosen = sorted(range(len(p)), key=lambda e: (-p[e], e))[: block.gate.top_k]
        weights = [probs[e] for e in chosen]
        if block.gate.norm_topk_prob:
            total = sum(weights)
            weights = [w / total for w in weights]
        out = torch.zeros_like(token)
        for e, w in zip(chosen, weights, strict=True):
            gate, up = (block.experts.gate_up_proj[e] @ token).chunk(2)
            out = out + w * (block.experts.down_proj[e] @ (F.silu(gate) * up))
        rows.append(out)
    return torch.stack(rows).view_as(x)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
@pytest.mark.parametrize(("top_k", "norm"), [(1, False), (2, False), (2, True), (3, True)])
def test_the_block_equals_a_token_by_token_reference(top_k: int, norm: bool, impl: str) -> None:
    """Both ways of running the experts: one matmul per expert, and torch's grouped matmul
    (one kernel over all of them; on CPU here)."""
    torch.manual_seed(0)
    block = MoE(H, FFN, E, top_k, norm_topk_prob=norm, std=0.3, impl=impl)  # spread routing
    x = torch.randn(3, 11, H, requires_grad=True)
    ours = block(x)
    ref = reference(block, x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-6)
    # and the same gradients, to the router, the experts and the input: in float64 (where
    # per-token and batched sums agree far below the check) against the reference; the
    # grouped matmul, which takes no float64, against the loop in float32.
    inputs = [x, *block.parameters()]
    grads = torch.autograd.grad(ours.square().sum(), inputs)
    if impl == "grouped_mm":
        block.experts.impl = "loop"
        loop_grads = torch.autograd.grad(block(x).square().sum(), inputs)
        for ours_g, loop_g in zip(grads, loop_grads, strict=True):
            torch.testing.assert_close(ours_g, loop_g, rtol=1e-5, atol=1e-6)
        return
    block, x = block.double(), x.detach().double().requires_grad_()
    grads = torch.autograd.grad(block(x).square().sum(), [x, *block.parameters()])
    ref_grads = torch.autograd.grad(reference(block, x).square().sum(), [x, *block.parameters()])
    for ours_g, ref_g in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours_g, ref_g, rtol=1e-7, atol=1e-10)
    probs, counts = block.routing
    assert probs.shape == (33, E) and counts.shape == (E,) and counts.sum() == 33 * top_k
    load, dropped = block.take_load()  # the training forwards' slots, as fractions; afresh
    assert load.sum().item() == pytest.approx(1.0) and dropped == 0.0
    assert block.take_load()[0].sum() == 0


def test_ties_go_to_the_lower_expert_every_time() -> None:
    """Experts 5 and 2 route identically (equal router rows): every token's probabilities
    for them are equal, and the choice is expert 2 on every run."""
    torch.manual_seed(0)
    block = MoE(H, FFN, E, top_k=1, std=0.3)
    with torch.no_grad():
        block.gate.weight[:] = 0.0
        block.gate.weight[2] = block.gate.weight[5] = torch.randn(H)
    x = torch.randn(40, H)
    x = x * torch.sign(x @ block.gate.weight[2])[:, None]  # experts 2 and 5 lead for all
    picks = [block.gate(x)[1] for _ in range(3)]
    assert all(torch.equal(p, picks[0]) for p in picks)
    assert picks[0].flatten().tolist() == [2] * 40
    torch.testing.assert_close(block(x), reference(block, x))


@pytest.mark.parametrize("norm", [False, True])
def test_qwen3_moe_block_on_the_same_weights(norm: bool) -> None:
    """transformers' Qwen3MoeSparseMoeBlock, given our weights (the same fused layout),
    computes the same outputs, and its load-balancing loss equals ours."""
    modeling = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    config = modeling.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=FFN, num_experts=E,
                                     num_experts_per_tok=2, norm_topk_prob=norm)  # fmt: skip
    torch.manual_seed(0)
    ours = MoE(H, FFN, E, top_k=2, norm_topk_prob=norm, std=0.3)
    hf = modeling.Qwen3MoeSparseMoeBlock(config)
    hf.load_state_dict(ours.state_dict())  # gate.weight, experts.gate_up_proj, .down_proj
    x = torch.randn(2, 9, H)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-6)
        routings, logits = [ours.routing], [F.linear(x.reshape(-1, H), ours.gate.weight)]
        y = torch.randn(3, 5, H)
        ours(y)
        routings.append(ours.routing)
        logits.append(F.linear(y.reshape(-1, H), ours.gate.weight))
        hf_aux = modeling.load_balancing_loss_func(tuple(logits), E, 2)
    torch.testing.assert_close(load_balancing_loss(routings), hf_aux)


def test_an_even_load_costs_top_k_and_a_collapsed_one_more() -> None:
    n = 64  # tokens, 2 slots each
    even = torch.full((E,), 2 * n // E)  # every expert equally often
    uniform = torch.full((n, E), 1 / E)
    assert load_balancing_loss([(uniform, even)]).item() == pytest.approx(2.0)
    collapsed = torch.zeros(E, dtype=torch.long)
    collapsed[0] = collapsed[1] = n  # every token to experts 0 and 1
    peaked = torch.zeros(n, E)
    peaked[:, 0], peaked[:, 1] = 0.6, 0.4
    assert load_balancing_loss([(peaked, collapsed)]).item() == pytest.approx(E * (0.6 + 0.4))


def _tiny(**kw: object) -> MoEConfig:
    base = dict(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64, vocab_size=101,
                n_experts=E, top_k=2, moe_ffn_hidden=FFN, aux_loss_coef=0.01)  # fmt: skip
    return MoEConfig(**{**base, **kw})


def test_the_sparse_llama_adds_the_weighted_aux_loss_of_its_sparse_blocks() -> None:
    torch.manual_seed(0)
    model = MoETransformer(_tiny(moe_every=2))  # block 1 sparse, 0 and 2 dense
    assert [isinstance(b.mlp, MoE) for b in model.layers] == [False, True, False]
    tokens = torch.randint(0, 101, (2, 17))
    total = model(tokens[:, :-1], tokens[:, 1:])
    routing = model.moe_blocks()[0].routing
    assert model.aux_loss == load_balancing_loss([routing])
    plain = MoETransformer(_tiny(moe_every=2, aux_loss_coef=0.0))
    plain.load_state_dict(model.state_dict())
    lm = plain(tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(total, lm + 0.01 * model.aux_loss)
    total.backward()  # the router learns from the aux loss too
    assert model.moe_blocks()[0].gate.weight.grad.abs().sum() > 0
    with torch.no_grad():  # evaluation scores the language model alone
        torch.testing.assert_close(model.eval()(tokens[:, :-1], tokens[:, 1:]), lm)


@pytest.mark.parametrize("shared", [0, 24])
def test_flops_count_the_active_experts_only(shared: int) -> None:
    """MFU's weights: every dense matmul, the router, top_k of E experts, the shared
    expert and its gate (every token's), the head."""
    cfg = _tiny(moe_every=2, qk_norm="full", shared_expert_hidden=shared)  # 0, 2 dense
    model = MoETransformer(cfg)
    matmul = sum(p.numel() for n, p in model.named_parameters()
                 if p.dim() >= 2 and n != "embed_tokens.weight")  # fmt: skip
    experts = sum(b.experts.gate_up_proj.numel() + b.experts.down_proj.numel()
                  for b in model.moe_blocks())  # fmt: skip
    assert matmul_params(cfg) == matmul - experts + experts * cfg.top_k // cfg.n_experts
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())  # every expert
    assert MOE.flops_per_token(vars(cfg), 64) < LLAMA.flops_per_token(
        {**vars(cfg), "ffn_hidden": cfg.n_experts * FFN}, 64
    )  # a dense model as wide as all the experts costs more


def test_a_shared_expert_adds_its_gated_output_to_the_routed_experts() -> None:
    """Qwen2-MoE's block: routed experts + sigmoid(gate x) * shared SwiGLU(x), the shared
    expert's weights initialised as the dense projections are."""
    torch.manual_seed(0)
    cfg = _tiny(shared_expert_hidden=24)
    block = MoETransformer(cfg).moe_blocks()[0]
    assert block.shared_expert.down_proj.weight.std() < block.shared_expert.up_proj.weight.std()
    x = torch.randn(2, 5, cfg.d_model)
    shared, gate = block.shared_expert, block.shared_expert_gate
    block.shared_expert = None
    routed = block(x)
    block.shared_expert = shared
    expected = routed + torch.sigmoid(gate(x)) * shared(x)
    torch.testing.assert_close(block(x), expected)


def test_bad_moe_settings_are_named() -> None:
    errors = _tiny(top_k=9, moe_every=0, aux_loss_coef=-1.0).errors()
    assert any("model.top_k=9 exceeds model.n_experts=8" in e for e in errors)
    assert any("model.moe_every=0: must be >= 1" in e for e in errors)
    assert any("model.aux_loss_coef=-1.0" in e for e in errors)


MOE_PRESETS = ("moe_tiny", "moe_1b", "olmoe_1b_7b", "qwen3_30b_a3b")


def _moe_preset(name: str) -> MoEConfig:
    from omegaconf import OmegaConf

    from tests.conftest import compose_config

    return moe_config(vars(OmegaConf.to_object(compose_config([f"model={name}"]).model)))


@pytest.mark.parametrize("preset", MOE_PRESETS)
def test_moe_presets_count_their_parameters_as_transformers_builds_them(preset: str) -> None:
    """Our count equals our module's and transformers' model of the exported config.json
    (on the meta device: no memory, even for 30B)."""
    transformers = pytest.importorskip("transformers")
    cfg = _moe_preset(preset)
    with torch.device("meta"):
        ours = MoETransformer(cfg)
        config = transformers.AutoConfig.for_model(**MOE.hf.config(vars(cfg), "float32", {}))
        hf = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in ours.parameters()) == num_params(cfg)
    assert sum(p.numel() for p in hf.parameters()) == num_params(cfg)  # vocab_size % 128 == 0


@pytest.mark.parametrize(
    ("preset", "total", "active"),
    [
        ("olmoe_1b_7b", 6_919_161_856, 1_178_861_568),  # OLMoE-1B-7B: 6.9B, "1B" active
        ("qwen3_30b_a3b", 30_532_122_624, 3_041_656_832),  # Qwen3-30B-A3B: 30.5B, "3B" active
    ],
)
def test_moe_presets_have_their_published_sizes(preset: str, total: int, active: int) -> None:
    cfg = _moe_preset(preset)
    assert num_params(cfg) == total and matmul_params(cfg) == active


def test_capacity_drops_the_lowest_priority_slots_in_training_only() -> None:
    """Each expert keeps `capacity` slots: every token's first choice before any second one,
    earlier tokens first; a dropped slot adds nothing; evaluation drops none."""
    torch.manual_seed(0)
    block = MoE(H, FFN, 4, top_k=2, std=0.5, capacity_factor=0.5)  # capacity 0.5 x 2N / 4
    x = torch.randn(1, 24, H)
    weights, experts, _ = block.gate(x[0])
    capacity = math.ceil(0.5 * 48 / 4)  # 6 of each expert's slots
    taken = {e: 0 for e in range(4)}
    keep = torch.zeros_like(experts, dtype=torch.bool)
    for choice in range(2):  # the reference: priority by choice, then by token
        for token in range(24):
            e = int(experts[token, choice])
            if taken[e] < capacity:
                keep[token, choice], taken[e] = True, taken[e] + 1
    counts = torch.bincount(experts.flatten(), minlength=4)
    dropped, kept = drop_over_capacity(experts, counts, capacity)
    assert torch.equal(dropped == 4, ~keep) and kept.tolist() == [taken[e] for e in range(4)]
    assert (~keep).any()  # this routing does overflow
    out = block.train()(x)
    expected = torch.zeros(24, H)
    for token in range(24):
        for choice in range(2):
            if keep[token, choice]:
                e = int(experts[token, choice])
                expected[token] += (
                    weights[token, choice] * block.experts.expert(e, x[0, token : token + 1])[0]
                )
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)
    _, dropped_share = block.take_load()
    assert dropped_share == pytest.approx(float((~keep).sum()) / 48)
    with torch.no_grad():  # evaluation: no capacity
        block.eval()
        torch.testing.assert_close(block(x), reference(block, x), rtol=1e-5, atol=2e-6)


def test_the_router_bias_picks_the_experts_but_not_their_weights() -> None:
    torch.manual_seed(0)
    block = MoE(H, FFN, E, top_k=2, std=0.3, router_bias=True)
    assert block.gate.bias.dtype == torch.float32 and not block.gate.bias.requires_grad
    x = torch.randn(40, H)
    _, before, probs = block.gate(x)
    block.gate.bias[5] = 10.0  # expert 5 is everyone's first choice now
    weights, experts, probs2 = block.gate(x)
    assert torch.equal(probs, probs2) and (experts[:, 0] == 5).all()
    assert torch.equal(experts[:, 1], before[:, 0].where(before[:, 0] != 5, before[:, 1]))
    torch.testing.assert_close(weights, probs.gather(1, experts))  # unbiased weights
    # DeepSeek-V3's update: +rate below the mean load, -rate above it, 0 at it.
    block.gate.bias.zero_()
    block.gate.update_bias(torch.tensor([4, 0, 2, 2, 2, 2, 2, 2]), rate=0.01)
    assert block.gate.bias.tolist() == pytest.approx([-0.01, 0.01, 0, 0, 0, 0, 0, 0])
    assert "gate.bias" in block.state_dict()  # checkpointed with the model
    assert "gate.bias" not in MoE(H, FFN, E, top_k=2).state_dict()  # only when asked for


def test_bias_and_counts_keep_their_dtypes_when_floats_are_made_in_bf16() -> None:
    """ZeRO-3's zero.Init makes every float tensor built under it bf16 (as here, the default
    dtype): the bias stays fp32 (its small steps would vanish in bf16) and the counts are
    integers (exact at any size)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        block = MoE(H, FFN, E, top_k=2, router_bias=True, capacity_factor=1.0)
    finally:
        torch.set_default_dtype(default)
    assert block.gate.bias.dtype == torch.float32
    assert block.routed.dtype == block.step_slots.dtype == block.dropped.dtype == torch.long


def test_experts_given_no_rows_still_get_a_gradient() -> None:
    """Under expert parallelism a rank's experts may receive no token in a micro-batch;
    their gradients must still exist (zeros), or the ranks holding them would reduce
    different sets of parameters."""
    experts = Experts(H, FFN, E, impl="loop")
    out = experts._grouped(torch.zeros(0, H), torch.zeros(E, dtype=torch.long))
    assert out.shape == (0, H)
    out.sum().backward()
    assert experts.gate_up_proj.grad is not None and experts.down_proj.grad is not None
    assert experts.gate_up_proj.grad.abs().sum() == 0
