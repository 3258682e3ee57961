"""The seeds' baseline language models, behind the same interface as the Transformer.

`forward(tokens)` gives logits (B, T, V); `forward(tokens, targets)` the mean cross-entropy.
They train through the same loop and configs (`model=lstm`, `model=transformer_encoder`), so
a researcher can put a modern Llama next to the classic recipes on equal terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model.family import PlainFamily


def _lm_output(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    if targets is None:
        return logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class LSTMLM(nn.Module):
    """Embedding -> multi-layer LSTM -> linear, the classic recurrent LM (Zaremba et al. 2014)."""

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 64,
        n_layers: int = 2,
        dropout: float = 0.0,
        tie_embeddings: bool = False,
        max_seq_len: int = 2048,
    ) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.lstm = nn.LSTM(
            d_model, d_model, n_layers, batch_first=True, dropout=dropout if n_layers > 1 else 0.0
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, vocab_size)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        x = self.dropout(self.embed(tokens))  # (B, T, d_model)
        x, _ = self.lstm(x)  # (B, T, d_model)
        return _lm_output(self.head(self.dropout(x)), targets)  # logits: (B, T, V)


class TransformerEncoderLM(nn.Module):
    """Causal `nn.TransformerEncoder` with learned positions: the 2017-style Transformer LM."""

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        ffn_hidden: int = 256,
        dropout: float = 0.0,
        max_seq_len: int = 2048,
        tie_embeddings: bool = False,
    ) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_seq_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, ffn_hidden, dropout, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        T = tokens.size(1)
        if self.max_seq_len < T:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.max_seq_len}")
        positions = torch.arange(T, device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)  # (B, T, d_model)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=tokens.device)
        x = self.encoder(x, mask=mask, is_causal=True)  # (B, T, d_model)
        return _lm_output(self.head(self.norm(x)), targets)  # logits: (B, T, V)


_SHAPE = ("vocab_size", "d_model", "n_layers", "tie_embeddings", "max_seq_len")
LSTM = PlainFamily(f"{__name__}.LSTMLM", _SHAPE)
ENCODER = PlainFamily(f"{__name__}.TransformerEncoderLM", (*_SHAPE, "n_heads", "ffn_hidden"))
