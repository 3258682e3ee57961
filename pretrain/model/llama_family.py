"""The Llama-style Transformer as a `ModelFamily` (model/family.py), with transformers'
`LlamaForCausalLM` as its `HFAdapter`: config.json both ways, parameter names, the padded
vocabulary tables, tied embeddings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pretrain.model.expert_parallel import ExpertShard
from pretrain.model.family import no_experts_error
from pretrain.model.flops import flops_per_token
from pretrain.model.llama import LlamaConfig, Transformer, pad_vocab
from pretrain.model.parallelize import checkpoint_activations, compile_block
from pretrain.model.sequence import SequenceShard, UlyssesAttention, kv_heads_error

VOCAB_TABLES = ("embed_tokens.weight", "lm_head.weight")


def llama_config(fields: Mapping[str, Any]) -> LlamaConfig:
    """The LlamaConfig of a model section (keys that are not its fields are left out)."""
    return LlamaConfig(**{k: v for k, v in fields.items() if k in LlamaConfig.__dataclass_fields__})


class LlamaHF:
    """transformers' LlamaForCausalLM (no RoPE scaling): what vLLM, lm-eval and
    transformers read."""

    model_types = ("llama",)

    def config(self, fields: Mapping[str, Any], dtype: str, special_ids: dict[str, int]
               ) -> dict[str, Any]:  # fmt: skip
        cfg = llama_config(fields)
        if cfg.qk_norm != "none":
            raise ValueError(f"model.qk_norm={cfg.qk_norm}: transformers' LlamaForCausalLM has "
                             "no QK-norm, so this model has no Llama export (the MoE family "
                             "exports QK-norm as Qwen3-MoE or OLMoE)")  # fmt: skip
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": cfg.vocab_size,  # the export drops the tables' padding rows
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ffn_hidden,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_size,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": cfg.tie_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": cfg.init_std,
            "torch_dtype": dtype,
            "use_cache": True,
            **special_ids,
        }

    def to_hf(self, state: dict[str, torch.Tensor], fields: Mapping[str, Any]
              ) -> dict[str, torch.Tensor]:  # fmt: skip
        """HF names; the vocabulary tables cut to vocab_size rows (model.vocab_multiple's
        padding is for our training speed: HF tools would otherwise see ids no tokenizer
        has); a tied head once, as the embedding."""
        vocab_size = llama_config(fields).vocab_size
        out = {}
        for k, v in state.items():
            if k in VOCAB_TABLES:
                v = v[:vocab_size]
            out[k if k.startswith("lm_head.") else f"model.{k}"] = v
        if fields.get("tie_embeddings"):
            out.pop("lm_head.weight", None)
        return out

    def fields_from_hf(self, config: dict[str, Any]) -> dict[str, Any]:
        if config.get("model_type") != "llama":
            raise ValueError(
                f"model_type {config.get('model_type')!r}: only Llama models load here"
            )
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        heads = config["num_attention_heads"]
        return {
            "_target_": LLAMA.target,
            "n_layers": config["num_hidden_layers"],
            "d_model": config["hidden_size"],
            "n_heads": heads,
            "n_kv_heads": config.get("num_key_value_heads") or heads,
            # None where it is the default width, so the section reads as ours would
            "head_dim": None
            if config.get("head_dim") in (None, config["hidden_size"] // heads)
            else config["head_dim"],
            "ffn_hidden": config["intermediate_size"],
            "vocab_size": config["vocab_size"],
            "vocab_multiple": 1,  # the tables exactly as they are
            "max_seq_len": config.get("max_position_embeddings", 2048),
            "rope_theta": config.get("rope_theta", rope.get("rope_theta", 10000.0)),
            "norm_eps": config.get("rms_norm_eps", 1e-6),
            "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        }

    def mismatches(self, config: dict[str, Any], fields: Mapping[str, Any]) -> list[str]:
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        defaults = {  # transformers' LlamaConfig defaults, for keys a config.json may omit
            "num_key_value_heads": config.get("num_attention_heads"),
            "head_dim": config.get("hidden_size", 0)
            // max(config.get("num_attention_heads", 1), 1),
            "rope_theta": rope.get("rope_theta", 10000.0),
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        }
        ours = self.config(fields, "float32", {})
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "rope_theta", "tie_word_embeddings")  # fmt: skip
        diff = [f"{k}: checkpoint has {config.get(k, defaults.get(k))!r}, model has {ours[k]!r}"
                for k in keys if config.get(k, defaults.get(k)) != ours[k]]  # fmt: skip
        if config.get("model_type") != "llama":
            diff.insert(0, f"model_type: {config.get('model_type')!r}, not 'llama'")
        if rope.get("rope_type", "default") != "default":
            diff.append(f"RoPE scaling {rope.get('rope_type')!r}: not supported")
        return diff

    def our_parts(self, hf_name: str, fields: Mapping[str, Any]
                  ) -> list[tuple[str, tuple[int | slice, ...]]]:  # fmt: skip
        name = hf_name.removeprefix("model.")
        if fields.get("tie_embeddings") and name == "embed_tokens.weight":
            return [(name, ()), ("lm_head.weight", ())]
        return [(name, ())]


class LlamaFamily:
    """model=tiny | llama_125m | llama_1b | llama_7b | llama_70b."""

    target = "pretrain.model.llama.Transformer"
    shape_keys = (
        "_target_", "n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size",
        "tie_embeddings", "rope_theta", "norm_eps", "max_seq_len", "head_dim", "qk_norm",
    )  # fmt: skip
    hf = LlamaHF()
    block = "Block"

    def build(self, fields: Mapping[str, Any], expert: ExpertShard | None = None) -> nn.Module:
        assert expert is None, "expert_errors refuses expert parallelism"
        return Transformer(llama_config(fields))

    def errors(self, fields: Mapping[str, Any]) -> list[str]:
        return llama_config(fields).errors()

    def table_rows(self, fields: Mapping[str, Any]) -> int:
        return pad_vocab(int(fields.get("vocab_size", 0)), int(fields.get("vocab_multiple", 1)))

    def saved_fields(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Checkpoints from before model.vocab_multiple existed had tables of exactly
        vocab_size rows: for them it is 1."""
        return {"vocab_multiple": 1, **fields}

    def sequence_errors(self, fields: Mapping[str, Any], size: int, seq_len: int) -> list[str]:
        cfg = llama_config(fields)
        errs = [e for e in [kv_heads_error(cfg.n_heads, cfg.n_kv_heads, size)] if e]
        if seq_len % size:
            errs.append(f"trainer.seq_len={seq_len} is not divisible by parallel.sequence="
                        f"{size}: each rank holds seq_len / sequence positions")  # fmt: skip
        return errs

    def expert_errors(self, fields: Mapping[str, Any], size: int) -> list[str]:
        return [no_experts_error(self.target, size)]

    def parallelize(
        self, model: nn.Module, activation_checkpointing: str, compile: bool, zero3: bool,
        sequence: SequenceShard | None = None,
    ) -> None:  # fmt: skip
        """Per block: Ulysses attention for a sequence group, checkpointing, then compile
        (so the compiled forward recomputes); the chunked loss's softmax gradient fused too
        when compiling."""
        assert isinstance(model, Transformer)
        for block in model.layers:
            if sequence is not None:
                attn = block.self_attn
                attn.attend = UlyssesAttention(attn.attend, sequence)
            if activation_checkpointing != "none":
                checkpoint_activations(block, activation_checkpointing)
            if compile:
                compile_block(block, zero3)
        if compile:
            model.lm_head.compile_loss = True

    def flops_per_token(self, fields: Mapping[str, Any], seq_len: int) -> float | None:
        return flops_per_token(llama_config(fields), seq_len)

    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        return {}

    def after_step(self, model: nn.Module, stepped: bool) -> None:
        return None


LLAMA = LlamaFamily()
