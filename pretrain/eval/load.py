"""A trained model and its tokenizer for evaluation and generation, from a run dir, a
`checkpoints/step_N` dir (ZeRO shards of any stage, consolidated on CPU) or a Hugging Face
directory of a family with an `HFAdapter` (ours exported, or any `LlamaForCausalLM` without
RoPE scaling)."""

from __future__ import annotations

import json
import os
import tempfile
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
)
from pretrain.data.chat import own_template
from pretrain.model.family import family_of, family_of_hf, model_fields


@dataclass
class Loaded:
    model: torch.nn.Module
    """In eval mode: `model(tokens)` gives logits, `model(tokens, targets)` the mean loss
    (the Llama Transformer also takes a KV cache, for generation)."""
    tokenizer: Any | None
    """A `tokenizers.Tokenizer`, or None when the source carries none."""
    source: Path
    """The checkpoint or HF directory the weights came from."""
    chat_template: str | None = None
    """The chat template a fine-tuned model was trained with (data=sft), or None."""


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
        config = json.loads((path / "config.json").read_text())
        fields = family_of_hf(config).hf.fields_from_hf(config)
        model = _build(fields)
        if "quantization_config" in config:  # tools/quantize.py's
            with tempfile.TemporaryDirectory() as scratch:
                load_hf_weights(model, dequantized(path, Path(scratch)), fields)
        else:
            load_hf_weights(model, path, fields)
        source = path
    else:
        source = find_checkpoint(path)
        saved = manager.read_client_state(source)["config"]["model"]
        family = family_of(saved)
        if family.hf is None:
            raise ValueError(
                f"{source} holds a {saved.get('_target_')}: only models with a Hugging Face "
                "counterpart (the Llama Transformer) load here"
            )
        model = _build(family.saved_fields(saved))
        model.load_state_dict(consolidated_state_dict(source))
    tokenizer = None
    if (source / TOKENIZER_FILE).is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(source / TOKENIZER_FILE))
    return Loaded(model.to(device=device, dtype=dtype).eval(), tokenizer, source,
                  own_template(source))  # fmt: skip


def dequantized(hf_dir: Path, scratch: Path) -> Path:
    """A quantised directory (torchao, through transformers) as plain weights under
    `scratch`: each quantised weight dequantised, so our model computes with the values the
    quantised one multiplies by."""
    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError as e:
        raise ValueError(
            f"{hf_dir} is quantised with torchao, which is not installed ({e}): "
            "pip install -e '.[quant]'"
        ) from None
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    # Copies: tied embeddings are one tensor under two names, which safetensors refuses.
    state = {name: t.dequantize() if isinstance(t, TorchAOBaseTensor) else t.detach().clone()
             for name, t in hf.state_dict().items()}  # fmt: skip
    save_file(state, scratch / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("quantization_config")
    (scratch / "config.json").write_text(json.dumps(config))
    return scratch


def _build(section: dict[str, Any]) -> torch.nn.Module:
    """The model of a saved section; a flash-attention kernel becomes sdpa (the weights do
    not depend on it, and evaluation may run where flash-attn is not installed)."""
    fields = model_fields(section)
    if fields.get("attn_impl") == "flash":
        fields["attn_impl"] = "sdpa"
    return family_of(section).build(fields)
