"""Run EleutherAI's lm-evaluation-harness on a checkpoint or an HF directory.

    python tools/eval_harness.py runs/demo --tasks hellaswag,arc_easy --output harness.json
    python tools/eval_harness.py hf/demo --tasks my_task --include-path tasks/ --output out.json

A run dir or step_N checkpoint is exported first (to <run_dir>/eval/hf-step_N, reused on the
next call); an HF directory is evaluated as it is. `--include-path` adds a directory of task
YAMLs (local `dataset_path: json` tasks run offline). The full lm-eval results go to
--output as JSON; for a checkpoint, one line per call is also appended to
<run_dir>/eval/harness.jsonl ({step, tasks, metrics}), and the metrics are printed.

Log-likelihoods condition on the end-of-text token, the document boundary our models train
with (lm-eval would otherwise use <|bos|>, which our shards never hold); a
`loglikelihood_rolling` task's bits_per_byte then equals `tools/eval_ppl.py --text` on the
same documents with --seq-len = --max-length. Needs the `eval` extra: pip install -e '.[eval]'.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pretrain.checkpoint import manager
from pretrain.checkpoint.export import export_hf, find_checkpoint
from pretrain.eval.load import pick_device

log = logging.getLogger("pretrain")


def hf_dir_for(path: Path) -> tuple[Path, Path | None]:
    """(HF dir to evaluate, the checkpoint it came from or None)."""
    if (path / "config.json").is_file():
        return path, None
    ckpt = find_checkpoint(path)
    out = ckpt.parent.parent / "eval" / f"hf-{ckpt.name}"
    if not (out / "config.json").is_file():
        export_hf(ckpt, out)
    return out, ckpt


def end_of_text_id(hf_dir: Path) -> int | None:
    """The id of the tokenizer's end-of-text token (what separates our training documents)."""
    if not (hf_dir / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(hf_dir / "tokenizer.json")).token_to_id("<|eos|>")


def flat_metrics(results: dict) -> dict[str, float]:
    """{'task/metric': value} from lm-eval's results (filters like ',none' dropped)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            if isinstance(value, int | float) and not name.endswith(("_stderr", "sample_len")):
                out[f"{task}/{name}"] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="run dir, checkpoints/step_N dir or HF dir")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include-path", type=Path, help="a directory of extra task YAMLs")
    parser.add_argument("--output", required=True, type=Path, help="results JSON to write")
    parser.add_argument("--batch-size", default="8", help="an int, or auto")
    parser.add_argument("--limit", type=float, help="documents per task (a fraction if < 1)")
    parser.add_argument("--max-length", type=int, help="context length (default: the model's)")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # export consolidates on CPU
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable
    except ImportError as e:
        parser.error(f"lm-eval is not installed ({e}): pip install -e '.[eval]'")
    try:
        hf_dir, ckpt = hf_dir_for(args.model)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    device = pick_device(args.device)
    tasks = [t for t in args.tasks.split(",") if t]
    manager_ = TaskManager(include_path=str(args.include_path) if args.include_path else None)
    unknown = [t for t in tasks if t not in manager_.all_tasks]
    if unknown:
        parser.error(f"unknown lm-eval task(s) {unknown}: check --tasks, or --include-path for "
                     "local task YAMLs")  # fmt: skip
    model_args = f"pretrained={hf_dir},dtype={'bfloat16' if device == 'cuda' else 'float32'}"
    eos = end_of_text_id(hf_dir)
    if eos is not None:
        model_args += f",prefix_token_id={eos}"
    if args.max_length:
        model_args += f",max_length={args.max_length}"
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    results = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=tasks, task_manager=manager_,
        batch_size=batch, device=device, limit=args.limit, num_fewshot=args.num_fewshot,
        log_samples=False,
    )  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    metrics = flat_metrics(results)
    for name, value in sorted(metrics.items()):
        print(f"{name}: {value:.6g}")
    if ckpt is not None:
        step = manager.read_client_state(ckpt)["trainer"]["step"]
        record = {"step": step, "checkpoint": str(ckpt), "tasks": tasks, "metrics": metrics}
        with (ckpt.parent.parent / "eval" / "harness.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
