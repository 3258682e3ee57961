"""Attention that stays inside each document of a packed window (model.document_mask): every
backend scores a packed window exactly as it scores each document on its own."""

from __future__ import annotations

import pytest
import torch

from pretrain.model import LlamaConfig, Transformer
from pretrain.model.documents import (
    cu_seqlens,
    document_ids,
    document_mask,
    positions_in_documents,
)
from tests.conftest import requires_gpu

EOS = 1


def test_ids_positions_and_the_mask_of_a_packed_window() -> None:
    tokens = torch.tensor([[5, 1, 7, 7, 1, 3], [1, 4, 4, 4, 4, 1]])
    docs = document_ids(tokens, EOS)  # a document keeps its EOS; the next begins after it
    assert docs.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]]
    assert positions_in_documents(docs).tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4]]
    mask = document_mask(docs)[0, 0].int().tolist()
    assert mask[3] == [0, 0, 1, 1, 0, 0] and mask[5] == [0, 0, 0, 0, 0, 1]
    edges, longest = cu_seqlens(docs)  # every (row, document) piece, rows flattened
    assert edges.tolist() == [0, 2, 5, 6, 7, 12] and longest == 5


def _packed(lengths: list[int], vocab: int, seed: int) -> tuple[torch.Tensor, list[slice]]:
    """One row of documents of `lengths` tokens, each ending with EOS (the last cut short
    by the window, as the loader cuts), and each document's slice."""
    g = torch.Generator().manual_seed(seed)
    pieces, spans, start = [], [], 0
    for n in lengths:
        doc = torch.randint(3, vocab, (n,), generator=g)
        doc[-1] = EOS
        pieces.append(doc)
        spans.append(slice(start, start + n))
        start += n
    row = torch.cat(pieces)[:-2]  # the window ends inside the last document
    spans[-1] = slice(spans[-1].start, len(row))
    return row[None], spans


IMPLS = ["eager", "sdpa", pytest.param("flash", marks=requires_gpu)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("positions", ["reset", "continue"])
def test_each_backend_scores_a_packed_window_as_its_documents_alone(
    impl: str, positions: str
) -> None:
    device = torch.device("cuda" if impl == "flash" else "cpu")
    dtype = torch.bfloat16 if impl == "flash" else torch.float32
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                      vocab_size=101, attn_impl=impl, document_mask=True,
                      document_positions=positions)  # fmt: skip
    model = Transformer(cfg).to(device, dtype).eval()
    row, spans = _packed([7, 12, 1, 9, 10], cfg.vocab_size, seed=1)
    row = row.to(device)
    with torch.no_grad():
        packed = model(row, documents=document_ids(row, EOS))[0]
        for span in spans:
            # On its own: positions from 0, or, continuing, where the window had it.
            start = 0 if positions == "reset" else span.start
            at = torch.arange(start, start + span.stop - span.start, device=device)
            alone = model(row[:, span], positions=at)[0]
            tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
            torch.testing.assert_close(packed[span], alone, **tol)
        plain = Transformer(LlamaConfig(**{**vars(cfg), "document_mask": False}))
        plain.load_state_dict(model.state_dict())
        mixed = plain.to(device, dtype).eval()(row)[0]  # without the mask: documents mix
    assert not torch.allclose(mixed[spans[1]], packed[spans[1]])


def test_the_loss_over_a_packed_window_is_the_documents_loss() -> None:
    """The training loss (chunked, with targets) sees the mask too: the mean over the
    window's targets of what each document alone predicts for them."""
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                      vocab_size=101, vocab_multiple=1, document_mask=True,
                      document_positions="reset", loss_chunk_tokens=5)  # fmt: skip
    model = Transformer(cfg).eval()
    row, spans = _packed([6, 9, 11], cfg.vocab_size, seed=2)
    inputs, targets = row[:, :-1], row[:, 1:]
    with torch.no_grad():
        loss = model(inputs, targets, documents=document_ids(inputs, EOS))
        logits = torch.cat([model(inputs[:, s])[0] for s in _clip(spans, inputs.size(1))])
        expected = torch.nn.functional.cross_entropy(logits, targets[0])
    torch.testing.assert_close(loss, expected)


def _clip(spans: list[slice], n: int) -> list[slice]:
    return [slice(s.start, min(s.stop, n)) for s in spans if s.start < n]
