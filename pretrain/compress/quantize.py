"""Weight-only quantisation with torchao, through transformers' `TorchAoConfig`: the written
directory loads with `AutoModelForCausalLM.from_pretrained` (torchao installed) on any
device, and with this package's tools (`eval/load.py` dequantises it).

- int8: each linear layer's weight in int8 with one scale per output channel
  (`Int8WeightOnlyConfig`);
- int4: values in [-8, 7] with one scale per `group_size` inputs (symmetric)
  (`IntxWeightOnlyConfig(torch.int4, PerGroup(group_size))`). torchao keeps them unpacked in
  int8 tensors, so on disk int4 is about int8's size (plus its group scales); its packed
  int4 layouts run on CUDA only and do not load on a CPU.

The embeddings, norms and the output head stay as they are (transformers leaves the head;
the rest are not linear layers). Checked before any work (`errors`): the method, a model
type whose linear layers are all of it (a mixture of experts keeps its experts in fused
tensors torchao would leave unquantised), and an int4 group size dividing every linear
layer's input size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pretrain.compress.shapes import linear_inputs, request_errors

METHODS = ("int8", "int4")
GROUP_SIZES = (128, 64, 32, 256)
"""int4 group sizes tried in this order when none is given."""


def default_group_size(config: dict[str, Any]) -> int | None:
    sizes = linear_inputs(config).values()
    return next((g for g in GROUP_SIZES if all(n % g == 0 for n in sizes)), None)


def errors(config: dict[str, Any], method: str, group_size: int | None) -> list[str]:
    """Why `method` cannot quantise the model of HF `config` ([] when it can)."""
    first = request_errors(config, "--method", method, METHODS, "quantised")
    if first:
        return first
    if method == "int8":
        return [] if group_size is None else ["--group-size is for int4 (int8 is per channel)"]
    if group_size is None:
        if default_group_size(config) is None:
            sizes = ", ".join(f"{k}={v}" for k, v in linear_inputs(config).items())
            return [f"int4: no group size of {GROUP_SIZES} divides every linear layer's "
                    f"input ({sizes}): give --group-size"]  # fmt: skip
        return []
    if group_size <= 0:
        return [f"int4 --group-size {group_size}: must be positive"]
    bad = [f"{k}={v}" for k, v in linear_inputs(config).items() if v % group_size]
    if bad:
        return [f"int4 --group-size {group_size} must divide every linear layer's input "
                f"size, and does not divide {', '.join(bad)}"]  # fmt: skip
    return []


def torchao_config(method: str, group_size: int | None) -> Any:
    """transformers' TorchAoConfig for `method`."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from transformers import TorchAoConfig

    if method == "int8":
        return TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    return TorchAoConfig(
        quant_type=IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    )


def quantized_model(hf_dir: Path, method: str, group_size: int | None) -> Any:
    """The model of `hf_dir`, quantised as it loads (fp32 compute)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        hf_dir, quantization_config=torchao_config(method, group_size), dtype=torch.float32
    )
