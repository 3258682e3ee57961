"""Generate a continuation for each {prompt, reference} pair and score them with BLEU and
chrF (sacrebleu), corpus-level.

    python tools/eval_generate.py runs/demo --data pairs.jsonl
    python tools/eval_generate.py hf/demo --data pairs.jsonl --num-beams 4 --output scores.json

--data is a .jsonl of {"prompt": ..., "reference": ...} (or "references": [...] for several
references per prompt). Prompts run in batches of --batch-size with the generation options of
tools/generate.py (greedy by default). Prints {bleu, chrf, n, logprob, ...} as JSON, logprob
being the mean over completions of their mean per-token log-probability under the model
(what beam search and --search mcts maximise); --output also writes each prompt's
completion beside its references.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pretrain.eval.generate import add_arguments, config_from_args, generate, mean_logprob
from pretrain.eval.load import load_model, pick_device


def read_pairs(path: Path) -> tuple[list[str], list[list[str]]]:
    prompts, refs = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt" not in row or not ("reference" in row or "references" in row):
            raise ValueError(
                f"{path}:{n}: each line needs a prompt and a reference (or references)"
            )
        prompts.append(row["prompt"])
        refs.append(row["references"] if "references" in row else [row["reference"]])
    if not prompts:
        raise ValueError(f"{path} holds no pairs")
    return prompts, refs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="run dir, checkpoints/step_N dir or HF dir")
    parser.add_argument("--data", required=True, type=Path, help=".jsonl of {prompt, reference}")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--output", type=Path, help="scores and completions (JSON)")
    add_arguments(parser)
    args = parser.parse_args()
    try:
        import sacrebleu
    except ImportError as e:
        parser.error(f"sacrebleu is not installed ({e}): pip install -e '.[eval]'")

    device = pick_device(args.device)
    try:
        prompts, refs = read_pairs(args.data)
        loaded = load_model(args.model, device)
        tok = loaded.tokenizer
        if tok is None:
            raise ValueError(f"{loaded.source} has no tokenizer.json")
        cfg = config_from_args(args, tok.token_to_id("<|eos|>"))
        completions: list[str] = []
        logprobs: list[float] = []
        for i in range(0, len(prompts), args.batch_size):
            ids = [tok.encode(p).ids for p in prompts[i : i + args.batch_size]]
            outputs = generate(loaded.model, ids, cfg)
            completions += [tok.decode(o) for o in outputs]
            logprobs += [mean_logprob(loaded.model, p, o) for p, o in zip(ids, outputs,
                                                                          strict=True)]  # fmt: skip
    except (FileNotFoundError, ValueError, KeyError) as e:
        parser.error(str(e))
    # sacrebleu wants one list per reference position: pad prompts with fewer references.
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else r[0] for r in refs] for k in range(width)]
    bleu = sacrebleu.corpus_bleu(completions, streams)
    chrf = sacrebleu.corpus_chrf(completions, streams)
    scores = {"bleu": bleu.score, "chrf": chrf.score, "n": len(prompts),
              "logprob": sum(logprobs) / len(logprobs), "model": str(loaded.source)}  # fmt: skip
    print(json.dumps(scores, indent=2))
    if args.output:
        rows = [{"prompt": p, "completion": c, "references": r}
                for p, c, r in zip(prompts, completions, refs, strict=True)]  # fmt: skip
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({**scores, "examples": rows}, indent=2))


if __name__ == "__main__":
    main()
