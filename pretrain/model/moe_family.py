"""The sparse Llama (model/moe_model.py) as a `ModelFamily`: built, checked, parallelized and
costed like the Llama family, with active-parameter FLOPs, and exported as transformers'
Qwen3-MoE, OLMoE or Mixtral (model/moe_hf.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from pretrain.model.expert_parallel import ExpertShard, expert_parallel_errors
from pretrain.model.flops import flops_per_token
from pretrain.model.llama_family import LlamaFamily
from pretrain.model.moe_hf import MoEHF
from pretrain.model.moe_model import MoETransformer, moe_config, update_router_bias
from pretrain.model.sequence import SequenceShard


class MoEFamily(LlamaFamily):
    """model=moe_tiny | moe_1b | olmoe_1b_7b | qwen3_30b_a3b."""

    target = "pretrain.model.moe_model.MoETransformer"
    shape_keys = (*LlamaFamily.shape_keys, "n_experts", "moe_ffn_hidden", "moe_every",
                  "shared_expert_hidden")  # fmt: skip
    hf = MoEHF()

    def build(self, fields: Mapping[str, Any], expert: ExpertShard | None = None) -> nn.Module:
        return MoETransformer(moe_config(fields), expert=expert)

    def expert_errors(self, fields: Mapping[str, Any], size: int) -> list[str]:
        return expert_parallel_errors(moe_config(fields).n_experts, size)

    def errors(self, fields: Mapping[str, Any]) -> list[str]:
        return moe_config(fields).errors()

    def flops_per_token(self, fields: Mapping[str, Any], seq_len: int) -> float | None:
        return flops_per_token(moe_config(fields), seq_len)

    def sequence_errors(self, fields: Mapping[str, Any], size: int, seq_len: int) -> list[str]:
        errors = super().sequence_errors(fields, size, seq_len)
        if moe_config(fields).capacity_factor > 0:
            errors.append(f"model.capacity_factor with parallel.sequence={size}: each rank "
                          "would drop over capacity within its slice of the sequences, not "
                          "the micro-batch's, unlike one rank; set model.capacity_factor=0 "
                          "(no dropping, the default) or parallel.sequence=1")  # fmt: skip
        return errors

    def parallelize(
        self, model: nn.Module, activation_checkpointing: str, compile: bool, zero3: bool,
        sequence: SequenceShard | None = None,
    ) -> None:  # fmt: skip
        """The Llama family's, and under sequence parallelism the load-balancing loss pools
        the sequence group's tokens (model/moe.py `load_balancing_loss`)."""
        super().parallelize(model, activation_checkpointing, compile, zero3, sequence)
        assert isinstance(model, MoETransformer)
        model.sequence_group = None if sequence is None else sequence.group

    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        assert isinstance(model, MoETransformer)
        return model.moe_metrics()

    def after_step(self, model: nn.Module, stepped: bool) -> None:
        assert isinstance(model, MoETransformer)
        update_router_bias(model, stepped)


MOE = MoEFamily()
