"""pretrain: Llama-style LM pretraining with Hydra configs, DeepSpeed ZeRO and webdataset shards."""

__version__ = "0.1.0"
