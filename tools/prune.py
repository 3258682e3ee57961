"""Prune a trained model's linear layers by magnitude into a Hugging Face directory, measure
what it costs on held-out data, and optionally recover with a short training run.

    python tools/prune.py runs/demo --sparsity 0.5 --output hf/demo_pruned
    python tools/prune.py runs/demo --sparsity 0.5 --pattern 2:4 --output hf/demo_24 \\
        --finetune-steps 50

RUN_OR_HF_DIR: a run dir (its newest checkpoint), a checkpoints/step_N dir or an HF
directory. --pattern unstructured (default) zeroes the --sparsity fraction of each linear
layer's smallest weights; 2:4 the two smallest of every four inputs (--sparsity 0.5). The
embeddings, norms and output head are kept (pretrain/compress/prune.py).

--finetune-steps N (a run dir: its config and training data) trains the pruned model N
steps through the normal trainer (`python -m pretrain`'s train(), one process) with the
pruned weights held at zero (model.keep_zeros), at --finetune-lr (default: the run's final
learning rate), and writes that model instead.

Prints, and writes to OUTPUT/pruning.json: the sparsity measured on the written weights
(of the pruned layers and of the whole model), the weight files' sizes (stored dense: the
zeros take the same room; sparse kernels turn them into speed, not disk), and the held-out
loss, perplexity and bits per byte before, after pruning and after the fine-tuning, on the
run's val split (or --data), --tokens of it (default: all).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from pretrain.compress import heldout, prune

REPORT = "pruning.json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    heldout.add_arguments(parser)
    parser.add_argument("--sparsity", type=float, required=True, help="fraction to zero")
    parser.add_argument("--pattern", default="unstructured", help="unstructured | 2:4")
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="recover with this many training steps, masks fixed")  # fmt: skip
    parser.add_argument("--finetune-lr", type=float, default=None,
                        help="its learning rate (default: the run's final one)")  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")  # fmt: skip
    heldout.run_tool(parser, run)


def run(args: argparse.Namespace, scratch: Path) -> dict:
    """Check, prune, (fine-tune,) measure, write; the report."""
    from transformers import AutoModelForCausalLM

    if args.finetune_steps < 0:
        raise ValueError(f"--finetune-steps {args.finetune_steps}: must be >= 0")
    data = heldout.held_out(args.model, args.data, args.tokens)  # before any work: no data
    saved = heldout.saved_config(args.model)
    if args.finetune_steps and saved is None:
        raise ValueError("--finetune-steps trains with the run's config and data: give a run "
                         "dir or a step_N dir, not an HF directory")  # fmt: skip
    problems = prune.errors(heldout.hf_config(args.model), args.sparsity, args.pattern)
    if problems:
        raise ValueError("; ".join(problems))
    hf_dir = heldout.hf_directory(args.model, scratch)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    report = {"source": str(args.model), "output": str(args.output), "pattern": args.pattern,
              "sparsity_asked": args.sparsity, "data": data.data, "split": data.split,
              "seq_len": data.seq_len, "batch_size": data.batch, "seed": data.seed}  # fmt: skip
    report["before"] = heldout.measure(model, hf_dir, data)
    names = [f"{name}.weight" for name, _ in prune.prunable(model)]
    prune.prune(model, args.sparsity, args.pattern)
    tmp = heldout.staging(args.output)
    model.save_pretrained(tmp)
    heldout.copy_tokenizer(hf_dir, tmp)
    report["pruned"] = heldout.measure(AutoModelForCausalLM.from_pretrained(tmp), tmp, data)
    if args.finetune_steps:
        final = _finetune(saved, tmp, args, scratch)
        report["finetune_steps"] = args.finetune_steps
        report["finetuned"] = heldout.measure(AutoModelForCausalLM.from_pretrained(final), final,
                                              data)  # fmt: skip
        shutil.rmtree(tmp)
        shutil.copytree(final, tmp)
    report["sparsity"] = prune.sparsity_of(_weights(tmp), names)  # from the written files
    report["size_bytes"] = {"before": heldout.weight_bytes(hf_dir),
                            "after": heldout.weight_bytes(tmp)}  # fmt: skip
    heldout.publish(tmp, args.output, REPORT, report)
    return report


def _weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    weights = {}
    for f in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(f))
    return weights


def _finetune(saved: dict, pruned: Path, args: argparse.Namespace, scratch: Path) -> Path:
    """Train the pruned model `args.finetune_steps` steps with the run's config (one process,
    ZeRO-0 unless it used 1 or 2, no evaluation, W&B off), its zeros held; its export."""
    from pretrain import dist
    from pretrain.config import from_saved, resolve
    from pretrain.train.run import train

    optim = saved["optim"]
    lr = args.finetune_lr or optim["lr"] * optim["min_lr_ratio"]
    steps = args.finetune_steps
    stage = saved["deepspeed"]["zero_stage"]
    overrides = [
        f"model.init_from={pruned}", "model.keep_zeros=true", f"trainer.max_steps={steps}",
        "trainer.stop_at_step=null", "trainer.eval_every_steps=0", f"optim.lr={lr}",
        f"optim.warmup_steps={max(1, steps // 10)}", "optim.min_lr_ratio=1.0",
        f"run_dir={scratch / 'finetune'}", "run_name=finetune", "checkpoint.resume=none",
        "checkpoint.export_hf=true", "checkpoint.every_steps=0", "checkpoint.every_minutes=0",
        "logger.wandb.mode=disabled", "parallel.sequence=1", "parallel.expert=1",
        f"deepspeed.zero_stage={stage if stage in (1, 2) else 0}",
    ]  # fmt: skip
    run = resolve(from_saved(saved, overrides), world_size=1)
    dist.init(run.device_type, dist.process_group_timeout(run.trainer.hang_timeout_s))
    dist.init_parallel(run.parallel)
    try:
        train(run)
    finally:
        dist.destroy()
    return run.run_dir / "hf"


if __name__ == "__main__":
    sys.exit(main())
