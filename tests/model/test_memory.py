"""The memory estimate against hand-computed values and against what autograd really keeps."""

from __future__ import annotations

import gc
from dataclasses import replace

import pytest
import torch

from pretrain.model.flops import num_params
from pretrain.model.llama import LlamaConfig, Transformer
from pretrain.model.memory import (
    BYTES,
    activation_bytes_per_token,
    block_bytes_per_token,
    estimate_memory,
    loss_bytes,
)
from pretrain.model.parallelize import checkpoint_activations

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SMALL = LlamaConfig(
    n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=192, vocab_size=512,
    max_seq_len=256, attn_impl="sdpa",
)  # fmt: skip


def test_activation_bytes_by_hand() -> None:
    # h=64, kv=2*16=32, F=192. bf16 (w=2): norm = 4*64 + 2*2*64 = 512;
    # block = 2*512 + 2*(64 + 64) + 2*64 + 2*768 = 2944; final norm 512.
    assert activation_bytes_per_token(SMALL, "bf16") == 2 * 2944 + 512
    # fp32 (w=4): norm = 256 + 512 = 768; block = 1536 + 512 + 256 + 3072 = 5376.
    assert activation_bytes_per_token(SMALL, "fp32") == 2 * 5376 + 768
    # full: each block keeps its input (256); one block lives again while recomputed.
    assert activation_bytes_per_token(SMALL, "fp32", "full") == 2 * 256 + 5376 + 768
    # selective: input 256 + q, k, v, o, gate, up, down 4*(3*64 + 2*32 + 2*192) = 2560
    # + attention output 256 + its log-sum-exp 4*4 = 3088 per block.
    assert activation_bytes_per_token(SMALL, "fp32", "selective") == 2 * 3088 + 5376 + 768
    # The loss over 1024 tokens, V = 512: full keeps 12 bytes per entry per token; chunked
    # keeps dL/dx (2*64 per token) and peaks with one chunk's logits, fp32 + bf16
    # (6*1024*512), and dL/dW: one chunk, one bf16 product (2*512*64); several, an fp32
    # accumulator (4*512*64) and each chunk's bf16 product beside it.
    assert loss_bytes(SMALL, "bf16", 1024, "full") == 12 * 512 * 1024
    logits = 6 * 1024 * 512
    assert loss_bytes(SMALL, "bf16", 1024, "chunked", 2048) == 128 * 1024 + 2 * 512 * 64 + logits
    assert loss_bytes(SMALL, "bf16", 4096, "chunked", 1024) == 128 * 4096 + 6 * 512 * 64 + logits
    assert loss_bytes(SMALL, "fp32", 4096, "chunked", 1024) == 256 * 4096 + 4 * 512 * 64 + (
        4 * 1024 * 512
    )
    # The padded vocabulary counts: 500 entries are 512 rows.
    assert loss_bytes(replace(SMALL, vocab_size=500), "bf16", 1024, "full") == 12 * 512 * 1024


