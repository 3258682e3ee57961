"""Quantise a trained model's weights (torchao, weight-only) into a Hugging Face directory,
and measure what it costs on held-out data.

    python tools/quantize.py runs/demo --method int8 --output hf/demo_int8
    python tools/quantize.py hf/model --method int4 --group-size 64 --output hf/model_int4 \\
        --data shards/ --tokens 1000000

RUN_OR_HF_DIR: a run dir (its newest checkpoint), a checkpoints/step_N dir or an HF
directory. --output loads with transformers (`AutoModelForCausalLM.from_pretrained`, torchao
installed) and with this package's tools. Prints, and writes to OUTPUT/quantization.json,
the weight files' sizes and the held-out loss, perplexity and bits per byte before and
after, on the run's val split (or --data: a tools/prepare_data.py directory's val split, or
a glob of shards), --tokens of it (default: all). See pretrain/compress/quantize.py for the
methods. Needs the `quant` extra: pip install -e '.[quant]'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.compress import heldout, quantize

REPORT = "quantization.json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    heldout.add_arguments(parser)
    parser.add_argument("--method", required=True, help="int8 | int4")
    parser.add_argument("--group-size", type=int, default=None,
                        help="int4: inputs per scale (default: the largest of 128, 64, 32 "
                             "dividing every linear layer)")  # fmt: skip
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        parser.error(f"torchao is not installed ({e}): pip install -e '.[quant]'")
    heldout.run_tool(parser, run)


def run(args: argparse.Namespace, scratch: Path) -> dict:
    """Check, quantise, measure, write; the report."""
    from transformers import AutoModelForCausalLM

    # Before any work (a run's export): no data, or a request the model cannot take.
    data = heldout.held_out(args.model, args.data, args.tokens)
    config = heldout.hf_config(args.model)
    problems = quantize.errors(config, args.method, args.group_size)
    if problems:
        raise ValueError("; ".join(problems))
    hf_dir = heldout.hf_directory(args.model, scratch)
    group = args.group_size
    if args.method == "int4" and group is None:
        group = quantize.default_group_size(config)
    before = heldout.measure(AutoModelForCausalLM.from_pretrained(hf_dir), hf_dir, data)
    model = quantize.quantized_model(hf_dir, args.method, group)
    tmp = heldout.staging(args.output)
    model.save_pretrained(tmp)
    heldout.copy_tokenizer(hf_dir, tmp)
    # Measured as transformers loads what was written: what a user of the directory gets.
    after = heldout.measure(AutoModelForCausalLM.from_pretrained(tmp), tmp, data)
    sizes = {"before": heldout.weight_bytes(hf_dir), "after": heldout.weight_bytes(tmp)}
    report = {
        "source": str(args.model), "output": str(args.output), "method": args.method,
        "group_size": group, "data": data.data, "split": data.split, "seq_len": data.seq_len,
        "batch_size": data.batch, "seed": data.seed, "size_bytes": sizes,
        "size_ratio": sizes["after"] / sizes["before"], "before": before, "after": after,
    }  # fmt: skip
    heldout.publish(tmp, args.output, REPORT, report)
    return report


if __name__ == "__main__":
    sys.exit(main())
