"""Every model family keeps the ModelFamily contract (model/family.py) that the loop, the
config checks, resume, MFU and export rely on, found by its config's `_target_` alone."""

from __future__ import annotations

import logging

import pytest
import torch

from pretrain.model.family import family_of, family_of_hf, model_fields
from tests.conftest import compose_config

MODELS = ["tiny", "lstm", "transformer_encoder"]


def _section(model: str, *overrides: str) -> dict:
    from omegaconf import OmegaConf

    cfg = compose_config([f"model={model}", *overrides])
    return OmegaConf.to_container(cfg.model, resolve=True)


@pytest.mark.parametrize("model", MODELS)
def test_each_family_builds_a_model_with_the_loop_s_interface(model: str) -> None:
    section = _section(model)
    family = family_of(section)
    fields = model_fields(section)
    assert family.errors(fields) == []
    assert family.target == section["_target_"] and "_target_" in family.shape_keys
    torch.manual_seed(0)
    net = family.build(fields)
    vocab = fields["vocab_size"]
    tokens = torch.randint(0, vocab, (2, 9))
    logits = net(tokens[:, :-1])
    assert logits.shape == (2, 8, vocab)  # the real vocabulary only
    loss = net(tokens[:, :-1], tokens[:, 1:])
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert family.table_rows(fields) >= vocab
    assert family.saved_fields(fields).items() >= fields.items()
    flops = family.flops_per_token(fields, 8)
    assert (flops is None) == (family.hf is None)  # only the Llama family counts FLOPs
    bad = dict(fields, d_model=0)
    assert any("model.d_model=0" in e for e in family.errors(bad))


def test_parallelize_checkpoints_the_transformer_s_blocks_and_warns_on_a_baseline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    section = _section("tiny", "model.dropout=0.0")
    family, fields = family_of(section), model_fields(section)
    tokens = torch.randint(0, fields["vocab_size"], (2, 9))
    torch.manual_seed(0)
    plain, recomputed = family.build(fields), family.build(fields)
    recomputed.load_state_dict(plain.state_dict())
    family.parallelize(recomputed, "full", compile=False, zero3=False)
    losses = []
    for net in (plain, recomputed):
        loss = net(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    assert torch.equal(plain.layers[0].mlp.down_proj.weight.grad,
                       recomputed.layers[0].mlp.down_proj.weight.grad)  # fmt: skip
    assert list(dict(plain.named_parameters())) == list(dict(recomputed.named_parameters()))

    lstm = _section("lstm")
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        family_of(lstm).parallelize(family_of(lstm).build(model_fields(lstm)), "full",
                                    compile=False, zero3=False)  # fmt: skip
    assert "LSTMLM has no such blocks, so they are ignored" in caplog.text


class Bigram(torch.nn.Module):
    """A model class outside the families."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(vocab_size, vocab_size)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.table(tokens)
        if targets is None:
            return logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_a_class_outside_the_families_is_plain_and_a_missing_one_is_named() -> None:
    family = family_of({"_target_": f"{__name__}.Bigram"})
    assert family.hf is None and family.block is None
    model = family.build({"vocab_size": 16})
    assert isinstance(model, Bigram) and family.table_rows({"vocab_size": 16}) == 16
    assert family.flops_per_token({"vocab_size": 16}, 8) is None
    with pytest.raises(ValueError, match=r"model\._target_='my\.Model' names no model class.*"
                                         r"pretrain\.model\.llama\.Transformer"):  # fmt: skip
        family_of({"_target_": "my.Model"})
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        family_of_hf({"model_type": "gpt2"})
    assert family_of_hf({"model_type": "llama"}).hf is not None
