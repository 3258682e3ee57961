"""MFU and throughput against numbers worked out by hand from the presets' shapes."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from pretrain.config import compose
from pretrain.model.flops import flops_per_token, peak_flops
from pretrain.train.metrics import Throughput, resolve_peak


def preset(name: str):
    return OmegaConf.to_object(compose([f"model={name}"]).model)


# Per layer: q, k, v, o projections + gate, up, down; then the output head (V x d); attention
# 12 * L * T * d over the full T x T scores. Numbers from conf/model/*.yaml.
HAND = {
    # 12 layers, d 768, 12 heads (no GQA), FFN 2048, vocab 50304, seq 2048.
    ("llama_125m", 2048): 6 * (12 * (4 * 768 * 768 + 3 * 768 * 2048) + 50304 * 768)
    + 12 * 12 * 2048 * 768,
    # 16 layers, d 2048, 32 heads of 64, 8 KV heads (k, v: 2048 x 512), FFN 8192, vocab 128256.
    ("llama_1b", 4096): 6 * (16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192)
                             + 128256 * 2048) + 12 * 16 * 4096 * 2048,
    # 32 layers, d 4096, FFN 11008, vocab 32000 (untied: the head counts, the lookup does not).
    ("llama_7b", 4096): 6 * (32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32000 * 4096)
    + 12 * 32 * 4096 * 4096,
}  # fmt: skip


@pytest.mark.parametrize(("name", "seq_len"), list(HAND))
def test_flops_per_token_of_the_presets(name: str, seq_len: int) -> None:
    assert flops_per_token(preset(name), seq_len) == HAND[(name, seq_len)]


def test_preset_figures_written_out() -> None:
    assert HAND[("llama_125m", 2048)] == 967_901_184
    assert HAND[("llama_1b", 4096)] == 9_025_093_632
    assert HAND[("llama_7b", 4096)] == 46_084_915_200


def test_tokens_per_s_and_mfu_by_hand() -> None:
    """llama_1b at seq 4096 on 8 H100s: 256 x 4096 tokens per step in 3 s."""
    tp = Throughput(tokens_per_step=256 * 4096, world_size=8,
                    flops_per_token=9_025_093_632, peak_flops=989e12)  # fmt: skip
    m = tp(3.0)
    assert m["tokens_per_s"] == pytest.approx(349_525.33, abs=0.01)  # 1,048,576 / 3
    assert m["tokens_per_s_per_gpu"] == pytest.approx(43_690.67, abs=0.01)
    assert m["tflops_per_gpu"] == pytest.approx(394.31, abs=0.01)  # 9.025e9 x 43,690.67
    assert m["mfu"] == pytest.approx(0.39870, abs=1e-5)  # / 989e12


def test_no_mfu_without_a_peak_or_a_flop_count() -> None:
    assert "mfu" not in Throughput(1000, 1, 1e6, None)(1.0)
    assert set(Throughput(1000, 2, None, 1e12)(0.5)) == {"tokens_per_s", "tokens_per_s_per_gpu"}
    assert Throughput(1000, 2, None, None)(0.5)["tokens_per_s_per_gpu"] == 1000.0


@pytest.mark.parametrize(
    ("device_name", "precision", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989), ("NVIDIA H100 PCIe", "bf16", 756),
        ("NVIDIA H100 NVL", "fp16", 835), ("NVIDIA GH200 480GB", "bf16", 989),
        ("NVIDIA H200", "bf16", 989), ("NVIDIA A100-SXM4-80GB", "bf16", 312),
        ("NVIDIA A100-PCIE-40GB", "fp32", 19.5), ("NVIDIA B200", "bf16", 2250),
        ("NVIDIA GB200", "bf16", 2500), ("NVIDIA L40S", "bf16", 362), ("NVIDIA L4", "bf16", 121),
        ("AMD Instinct MI300X", "bf16", 1307.4), ("Tesla V100-SXM2-16GB", "fp16", 125),
        ("Tesla V100-SXM2-16GB", "bf16", None), ("NVIDIA GeForce GTX 1080", "bf16", None),
    ],
)  # fmt: skip
def test_peak_table_by_device_name(device_name: str, precision: str, tflops: float) -> None:
    peak = peak_flops(device_name, precision)
    assert (peak is None) if tflops is None else peak == pytest.approx(tflops * 1e12)


def test_configured_peak_wins_and_cpu_has_none_by_default() -> None:
    cpu = torch.device("cpu")
    assert resolve_peak(None, cpu, "fp32")[0] is None
    assert "logger.peak_tflops" in resolve_peak(None, cpu, "fp32")[1]
    peak, source = resolve_peak(2.5, cpu, "fp32")
    assert peak == 2.5e12 and "logger.peak_tflops" in source
