"""What the compression tools ask of a Hugging Face config before any work: a model type
whose weight matrices are all linear layers, and the input size of each kind of layer
(int4 groups and 2:4 runs must divide them)."""

from __future__ import annotations

from typing import Any

MODEL_TYPES = ("llama",)
"""Model types whose every weight matrix outside the embeddings and head is an nn.Linear."""


def model_type_errors(config: dict[str, Any], what: str) -> list[str]:
    """A model whose weight matrices are not all linear layers (a mixture of experts keeps
    its experts fused in 3-D tensors) would be compressed in part, unreported: refused."""
    model_type = config.get("model_type")
    if model_type in MODEL_TYPES:
        return []
    return [f"model_type {model_type!r}: only {', '.join(MODEL_TYPES)} models are {what} here "
            "(a mixture of experts holds its experts in fused 3-D tensors, not linear layers: "
            "they would stay as they are, unreported)"]  # fmt: skip


def linear_inputs(config: dict[str, Any]) -> dict[str, int]:
    """The input size of each kind of linear layer of a Llama config."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return {
        "hidden_size (q/k/v, gate/up projections)": config["hidden_size"],
        "num_attention_heads x head_dim (o_proj)": config["num_attention_heads"] * head_dim,
        "intermediate_size (down_proj)": config["intermediate_size"],
    }


def request_errors(
    config: dict[str, Any], flag: str, value: str, choices: tuple[str, ...], what: str
) -> list[str]:
    """The checks both tools start with: `value` of `flag` one of `choices`, and a model
    type they can handle."""
    if value not in choices:
        return [f"{flag} {value}: choose one of {', '.join(choices)}"]
    return model_type_errors(config, what)
