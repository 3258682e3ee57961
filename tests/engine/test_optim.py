"""AdamW groups skip decay on norms, biases and embeddings; the LR schedule has its shape."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from pretrain.config.schema import OptimConfig
from pretrain.engine.optim import lr_factor, lr_scheduler, param_groups, schedule_warnings
from pretrain.model import LlamaConfig, Transformer
from pretrain.model.baselines import LSTMLM


def test_no_decay_on_norms_and_embeddings_decay_on_matrices() -> None:
    model = Transformer(LlamaConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=50))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.embed_tokens.weight) in no_decay_ids
    assert id(model.norm.weight) in no_decay_ids
    assert id(model.layers[0].input_layernorm.weight) in no_decay_ids
    assert id(model.layers[1].mlp.down_proj.weight) in {id(p) for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    total = len(decay["params"]) + len(no_decay["params"])
    assert total == len(list(model.parameters()))


def test_tied_weight_is_listed_once_without_decay() -> None:
    model = Transformer(
        LlamaConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=50, tie_embeddings=True)
    )
    decay, no_decay = param_groups(model, 0.1)
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids))
    assert id(model.lm_head.weight) in {id(p) for p in no_decay["params"]}


def test_biases_do_not_decay() -> None:
    model = LSTMLM(vocab_size=20, d_model=8)
    _, no_decay = param_groups(model, 0.1)
    assert id(model.head.bias) in {id(p) for p in no_decay["params"]}


def test_warmup_then_cosine_to_floor() -> None:
    f = [lr_factor(s, warmup_steps=10, max_steps=110, min_lr_ratio=0.1) for s in range(1, 121)]
    assert f[0] == pytest.approx(0.1)  # step 1 of 10 warmup steps
    assert f[9] == pytest.approx(1.0)  # end of warmup: the peak
    assert f[59] == pytest.approx(0.55)  # half-way through the cosine: (1 + 0.1) / 2
    assert f[109] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(f[9:]))  # never rises after the peak


def test_scheduler_gives_step_one_its_warmup_rate() -> None:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_scheduler(opt, OptimConfig(lr=1.0, warmup_steps=4), max_steps=10)
    rates = []
    for _ in range(4):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_every_adamw_kernel_takes_the_same_steps() -> None:
    """optim.impl picks torch's fused, foreach or per-parameter AdamW: the same numbers."""
    from pretrain.engine.optim import adamw_kernel, build_optimizer

    assert adamw_kernel("auto") == adamw_kernel("fused") == {"fused": True, "foreach": False}
    assert adamw_kernel("foreach") == {"fused": False, "foreach": True}
    tokens = torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(0))
    finals = {}
    for impl in ("fused", "foreach", "loop"):
        torch.manual_seed(0)
        model = Transformer(LlamaConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=50))
        initial = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt = build_optimizer(model, OptimConfig(lr=1e-2, impl=impl))
        assert opt.defaults["fused"] is (impl == "fused")
        assert opt.defaults["foreach"] is (impl == "foreach")
        for _ in range(3):
            model(tokens[:, :-1], tokens[:, 1:]).backward()
            opt.step()
            opt.zero_grad()
        finals[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.allclose(finals["loop"], initial, atol=1e-3)  # the steps moved them
    torch.testing.assert_close(finals["fused"], finals["loop"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(finals["foreach"], finals["loop"], rtol=1e-5, atol=1e-6)


def test_a_resumed_optimizer_uses_this_runs_kernel() -> None:
    """Loading a checkpoint's param groups keeps the saved run's kernel flags; the resumed run
    must step with its own optim.impl, and take the step the saved optimizer would have taken.
    (Groups saved by torch's AdamW resumed under DeepSpeedCPUAdam: tests/train/test_gpu.py.)"""
    from pretrain.engine.optim import build_optimizer, keep_kernel_after_load

    torch.manual_seed(0)
    model = Transformer(LlamaConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=50))
    tokens = torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(0))

    def step(opt: torch.optim.Optimizer) -> None:
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
        opt.zero_grad()

    saved_opt = build_optimizer(model, OptimConfig(lr=1e-2, impl="foreach"))
    step(saved_opt)
    saved = copy.deepcopy(saved_opt.state_dict())
    start = [p.detach().clone() for p in model.parameters()]
    step(saved_opt)
    expected = [p.detach().clone() for p in model.parameters()]

    with torch.no_grad():
        for p, s in zip(model.parameters(), start, strict=True):
            p.copy_(s)
    resumed = build_optimizer(model, OptimConfig(lr=1e-2, impl="fused"))
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["foreach"] and not resumed.param_groups[0]["fused"]
    keep_kernel_after_load(resumed, OptimConfig(impl="fused"))
    assert all(g["fused"] and not g["foreach"] for g in resumed.param_groups)
    step(resumed)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)


def test_the_trainer_clips_only_where_deepspeed_does_not() -> None:
    """Plain fp32 data parallel: the trainer clips (and reports the pre-clip norm); elsewhere
    DeepSpeed's optimizers clip their own fp32 partitions."""
    from pretrain.config import compose, resolve
    from pretrain.engine.deepspeed import clip_gradients, trainer_clip

    def clip_of(*overrides: str) -> float | None:
        cfg = compose(["trainer.device=cpu", "optim.grad_clip=0.5", *overrides])
        return trainer_clip(resolve(cfg, world_size=1, cuda_available=False))

    assert clip_of("precision=fp32") == 0.5
    assert clip_of("precision=fp32", "deepspeed.zero_stage=1") is None
    assert clip_of("precision=bf16") is None
    model = torch.nn.Linear(4, 3)
    for p, g in zip(model.parameters(), (torch.full((3, 4), 2.0), torch.zeros(3)), strict=True):
        p.grad = g.clone()
    norm = (12 * 2.0**2) ** 0.5
    params = list(model.parameters())
    assert clip_gradients(params, 0.5) == pytest.approx(norm)  # the norm before clipping
    assert clip_gradients(params, 0.0) == pytest.approx(0.5, rel=1e-5)  # clipped; 0: no clip
    assert clip_gradients(params, 0.0) == pytest.approx(0.5, rel=1e-5)


def test_a_warmup_past_the_last_step_is_named_with_its_numbers() -> None:
    """optim.warmup_steps >= trainer.max_steps: the peak LR is never (or only at the last
    step) reached; the warning gives the LR the run ends at and a warmup that fits."""
    cfg = OptimConfig(lr=3e-4, warmup_steps=100)
    assert schedule_warnings(cfg, max_steps=101) == []
    (short,) = schedule_warnings(cfg, max_steps=80)
    assert "optim.warmup_steps=100 >= trainer.max_steps=80" in short
    assert "never reaches optim.lr=0.0003 (it ends at 0.00024, 80% of it)" in short
    assert "optim.warmup_steps=8" in short
    (equal,) = schedule_warnings(cfg, max_steps=100)
    assert "reaches optim.lr only at the last step" in equal
    assert schedule_warnings(OptimConfig(warmup_steps=0), max_steps=1) == []
