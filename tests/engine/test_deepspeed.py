"""engine/deepspeed.py's checks on what the config asks of the built model."""

from __future__ import annotations

import pytest

from pretrain.config.resolve import ConfigError
from pretrain.engine.deepspeed import check_leaf_modules
from pretrain.model.baselines import LSTMLM
from pretrain.model.llama import LlamaConfig, Transformer


def test_leaf_modules_must_name_a_class_of_the_model() -> None:
    model = Transformer(LlamaConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2,
                                    n_kv_heads=1, ffn_hidden=32, max_seq_len=16))  # fmt: skip
    check_leaf_modules(model, ["Block"])
    check_leaf_modules(model, ["pretrain.model.llama.Block", "MLP"])  # qualified, or a part
    check_leaf_modules(model, [])
    with pytest.raises(ConfigError, match=r"\['Blok'\] name no module class of this model "
                                          r"\(Attention, Block, "):  # fmt: skip
        check_leaf_modules(model, ["Block", "Blok"])


def test_the_default_leaf_is_optional_for_a_model_without_blocks() -> None:
    model = LSTMLM(vocab_size=32, d_model=8, n_layers=1)
    check_leaf_modules(model, ["Block"])  # the default: nothing to group, no error
    with pytest.raises(ConfigError, match="LSTM"):
        check_leaf_modules(model, ["Block", "Transformer"])