def test_zero_stages_divide_what_they_shard() -> None:
    n = num_params(SMALL)
    act = 8 * 128 * activation_bytes_per_token(SMALL, "bf16") + loss_bytes(SMALL, "bf16", 1024)

    def est(stage: int, **kw: object) -> tuple[int, int, int, int]:
        e = estimate_memory(SMALL, seq_len=128, micro_batch_size=8, dp=4, zero_stage=stage, **kw)
        return e.weights, e.grads, e.optimizer, e.activations

    assert est(0) == (2 * n, 2 * n, 12 * n, act)  # bf16 weights/grads, fp32 master + 2 moments
    assert est(1) == (2 * n, 2 * n, 12 * n // 4, act)
    assert est(2) == (2 * n, 2 * n // 4, 12 * n // 4, act)
    assert est(3) == (2 * n // 4, 2 * n // 4, 12 * n // 4, act)
    assert est(2, offload_optimizer=True)[2] == 0
    # ZeRO-3 allocates its gradient partitions and its reduce bucket once: they are states,
    # beside the activations at the peak (measured on CPU: tests/tools/test_bench_train.py).
    z3 = estimate_memory(SMALL, seq_len=128, micro_batch_size=8, dp=4, zero_stage=3,
                         reduce_bucket_size=1000)  # fmt: skip
    assert z3.states == (2 * n + 2 * n + 12 * n) // 4 + 2 * 1000
    assert z3.total == z3.states + act
    offloaded = estimate_memory(SMALL, seq_len=128, micro_batch_size=8, dp=4, zero_stage=3,
                                reduce_bucket_size=1000, offload_optimizer=True)  # fmt: skip
    assert offloaded.states == 2 * n // 4 + 2 * 1000  # gradient partitions in host memory too
    z2 = estimate_memory(SMALL, seq_len=128, micro_batch_size=8, dp=4, zero_stage=2,
                         reduce_bucket_size=1000)  # fmt: skip
    assert (z2.buffers, z2.grads_kept, z2.states) == (0, False, 2 * n + 12 * n // 4)
    fp32 = estimate_memory(SMALL, seq_len=128, micro_batch_size=8, dp=1, zero_stage=0,
                           precision="fp32")  # fmt: skip
    assert (fp32.weights, fp32.grads, fp32.optimizer) == (4 * n, 4 * n, 8 * n)  # no master copy
    assert fp32.states == 12 * n
    # ZeRO's optimizers step an fp32 partition of the weights even in fp32 training.
    fp32_z1 = estimate_memory(SMALL, seq_len=128, micro_batch_size=8, dp=1, zero_stage=1,
                              precision="fp32")  # fmt: skip
    assert fp32_z1.optimizer == 12 * n
    # One micro-batch: activations are gone before the gradients are complete ...
    assert fp32.total == 12 * n + max(4 * n, fp32.activations)
    # ... with accumulation, earlier micro-batches' gradients wait beside the activations.
    accum = estimate_memory(SMALL, seq_len=128, micro_batch_size=8, dp=1, zero_stage=0,
                            precision="fp32", grad_accum=4)  # fmt: skip
    assert accum.total == 16 * n + accum.activations
    with pytest.raises(ValueError, match="zero_stage=4"):
        estimate_memory(SMALL, seq_len=8, micro_batch_size=1, dp=1, zero_stage=4)


def kept_after_forward(model: Transformer, tokens: torch.Tensor) -> int:
    """Bytes a training forward pass leaves allocated (what backward will use), measured
    with the profiler's CPU allocator events."""
    gc.collect()
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        loss = model(tokens[:, :-1], tokens[:, 1:])
    kept = sum(e.self_cpu_memory_usage for e in prof.events())
    loss.backward()  # the graph was a real one
    return kept


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_estimate_matches_what_a_forward_pass_keeps(precision: str) -> None:
    """Every checkpointing policy and loss, against what the allocator really holds."""
    B, T = 4, 128
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, SMALL.vocab_size, (B, T + 1), generator=gen)
    w, h, V = BYTES[precision], SMALL.d_model, SMALL.padded_vocab
    kept = {}
    for loss_impl in ("full", "chunked"):
        for policy in ("none", "full", "selective"):
            torch.manual_seed(0)
            cfg = replace(SMALL, loss_impl=loss_impl)
            model = Transformer(cfg).to(DTYPES[precision])
            if policy != "none":
                for block in model.layers:
                    checkpoint_activations(block, policy)
            kept[loss_impl, policy] = kept_after_forward(model, tokens)
            # After forward nothing is being recomputed: blocks, final norm and the loss.
            loss_kept = w * h * B * T + w * V * h if loss_impl == "chunked" else 4 * V * B * T
            blocks = SMALL.n_layers * block_bytes_per_token(cfg, precision, policy)
            expected = B * T * (blocks + 4 * h + 2 * w * h) + loss_kept
            assert kept[loss_impl, policy] == pytest.approx(expected, rel=0.12), (loss_impl, policy)
    for loss_impl in ("full", "chunked"):
        assert kept[loss_impl, "full"] < kept[loss_impl, "selective"] < kept[loss_impl, "none"]
    for policy in ("none", "full", "selective"):
        assert kept["chunked", policy] < kept["full", policy]


def test_every_checkpointing_policy_gives_the_same_gradients() -> None:
    """full and selective recompute what they dropped: bit-equal gradients in fp32."""
    tokens = torch.randint(0, SMALL.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    grads = {}
    for policy in ("none", "full", "selective"):
        torch.manual_seed(0)
        model = Transformer(replace(SMALL, dropout=0.1))  # dropout: the RNG must replay too
        if policy != "none":
            for block in model.layers:
                checkpoint_activations(block, policy)
        torch.manual_seed(1)
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        grads[policy] = [p.grad for p in model.parameters()]
    for policy in ("full", "selective"):
        for a, b in zip(grads["none"], grads[policy], strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="policy 'some'"):
        checkpoint_activations(model.layers[0], "some")


def test_a_tiled_mlp_keeps_no_intermediates_and_gives_the_same_gradients() -> None:
    """model.mlp_chunk_tokens: the SwiGLU over 64 tokens at a time, recomputed in backward;
    what a forward keeps drops by the intermediates (as the estimate says), and the loss
    and gradients stay the same."""
    B, T = 4, 128
    tokens = torch.randint(
        0, SMALL.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)
    )
    kept, grads, losses = {}, {}, {}
    for chunk in (0, 64):
        for policy in ("none", "selective"):
            torch.manual_seed(0)
            cfg = replace(SMALL, mlp_chunk_tokens=chunk)
            model = Transformer(cfg)
            if policy != "none":
                for block in model.layers:
                    checkpoint_activations(block, policy)
            kept[chunk, policy] = kept_after_forward(model, tokens)
            blocks = SMALL.n_layers * block_bytes_per_token(cfg, "fp32", policy)
            expected = B * T * (blocks + 4 * 64 + 2 * 4 * 64) + 4 * 64 * B * T + 4 * 512 * 64
            assert kept[chunk, policy] == pytest.approx(expected, rel=0.12), (chunk, policy)
            if policy == "none":
                model.zero_grad()
                losses[chunk] = model(tokens[:, :-1], tokens[:, 1:])
                losses[chunk].backward()
                grads[chunk] = [p.grad for p in model.parameters()]
    # untiled, each block keeps w * 4F = 3 KB per token of SwiGLU; tiled, none of it
    assert kept[0, "none"] - kept[64, "none"] == pytest.approx(2 * B * T * 4 * 4 * 192, rel=0.05)
    # under selective checkpointing the block's policy keeps the MLP's matmul outputs
    assert kept[64, "selective"] == pytest.approx(kept[0, "selective"], rel=0.05)
    torch.testing.assert_close(losses[64], losses[0])
    for a, b in zip(grads[0], grads[64], strict=True):
        torch.testing.assert_close(b, a)


def test_sequence_parallel_ranks_hold_their_share_of_the_tokens() -> None:
    """parallel.sequence=2 on 4 ranks: half the activations of a micro-batch per rank, ZeRO
    shards over all 4 ranks (2 data x 2 sequence)."""
    one = estimate_memory(SMALL, seq_len=128, micro_batch_size=8, dp=4, zero_stage=3)
    two = estimate_memory(SMALL, seq_len=128, micro_batch_size=8, dp=2, zero_stage=3,
                          sequence=2)  # fmt: skip
    # per block, o_proj keeps the attention output exchanged back (bf16: 2 x 64 per token)
    per_token = activation_bytes_per_token(SMALL, "bf16") + 2 * 2 * 64
    assert two.activations == 4 * 128 * per_token + loss_bytes(SMALL, "bf16", 4 * 128)
    # 4 ranks, 2 key/value heads: each is repeated, 2 more heads of k and v (16 wide) kept
    four = estimate_memory(SMALL, seq_len=128, micro_batch_size=8, dp=1, zero_stage=3,
                           sequence=4)  # fmt: skip
    extra = 2 * 2 * (64 + 2 * 16 * 2)
    assert four.activations == 2 * 128 * (activation_bytes_per_token(SMALL, "bf16") + extra) + (
        loss_bytes(SMALL, "bf16", 2 * 128)
    )
    assert (two.weights, two.grads, two.optimizer) == (one.weights, one.grads, one.optimizer)
    tiled = estimate_memory(replace(SMALL, mlp_chunk_tokens=256), seq_len=128,
                            micro_batch_size=8, dp=4, zero_stage=3)  # fmt: skip
    swiglu = 2 * 4 * 192  # bf16, 4F per token per block
    assert one.activations - tiled.activations == 8 * 128 * 2 * swiglu - swiglu * 256


@pytest.mark.parametrize("shared", [0, 96])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_sparse_block_estimate_matches_what_a_forward_pass_keeps(
    precision: str, shared: int
) -> None:
    """A mixture-of-experts model (a dense block, then a sparse one: router, top-2 of 8
    experts, and a shared expert or none) under every checkpointing policy, against what
    the allocator holds."""
    from pretrain.model.moe_model import MoEConfig, MoETransformer

    cfg = MoEConfig(**{**vars(SMALL), "n_experts": 8, "top_k": 2, "moe_ffn_hidden": 48,
                       "moe_every": 2, "shared_expert_hidden": shared})  # fmt: skip
    B, T = 4, 128
    tokens = torch.randint(
        0, cfg.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)
    )
    w, h, V = BYTES[precision], cfg.d_model, cfg.padded_vocab
    dense = block_bytes_per_token(cfg, precision, "none", layer=0)
    assert dense == block_bytes_per_token(SMALL, precision)  # block 0 is a plain SwiGLU one
    assert block_bytes_per_token(cfg, precision, "none", layer=1) != dense
    for policy in ("none", "full", "selective"):
        torch.manual_seed(0)
        model = MoETransformer(cfg).to(DTYPES[precision])
        if policy != "none":
            for block in model.layers:
                checkpoint_activations(block, policy)
        kept = kept_after_forward(model, tokens)
        blocks = sum(block_bytes_per_token(cfg, precision, policy, i) for i in (0, 1))
        expected = B * T * (blocks + 4 * h + 2 * w * h) + w * h * B * T + w * V * h
        assert kept == pytest.approx(expected, rel=0.12), policy
    # The states count every expert: 8 of them where the dense block has one SwiGLU.
    est = estimate_memory(cfg, seq_len=T, micro_batch_size=B, dp=1, zero_stage=0)
    assert est.weights == 2 * sum(p.numel() for p in model.parameters())  # bf16
