"""The chunked output-head loss against the plain one, and the padded vocabulary."""

from __future__ import annotations

import pytest
import torch

from pretrain.model.llama import LlamaConfig, Transformer
from pretrain.model.loss import IGNORE_INDEX, linear_cross_entropy
from tests.conftest import requires_gpu


def head_case(dtype: torch.dtype, n: int = 300, d: int = 32, V: int = 200):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(V, d, generator=gen) * 0.3
    targets = torch.randint(0, V, (n,), generator=gen)
    targets[::7] = IGNORE_INDEX  # padding positions: no loss, no gradient
    return x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), targets


def loss_and_grads(x, w, targets, impl: str, chunk: int = 64, scale: float = 3.0, **kw):
    loss = linear_cross_entropy(x, w, targets, impl, chunk, **kw)
    gx, gw = torch.autograd.grad(loss * scale, (x, w))  # a scale, as fp16 loss scaling does
    return loss.detach().float(), gx.float(), gw.float()


@pytest.mark.parametrize("chunk", [64, 77, 300, 4096])  # dividing, not dividing, one, more
def test_chunked_loss_equals_the_full_one_in_fp32(chunk: int) -> None:
    x, w, t = head_case(torch.float32)
    full = loss_and_grads(x, w, t, "full")
    chunked = loss_and_grads(x, w, t, "chunked", chunk)
    for a, b in zip(full, chunked, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert full[2].abs().sum() > 0 and full[1][::7].abs().sum() == 0  # ignored rows: no grad


def test_chunked_loss_in_bf16_is_as_close_to_fp32_as_the_full_one() -> None:
    reference = loss_and_grads(*head_case(torch.float32), "full")
    case = head_case(torch.bfloat16)
    full, chunked = loss_and_grads(*case, "full"), loss_and_grads(*case, "chunked")
    for ref, a, b in zip(reference, full, chunked, strict=True):
        err_full = (a - ref).abs().max() / ref.abs().max()
        err_chunked = (b - ref).abs().max() / ref.abs().max()
        assert err_chunked <= 1.5 * err_full + 1e-3, (err_chunked, err_full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_chunk_gradient_equals_the_eager_one(dtype: torch.dtype) -> None:
    """trainer.compile fuses each chunk's softmax gradient (torch.compile; inductor's C++ here),
    short last chunk and ignored targets included: the same loss and gradients."""
    case = head_case(dtype)
    eager = loss_and_grads(*case, "chunked", 128)
    compiled = loss_and_grads(*case, "chunked", 128, compiled=True)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 0.02, "atol": 2e-3}
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(b, a, **tol)


def test_chunked_loss_without_grad_and_every_target_ignored() -> None:
    x, w, t = head_case(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t, "chunked", 50),
                                   linear_cross_entropy(x, w, t, "full"))  # fmt: skip
    none = torch.full_like(t, IGNORE_INDEX)
    loss = linear_cross_entropy(x, w, none, "chunked", 50)
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad.abs().sum() == 0 and w.grad.abs().sum() == 0
    with pytest.raises(ValueError, match=r"model\.loss_impl='fast'"):
        linear_cross_entropy(x, w, t, "fast")


def tiny(**fields: object) -> LlamaConfig:
    return LlamaConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                       vocab_size=300, attn_impl="sdpa", **fields)  # fmt: skip


@pytest.mark.parametrize("tied", [False, True])
def test_the_model_trains_the_same_with_either_loss(tied: bool) -> None:
    """Loss and every parameter's gradient, tied head included, through the whole model."""
    tokens = torch.randint(0, 300, (3, 41), generator=torch.Generator().manual_seed(1))
    grads = {}
    for impl in ("full", "chunked"):
        torch.manual_seed(0)
        model = Transformer(tiny(loss_impl=impl, loss_chunk_tokens=50, tie_embeddings=tied))
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        grads[impl] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["chunked"][0], grads["full"][0])
    for name, g in grads["full"][1].items():
        torch.testing.assert_close(grads["chunked"][1][name], g, rtol=1e-5, atol=1e-7)


def test_the_vocabulary_is_padded_to_the_multiple() -> None:
    model = Transformer(tiny())  # 300 tokens -> 384 rows
    assert model.embed_tokens.weight.shape[0] == model.lm_head.weight.shape[0] == 384
    tokens = torch.randint(0, 300, (2, 9))
    assert model(tokens).shape == (2, 9, 300)  # no logits for ids no tokenizer has
    assert Transformer(tiny(vocab_multiple=1)).lm_head.weight.shape[0] == 300
    assert tiny(vocab_multiple=64).padded_vocab == 320
    with pytest.raises(ValueError, match=r"model\.vocab_multiple=0"):
        Transformer(tiny(vocab_multiple=0))


@pytest.mark.gpu
@requires_gpu
def test_chunked_loss_on_gpu_in_bf16_matches_and_needs_less_memory() -> None:
    """On CUDA in bf16: as close to fp32 as the full loss, and a far smaller peak (the full
    one holds the (N, V) fp32 logits, their log-softmax and gradients)."""
    n, d, V = 8192, 256, 32768
    reference = loss_and_grads(*head_case(torch.float32, n, d, V), "full")
    peaks, results = {}, {}
    for impl in ("full", "chunked"):
        x, w, t = (a.detach().cuda() for a in head_case(torch.bfloat16, n, d, V))
        x.requires_grad_(), w.requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        results[impl] = [r.cpu() for r in loss_and_grads(x, w, t, impl, chunk=1024)]
        peaks[impl] = torch.cuda.max_memory_allocated() - base
    for ref, a, b in zip(reference, results["full"], results["chunked"], strict=True):
        err_full = (a - ref).abs().max() / ref.abs().max()
        err_chunked = (b - ref).abs().max() / ref.abs().max()
        assert err_chunked <= 1.5 * err_full + 1e-3, (err_chunked, err_full)
    assert peaks["full"] >= 8 * n * V  # fp32 log-probabilities and their fp32 gradient at least
    assert peaks["chunked"] < peaks["full"] / 4, peaks


@pytest.mark.parametrize("impl", ["full", "chunked"])
def test_a_batch_with_no_counted_target_has_loss_zero_not_nan(impl: str) -> None:
    """A fine-tuning slice of prompts and padding only (data=sft): nothing to learn, and no
    NaN for the trainer to take for a diverged step."""
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    targets = torch.full((6,), IGNORE_INDEX)
    loss = linear_cross_entropy(x, w, targets, impl)
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any() and not w.grad.any()
