"""The sparse Llama (model/moe_model.py) <-> transformers' MoE families, as an `HFAdapter`.

Which family a model exports to follows from its fields, since each family fixes them:

| model.qk_norm | transformers          | also needs                                     |
|---------------|-----------------------|------------------------------------------------|
| head          | Qwen3MoeForCausalLM   | (moe_every: decoder_sparse_step)               |
| full          | OlmoeForCausalLM      | moe_every=1, head_dim = d_model / n_heads      |
| none          | MixtralForCausalLM    | moe_every=1, norm_topk_prob=true               |
| none          | Qwen2MoeForCausalLM   | shared_expert_hidden > 0 (written qkv_bias=false) |

We hold each block's experts fused (`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)), as
transformers 5 does in memory; checkpoints on disk, which transformers 4 and 5, vLLM and
lm-eval read, hold one tensor per expert and projection (`mlp.experts.{e}.gate_proj.weight`,
Mixtral `block_sparse_moe.experts.{e}.w1.weight`). `to_hf` splits, `our_parts` says which
slice of ours each of those tensors sets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from pretrain.model.llama_family import LlamaHF
from pretrain.model.moe_model import MoEConfig, moe_config

TARGET = "pretrain.model.moe_model.MoETransformer"
ARCHITECTURES = {
    "head": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "full": ("olmoe", "OlmoeForCausalLM"),
    "none": ("mixtral", "MixtralForCausalLM"),
}
SHARED = ("qwen2_moe", "Qwen2MoeForCausalLM")
"""The family of a model with a shared expert (it has no QK-norm)."""
QK_NORM_OF = {model_type: qk for qk, (model_type, _) in [*ARCHITECTURES.items(),
                                                         ("none", SHARED)]}  # fmt: skip
# Per expert: our fused tensor, the rows of it (None: all), each family's name.
EXPERT_PIECES = {
    "gate": ("gate_up_proj", 0, {"mixtral": "w1", "default": "gate_proj"}),
    "up": ("gate_up_proj", 1, {"mixtral": "w3", "default": "up_proj"}),
    "down": ("down_proj", None, {"mixtral": "w2", "default": "down_proj"}),
}
# Keys a config.json may leave out, with transformers' default (None: must be given).
HF_DEFAULTS = {"num_experts": None, "num_local_experts": None, "num_experts_per_tok": None,
               "norm_topk_prob": False, "moe_intermediate_size": None,
               "decoder_sparse_step": 1, "shared_expert_intermediate_size": None}  # fmt: skip
_EXPERT = re.compile(
    r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight"
)
_ROUTER = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight")


def architecture(cfg: MoEConfig) -> tuple[str, str]:
    """(model_type, architecture) of the transformers family a model of `cfg` exports to."""
    return SHARED if cfg.shared_expert_hidden else ARCHITECTURES[cfg.qk_norm]


def architecture_errors(cfg: MoEConfig) -> list[str]:
    """Why no transformers family holds a model of `cfg` ([] when one does)."""
    model_type = architecture(cfg)[0]
    errs = []
    if cfg.shared_expert_hidden and cfg.qk_norm != "none":
        errs.append(f"model.shared_expert_hidden={cfg.shared_expert_hidden} with model.qk_norm="
                    f"{cfg.qk_norm}: Qwen2-MoE, the family with a shared expert, has no "
                    "QK-norm (set model.qk_norm=none, or shared_expert_hidden=0)")  # fmt: skip
    if cfg.router_bias_rate > 0:
        errs.append(f"model.router_bias_rate={cfg.router_bias_rate}: the routers learned a "
                    f"bias that transformers' {model_type} has no place for (its experts "
                    "would be chosen differently); train with model.router_bias_rate=0 to "
                    "export")  # fmt: skip
    if model_type in ("olmoe", "mixtral") and cfg.moe_every != 1:
        errs.append(f"model.moe_every={cfg.moe_every}: {model_type} makes every block "
                    "sparse (set 1, or model.qk_norm=head for Qwen3-MoE, which has dense "
                    "blocks)")  # fmt: skip
    if model_type == "olmoe" and cfg.head_size * cfg.n_heads != cfg.d_model:
        errs.append(f"model.head_dim={cfg.head_size}: OLMoE's QK-norm needs n_heads x head_dim = "
                    f"d_model={cfg.d_model} (or model.qk_norm=head for Qwen3-MoE)")  # fmt: skip
    if model_type == "mixtral" and not cfg.norm_topk_prob:
        errs.append("model.norm_topk_prob=false: Mixtral always renormalises the top-k weights "
                    "(set true, or model.qk_norm=head|full for Qwen3-MoE|OLMoE)")  # fmt: skip
    return errs


class MoEHF:
    """transformers' Qwen3-MoE, OLMoE, Mixtral and Qwen2-MoE (module docstring)."""

    model_types = (*(model_type for model_type, _ in ARCHITECTURES.values()), SHARED[0])
    _dense = LlamaHF()

    def config(self, fields: Mapping[str, Any], dtype: str, special_ids: dict[str, int]
               ) -> dict[str, Any]:  # fmt: skip
        cfg = moe_config(fields)
        errs = architecture_errors(cfg)
        if errs:
            raise ValueError("no Hugging Face family for this model: " + "; ".join(errs))
        model_type, arch = architecture(cfg)
        dense = self._dense.config(_dense_fields(fields), dtype, special_ids)
        out = {**dense, "architectures": [arch], "model_type": model_type,
               "num_experts_per_tok": cfg.top_k, "router_aux_loss_coef": cfg.aux_loss_coef,
               "output_router_logits": False}  # fmt: skip
        if model_type in ("qwen3_moe", "qwen2_moe"):
            out.update(num_experts=cfg.n_experts, moe_intermediate_size=cfg.moe_ffn_hidden,
                       decoder_sparse_step=cfg.moe_every, mlp_only_layers=[],
                       norm_topk_prob=cfg.norm_topk_prob, use_sliding_window=False,
                       sliding_window=None)  # fmt: skip
            if model_type == "qwen2_moe":
                out.update(shared_expert_intermediate_size=cfg.shared_expert_hidden,
                           qkv_bias=False)  # fmt: skip
        elif model_type == "olmoe":
            out.update(num_experts=cfg.n_experts, intermediate_size=cfg.moe_ffn_hidden,
                       norm_topk_prob=cfg.norm_topk_prob, clip_qkv=None)  # fmt: skip
        else:
            out.update(num_local_experts=cfg.n_experts, intermediate_size=cfg.moe_ffn_hidden,
                       sliding_window=None)  # fmt: skip
        return out

    def to_hf(self, state: dict[str, torch.Tensor], fields: Mapping[str, Any]
              ) -> dict[str, torch.Tensor]:  # fmt: skip
        """The dense part as Llama's; each fused expert tensor split per expert."""
        model_type = architecture(moe_config(fields))[0]
        out = {}
        for name, tensor in self._dense.to_hf(state, fields).items():
            layer, _, rest = name.removeprefix("model.layers.").partition(".mlp.")
            if not rest or (rest == "gate.weight" and model_type != "mixtral"):
                out[name] = tensor
            elif rest == "gate.weight":
                out[f"model.layers.{layer}.block_sparse_moe.gate.weight"] = tensor
            elif rest.startswith("experts."):
                out.update(self._split(int(layer), rest.removeprefix("experts."), tensor,
                                       model_type))  # fmt: skip
            else:  # a dense block's MLP (Qwen3-MoE)
                out[name] = tensor
        return out

    @staticmethod
    def _split(layer: int, fused: str, tensor: torch.Tensor, model_type: str
               ) -> dict[str, torch.Tensor]:  # fmt: skip
        prefix = "block_sparse_moe" if model_type == "mixtral" else "mlp"
        out = {}
        for fused_name, half, names in EXPERT_PIECES.values():
            if fused_name != fused:
                continue
            hf = names.get(model_type, names["default"])
            for e in range(tensor.size(0)):
                part = tensor[e] if half is None else tensor[e].chunk(2, dim=0)[half]
                out[f"model.layers.{layer}.{prefix}.experts.{e}.{hf}.weight"] = part
        return out

    def our_parts(self, hf_name: str, fields: Mapping[str, Any]
                  ) -> list[tuple[str, tuple[int | slice, ...]]]:  # fmt: skip
        if m := _EXPERT.fullmatch(hf_name):
            layer, e, proj = int(m[1]), int(m[2]), m[3]
            for fused, half, names in EXPERT_PIECES.values():
                if proj in names.values():
                    width = moe_config(fields).moe_ffn_hidden
                    rows = () if half is None else (slice(half * width, (half + 1) * width),)
                    return [(f"layers.{layer}.mlp.experts.{fused}", (e, *rows))]
            return []
        if m := _ROUTER.fullmatch(hf_name):
            return [(f"layers.{m[1]}.mlp.gate.weight", ())]
        return self._dense.our_parts(hf_name, fields)

    def fields_from_hf(self, config: dict[str, Any]) -> dict[str, Any]:
        model_type = config.get("model_type")
        if model_type not in QK_NORM_OF:
            raise ValueError(f"model_type {model_type!r}: the MoE family reads "
                             f"{', '.join(self.model_types)}")  # fmt: skip
        dense = self._dense.fields_from_hf({**config, "model_type": "llama"})
        sparse = {
            "_target_": TARGET,
            "qk_norm": QK_NORM_OF[model_type],
            "n_experts": config.get("num_experts") or config.get("num_local_experts"),
            "top_k": config["num_experts_per_tok"],
            "norm_topk_prob": bool(config.get("norm_topk_prob", model_type == "mixtral")),
            "aux_loss_coef": config.get("router_aux_loss_coef", 0.001),
            "moe_every": config.get("decoder_sparse_step", 1),
            "moe_ffn_hidden": config.get("moe_intermediate_size", config["intermediate_size"]),
            "shared_expert_hidden": (
                config.get("shared_expert_intermediate_size", 0) if model_type == SHARED[0] else 0
            ),
        }
        return {**dense, **sparse}

    def mismatches(self, config: dict[str, Any], fields: Mapping[str, Any]) -> list[str]:
        model_type = config.get("model_type")
        if model_type not in QK_NORM_OF:
            return [f"model_type: {model_type!r}, not one of {', '.join(self.model_types)}"]
        try:
            ours = self.config(fields, "float32", {})
        except ValueError as e:
            return [str(e)]
        if ours["model_type"] != model_type:
            return [f"model_type: checkpoint has {model_type!r}, model.qk_norm="
                    f"{fields.get('qk_norm', 'none')} makes {ours['model_type']!r}"]  # fmt: skip
        diff = [f"{k}: checkpoint has {config.get(k, d)!r}, model has {ours[k]!r}"
                for k, d in HF_DEFAULTS.items()
                if k in ours and config.get(k, ours[k] if d is None else d) != ours[k]]  # fmt: skip
        if config.get("mlp_only_layers"):
            diff.append(f"mlp_only_layers={config['mlp_only_layers']}: not supported (dense "
                        "blocks come from model.moe_every alone)")  # fmt: skip
        if model_type == SHARED[0] and config.get("qkv_bias", True):
            diff.append("qkv_bias=true: its q, k and v projections have biases, which this "
                        "model has no place for")  # fmt: skip
        if config.get("sliding_window") and config.get("use_sliding_window", True):
            diff.append(f"sliding_window={config['sliding_window']}: not supported")
        dense = {**config, "model_type": "llama"}
        if model_type in ("olmoe", "mixtral"):  # their intermediate_size is the experts'
            dense["intermediate_size"] = moe_config(fields).ffn_hidden
        return diff + self._dense.mismatches(dense, _dense_fields(fields))


def _dense_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The fields as Llama's adapter reads them (the QK-norm is ours to export)."""
    return {**fields, "qk_norm": "none"}
