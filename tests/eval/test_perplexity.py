"""Held-out loss: the mean over every target token, with the training state left as found."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.data.synthetic import SyntheticStream
from pretrain.eval.perplexity import Evaluator, evaluate, model_loss
from pretrain.model import LlamaConfig, Transformer


def tiny() -> Transformer:
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=64,
                      max_seq_len=16, dropout=0.5)  # fmt: skip
    return Transformer(cfg)


def val_stream() -> SyntheticStream:
    return SyntheticStream(64, seq_len=16, micro_batch_size=3, grad_accum=1, seed=7, split="val")


def test_loss_is_the_token_mean_and_the_model_and_rng_are_left_as_found() -> None:
    """Evaluation scores with the training loss itself (over the padded table: 64 ids in
    128 rows here), the mean over tokens, and leaves mode and RNG as it found them."""
    model = tiny().train()
    assert model.config.padded_vocab > model.config.vocab_size
    batches = [next(val_stream()) for _ in range(1)]  # the stream's first batch
    stream = val_stream()
    expected = []
    with torch.no_grad():
        model.eval()
        for _ in range(4):
            b = next(stream)
            expected.append(model(b[:, :-1], b[:, 1:]))  # the training loss: one loss
        model.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    out = evaluate(model_loss(model), val_stream(), n_batches=4, device=torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)  # training's random stream is untouched
    assert model.training  # dropout back on
    mean = torch.stack(expected).mean().item()  # equal batches: the mean of batch means
    assert out["val_loss"] == pytest.approx(mean, rel=1e-6)
    assert out["val_ppl"] == pytest.approx(math.exp(mean), rel=1e-6)
    assert out["val_tokens"] == 4 * 3 * 16
    assert batches[0].shape == (3, 17)


def test_every_evaluation_scores_the_same_batches() -> None:
    model = tiny()
    sets = {"val": val_stream, "val_again": val_stream}
    evaluator = Evaluator(model_loss(model), sets, n_batches=2, device=torch.device("cpu"))
    first = evaluator()
    assert first == evaluator()
    assert first["val_again_loss"] == first["val_loss"] and first["val_tokens"] == 2 * 3 * 16


def test_val_split_holds_other_samples_than_train() -> None:
    train = SyntheticStream(64, 16, 3, 1, seed=7)
    assert not torch.equal(next(train), next(val_stream()))
    with pytest.raises(ValueError, match="split='test': choose train or val"):
        SyntheticStream(64, 16, 3, 1, seed=7, split="test")


def test_ranks_share_the_val_split_by_striding_one_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of 2 ranks keeps every 2nd micro-batch of the whole split: disjoint, complete."""
    from pretrain import dist
    from pretrain.config import resolve
    from pretrain.data.build import build_val_data
    from tests.conftest import TINY, compose_config

    run = resolve(compose_config([*TINY, "trainer.micro_batch_size=2",
                                  "trainer.global_batch_size=4"]), world_size=2)  # fmt: skip
    whole = SyntheticStream(run.vocab_size, 32, 2, 1, seed=run.trainer.seed, split="val")
    reference = [next(whole) for _ in range(6)]
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(dist, "rank", lambda rank=rank: rank)
        stream = build_val_data(run)
        got = [next(stream) for _ in range(3)]
        assert all(torch.equal(g, r) for g, r in zip(got, reference[rank::2], strict=True))


def test_bits_per_byte_from_the_tokenizer(tmp_path) -> None:
    """A BPE's byte table adds up to the text's UTF-8 length; with one byte per token,
    bits per byte is the loss in bits."""
    from pretrain.data.tokenizer import byte_tokenizer, token_byte_lengths, train_bpe

    text = "def naïve(x):\n    return x * 2  # ünïcode ✓\n" * 20
    bpe = train_bpe([text], vocab_size=300)
    table = token_byte_lengths(bpe, 320)
    ids = bpe.encode(text).ids
    assert sum(table[i] for i in ids) == len(text.encode("utf-8"))
    assert table[bpe.token_to_id("<|eos|>")] == 0 and table[310] == 0  # special, past vocab

    byte_table = torch.tensor(token_byte_lengths(byte_tokenizer(), 64), dtype=torch.float64)
    out = evaluate(model_loss(tiny()), val_stream(), 2, torch.device("cpu"), byte_table)
    assert out["val_bpb"] == pytest.approx(out["val_loss"] / math.log(2))
