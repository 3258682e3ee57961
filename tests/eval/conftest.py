"""The generation tests' model."""

from __future__ import annotations

import pytest
import torch

from pretrain.model import LlamaConfig, Transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    # A wider init than training's keeps the logits apart, so no argmax is a near tie.
    cfg = LlamaConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=96,
                      max_seq_len=64, init_std=0.15)  # fmt: skip
    return Transformer(cfg).eval()
