"""Export a checkpoint as a Hugging Face `LlamaForCausalLM` directory.

    python tools/export_hf.py RUN_OR_CKPT OUT [--dtype bfloat16] [--max-shard-size 5GB]

RUN_OR_CKPT is a run dir (its newest complete checkpoint is used) or a checkpoints/step_N
dir. ZeRO shards of any stage and world size are consolidated on CPU. OUT then loads with
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` (and AutoTokenizer, when the run
had a tokenizer), in lm-eval-harness and vLLM. Checkpoint files are loaded as data only
(torch.load with weights_only=True and an allowlist of DeepSpeed's state classes): a file
holding any other Python object is refused, since unpickling it could run code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pretrain.checkpoint.export import DTYPES, export_hf
from pretrain.checkpoint.manager import CheckpointError


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Checkpoint files are loaded as data only (torch.load weights_only=True, with "
        "an allowlist of DeepSpeed's state classes): a file holding any other Python object "
        "is refused, as unpickling it could run code.",
    )
    parser.add_argument("checkpoint", type=Path, help="run dir or checkpoints/step_N dir")
    parser.add_argument("output", type=Path, help="directory to write (replaced if present)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="weights' dtype (default: bfloat16 if trained in bf16, else float32)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # consolidation runs on CPU
    try:
        out = export_hf(args.checkpoint, args.output, args.dtype, args.max_shard_size)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as e:  # unsafe or unreadable checkpoint files
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(out)


if __name__ == "__main__":
    main()
