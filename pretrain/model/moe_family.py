"""The sparse Llama (model/moe_model.py) as a `ModelFamily`: built, checked, parallelized and
costed like the Llama family, with active-parameter FLOPs. No Hugging Face counterpart yet
(issue 23: the Qwen3-MoE/OLMoE export comes next)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from pretrain.model.llama_family import LlamaFamily
from pretrain.model.moe_model import MoEConfig, MoETransformer, moe_flops_per_token


def moe_config(fields: Mapping[str, Any]) -> MoEConfig:
    """The MoEConfig of a model section (keys that are not its fields are left out)."""
    return MoEConfig(**{k: v for k, v in fields.items() if k in MoEConfig.__dataclass_fields__})


class MoEFamily(LlamaFamily):
    """model=moe_tiny."""

    target = "pretrain.model.moe_model.MoETransformer"
    shape_keys = (*LlamaFamily.shape_keys, "n_experts", "moe_ffn_hidden", "moe_every")
    hf = None

    def build(self, fields: Mapping[str, Any]) -> nn.Module:
        return MoETransformer(moe_config(fields))

    def errors(self, fields: Mapping[str, Any]) -> list[str]:
        return moe_config(fields).errors()

    def flops_per_token(self, fields: Mapping[str, Any], seq_len: int) -> float | None:
        return moe_flops_per_token(moe_config(fields), seq_len)

    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        assert isinstance(model, MoETransformer)
        return model.moe_metrics()


MOE = MoEFamily()
