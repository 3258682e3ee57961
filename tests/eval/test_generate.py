"""Generation: the KV-cached decoder equals a naive full-recompute reference, beam search
with one beam equals greedy, and both equal transformers' generate() on the exported model."""

from __future__ import annotations

import pytest
import torch

from pretrain.checkpoint.export import write_hf
from pretrain.eval.generate import (
    GenerationConfig,
    KVDecoder,
    filter_top_k_top_p,
    generate,
    penalize_repeats,
)
from pretrain.model import LlamaConfig, Transformer

PROMPTS = [[5, 9, 2, 7, 30], [11, 3], [60, 61, 62, 1]]


class NaiveDecoder:
    """The reference: every step reruns the model on each row's whole sequence, no cache."""

    def __init__(self, model: Transformer) -> None:
        self.model = model

    @torch.no_grad()
    def _last_logits(self) -> torch.Tensor:
        return torch.stack([self.model(torch.tensor([s]))[0, -1] for s in self.rows]).float()

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        self.rows = [list(p) for p in prompts]
        return self._last_logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        for row, t in zip(self.rows, tokens.tolist(), strict=True):
            row.append(t)
        return self._last_logits()

    def reorder(self, rows: torch.Tensor) -> None:
        self.rows = [list(self.rows[r]) for r in rows.tolist()]


def test_kv_cache_logits_equal_a_full_forward(model: Transformer) -> None:
    """Left-padded prompts of three lengths, then 4 cached steps: each row's logits equal
    running the model on that row's unpadded sequence."""
    decoder = KVDecoder(model, max_new_tokens=4)
    logits = decoder.prefill(PROMPTS)
    rows = [list(p) for p in PROMPTS]
    for _ in range(4):
        with torch.no_grad():
            full = torch.stack([model(torch.tensor([r]))[0, -1] for r in rows])
        torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
        token = logits.argmax(-1)
        for r, t in zip(rows, token.tolist(), strict=True):
            r.append(t)
        logits = decoder.step(token)


@pytest.mark.parametrize("beams", [1, 3])
def test_cached_search_equals_the_naive_reference(model: Transformer, beams: int) -> None:
    cfg = GenerationConfig(max_new_tokens=8, num_beams=beams, length_penalty=0.7,
                           repetition_penalty=1.3)  # fmt: skip
    cached = generate(model, PROMPTS, cfg)
    naive = generate(model, PROMPTS, cfg, decoder=NaiveDecoder(model))
    assert cached == naive
    assert all(len(c) == 8 for c in cached)


def test_one_beam_is_greedy(model: Transformer) -> None:
    greedy = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10))
    assert generate(model, PROMPTS, GenerationConfig(max_new_tokens=10, num_beams=1)) == greedy
    # and beam search with several beams may differ but is deterministic
    beams = GenerationConfig(max_new_tokens=10, num_beams=4)
    assert generate(model, PROMPTS, beams) == generate(model, PROMPTS, beams)


def test_stop_tokens_end_a_row_and_are_left_out(model: Transformer) -> None:
    free = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10))
    stop = free[0][3]  # the 4th token the first row produces
    stopped = generate(model, PROMPTS, GenerationConfig(max_new_tokens=10, stop_tokens=[stop]))
    assert stopped[0] == free[0][: free[0].index(stop)]
    for row, full in zip(stopped, free, strict=True):
        assert stop not in row and full[: len(row)] == row


def test_sampling_is_seeded_and_filters_apply(model: Transformer) -> None:
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, top_k=5, top_p=0.9, seed=3)
    a, b = generate(model, PROMPTS, cfg), generate(model, PROMPTS, cfg)
    assert a == b
    assert a != generate(model, PROMPTS, GenerationConfig(**{**vars(cfg), "seed": 4}))
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [[False, False, True,
                                                                         True, True]]  # fmt: skip
    # softmax = .52 .19 .12 .07 .03 (+...): top_p 0.6 keeps the first two
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.6))[0].tolist() == [False, False, True,
                                                                          True, True]  # fmt: skip
    scores = torch.tensor([[1.0, -1.0, 2.0]])
    out = penalize_repeats(scores, torch.tensor([[1, 2, -1]]), 2.0)
    assert out.tolist() == [[1.0, -2.0, 1.0]]  # token 0 unseen: untouched


def test_bad_settings_are_named(model: Transformer) -> None:
    with pytest.raises(ValueError, match="top_p=0: must be in"):
        generate(model, PROMPTS, GenerationConfig(top_p=0))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=64"):
        generate(model, PROMPTS, GenerationConfig(max_new_tokens=60))


@pytest.fixture(scope="module")
def hf_model(model: Transformer, tmp_path_factory: pytest.TempPathFactory):
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf") / "model"
    fields = {k: v for k, v in vars(model.config).items()}
    write_hf(model.state_dict(), {"_target_": "pretrain.model.llama.Transformer", **fields},
             out, "float32", None)  # fmt: skip
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def hf_generate(hf, prompt: list[int], **kwargs) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("beams", [1, 4])
def test_equals_transformers_generate(model: Transformer, hf_model, beams: int) -> None:
    ours = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12, num_beams=beams,
                                                     length_penalty=1.0))  # fmt: skip
    for prompt, got in zip(PROMPTS, ours, strict=True):
        assert got == hf_generate(hf_model, prompt, max_new_tokens=12, num_beams=beams)


def test_beams_with_a_stop_token_equal_transformers(model: Transformer, hf_model) -> None:
    """A stop token the beams meet early: hypotheses finish at different lengths, and the
    length penalty and early-stopping heuristic decide, as in transformers."""
    free = generate(model, PROMPTS, GenerationConfig(max_new_tokens=12, num_beams=4))
    for lp in (0.0, 2.0):
        for prompt, row in zip(PROMPTS, free, strict=True):
            stop = row[2]
            cfg = GenerationConfig(max_new_tokens=12, num_beams=4, length_penalty=lp,
                                   stop_tokens=[stop])  # fmt: skip
            (ours,) = generate(model, [prompt], cfg)
            kwargs = {"length_penalty": lp, "eos_token_id": stop, "pad_token_id": stop}
            theirs = hf_generate(hf_model, prompt, max_new_tokens=12, num_beams=4, **kwargs)
            theirs = theirs[: theirs.index(stop)] if stop in theirs else theirs
            assert ours == theirs, (lp, prompt)


def test_generate_restores_training_mode() -> None:
    m = Transformer(LlamaConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=40, max_seq_len=32))
    m.train()
    generate(m, [[1, 2]], GenerationConfig(max_new_tokens=2))
    assert m.training


def test_each_new_token_costs_one_position(model: Transformer) -> None:
    """The prompt goes through the model once; every later forward sees one token per row."""
    widths = []
    handle = model.embed_tokens.register_forward_hook(lambda m, i, o: widths.append(i[0].shape))
    try:
        generate(model, PROMPTS, GenerationConfig(max_new_tokens=6))
        assert widths == [(3, 5)] + [(3, 1)] * 5  # 3 prompts left-padded to 5, then 1 each
        widths.clear()
        generate(model, PROMPTS, GenerationConfig(max_new_tokens=6, num_beams=2))
        assert widths == [(6, 5)] + [(6, 1)] * 5  # 3 prompts x 2 beams
    finally:
        handle.remove()
