"""Models: the Llama-style Transformer, its attention backends, baselines and FLOP counts."""

from pretrain.model.flops import flops_per_token, num_params
from pretrain.model.llama import LlamaConfig, Transformer

__all__ = ["LlamaConfig", "Transformer", "flops_per_token", "num_params"]
