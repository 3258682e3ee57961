"""A trained model and its tokenizer for evaluation and generation, from a run dir, a
`checkpoints/step_N` dir (ZeRO shards of any stage, consolidated on CPU) or a Hugging Face
Llama directory (ours, exported, or any `LlamaForCausalLM` without RoPE scaling)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import manager
from pretrain.checkpoint.export import (
    TOKENIZER_FILE,
    consolidated_state_dict,
    find_checkpoint,
    load_hf_weights,
    model_fields_from_hf,
)
from pretrain.model.llama import LlamaConfig, Transformer, saved_model_fields


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Any | None
    """A `tokenizers.Tokenizer`, or None when the source carries none."""
    source: Path
    """The checkpoint or HF directory the weights came from."""


def pick_device(device: str = "auto") -> str:
    """auto: cuda when a GPU is there, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(path: str | Path, device: str = "auto", dtype: torch.dtype | None = None) -> Loaded:
    """The model at `path` in eval mode on `device` (auto: a GPU if there is one), in `dtype`
    (default bf16 on a GPU, fp32 on CPU); errors name the path and the fix."""
    device = pick_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # consolidating ZeRO shards runs on CPU
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a run dir, a step_N dir or an HF dir")
    if (path / "config.json").is_file():
        fields = model_fields_from_hf(json.loads((path / "config.json").read_text()))
        model = _build(fields)
        load_hf_weights(model, path, fields)
        source = path
    else:
        source = find_checkpoint(path)
        fields = saved_model_fields(manager.read_client_state(source)["config"]["model"])
        if fields.get("_target_") != "pretrain.model.llama.Transformer":
            raise ValueError(f"{source} holds a {fields.get('_target_')}: only Llama models load")
        model = _build(fields)
        model.load_state_dict(consolidated_state_dict(source))
    tokenizer = None
    if (source / TOKENIZER_FILE).is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(source / TOKENIZER_FILE))
    return Loaded(model.to(device=device, dtype=dtype).eval(), tokenizer, source)


def _build(fields: dict[str, Any]) -> Transformer:
    known = {k: v for k, v in fields.items() if k in LlamaConfig.__dataclass_fields__}
    known["attn_impl"] = (
        "sdpa" if known.get("attn_impl") == "flash" else known.get("attn_impl", "auto")
    )
    return Transformer(LlamaConfig(**known))
