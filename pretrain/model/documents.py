"""Documents packed into one window (EOS-separated, as the shards hold them): which document
each position belongs to, positions that restart at each document, and the attention mask
that keeps each document to itself (`model.document_mask`, `model.document_positions`).

A document includes its trailing EOS; the position after an EOS begins the next one. So
with the mask, the EOS predicts the next document's first token from its own document
only (that target is kept: it teaches the model what starts a document). With positions
reset too, each document's own predictions are those of the document scored alone, except
a document cut by the window's start, whose positions begin at the cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

POSITION_MODES = ("continue", "reset")


@dataclass(frozen=True)
class DocumentSplit:
    """How the training loop tells a model where packed documents begin and end."""

    eos: int
    """The token id that ends a document (the data's tokenizer's EOS), for batches that do
    not say where their documents are (`data.source.Batch.documents`)."""
    reset: bool
    """Positions restart at each document (model.document_positions=reset)."""

    def ids(self, inputs: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
        """The document of each input position (B, T): `given` (the batch's own), else the
        count of EOS tokens before it."""
        return document_ids(inputs, self.eos) if given is None else given


def document_ids(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """(B, T) -> (B, T): the index, within its row, of the document each position is in
    (the number of EOS tokens before it)."""
    ends = tokens == eos
    return (ends.cumsum(1) - ends.long()).to(torch.int32)


def positions_in_documents(documents: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, T) each position's offset from its document's start (the
    window's first position counts as a start: a document cut by the window begins there)."""
    T = documents.size(1)
    index = torch.arange(T, device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first


def document_mask(documents: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool, True = may attend: causal, and within the
    same document (block-diagonal causal)."""
    T = documents.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=documents.device).tril()
    return (causal & (documents[:, :, None] == documents[:, None, :]))[:, None]


class DocumentLayout:
    """A window's document ids as the attention backends take them, each form built on
    first use and shared by every layer of a forward: the block-diagonal mask (SDPA,
    eager: B x T x T booleans, 1 GiB per row at T = 32K: long windows want flash-attn) or
    flash-attn's varlen index (two host syncs, once per forward)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids
        """(B, T) document ids of the whole sequence attention sees."""
        self._mask: torch.Tensor | None = None
        self._varlen: tuple[torch.Tensor, int] | None = None

    def mask(self) -> torch.Tensor:
        if self._mask is None:
            self._mask = document_mask(self.ids)
        return self._mask

    def varlen(self) -> tuple[torch.Tensor, int]:
        if self._varlen is None:
            self._varlen = cu_seqlens(self.ids)
        return self._varlen


def cu_seqlens(documents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, T) document ids -> flash-attn's varlen index: the cumulative lengths (int32) of
    every (row, document) piece of the flattened B x T tokens, and the longest piece."""
    B, T = documents.shape
    flat = documents.long() + torch.arange(B, device=documents.device)[:, None] * (T + 1)
    flat = flat.reshape(-1)
    starts = torch.nonzero(flat[1:] != flat[:-1]).reshape(-1) + 1
    edges = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), B * T)])
    return edges.to(torch.int32), int((edges[1:] - edges[:-1]).max())
