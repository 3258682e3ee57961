"""Continue prompts with a trained model: greedy, sampled, beam search or Monte Carlo tree
search, KV-cached.

    python tools/generate.py RUN_OR_CKPT_OR_HF_DIR --prompt "def main(" --max-new-tokens 64
    python tools/generate.py runs/demo --prompt "import " --num-beams 4 --length-penalty 0.8
    python tools/generate.py out/hf --prompt "x = " --temperature 0.8 --top-k 50 --top-p 0.95
    python tools/generate.py runs/demo --prompt-file prompts.txt > completions.jsonl
    python tools/generate.py runs/demo --prompt "def " --search mcts --simulations 64
    python tools/generate.py runs/demo --prompt "import " --search mcts --reward chrf \
        --reference "os"
    python tools/generate.py runs/sft_demo/hf --chat --prompt "How do I import dumps?"

--chat: each prompt is a user's message, rendered with the model's chat template (a
fine-tuned model's: data=sft) and --system's message before it; the reply ends at the end
of the assistant's turn.

--search mcts maximises the continuation's length-normalised log-probability, or with
--reward chrf its chrF against --reference (eval/mcts.py).

With --prompt, stdout holds the completion alone (the prompt is not repeated). With
--prompt-file (one prompt per line, or a .jsonl of {"prompt": ...}), each completion is a
JSON line {"prompt", "completion"}; the prompts run as one batch. Generation stops at the
tokenizer's end-of-text token, at any --stop-token-id, or after --max-new-tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from pretrain.data.chat import ChatRenderer, stop_token_ids
from pretrain.eval.generate import add_arguments, config_from_args, generate
from pretrain.eval.load import load_model, pick_device
from pretrain.eval.mcts import ChrfReward


def read_prompts(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    return [line.replace("\\n", "\n") for line in text.splitlines() if line]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="run dir, checkpoints/step_N dir or HF dir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text to continue")
    source.add_argument("--prompt-file", type=Path, help="one prompt per line, or .jsonl")
    add_arguments(parser)
    parser.add_argument("--reward", choices=("logprob", "chrf"), default="logprob",
                        help="what --search mcts maximises")  # fmt: skip
    parser.add_argument("--reference", help="--reward chrf: the text to score against")
    parser.add_argument("--chat", action="store_true",
                        help="prompts are user messages, rendered with the model's chat "
                             "template")  # fmt: skip
    parser.add_argument("--system", help="--chat: a system message before each prompt")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args()
    if args.system is not None and not args.chat:
        parser.error("--system is a --chat option (the system message before each prompt)")
    if args.reward == "chrf" and (args.search != "mcts" or args.reference is None):
        parser.error("--reward chrf needs --search mcts and a --reference text")
    device = pick_device(args.device)
    try:
        loaded = load_model(args.model, device)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    tok = loaded.tokenizer
    if tok is None:
        parser.error(f"{loaded.source} has no tokenizer.json: export from a run with one")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompt_file)
    cfg = config_from_args(args, tok.token_to_id("<|eos|>"))
    if args.chat:
        if loaded.chat_template is None:
            parser.error(f"--chat: {loaded.source} has no chat template (fine-tune with "
                         "data=sft, whose checkpoints and exports carry theirs)")  # fmt: skip
        renderer = ChatRenderer(tok, loaded.chat_template)
        system = [{"role": "system", "content": args.system}] if args.system else []
        ids = [renderer.prompt_ids([*system, {"role": "user", "content": p}]) for p in prompts]
        cfg = replace(cfg, stop_tokens=[*cfg.stop_tokens, *stop_token_ids(tok)])
    else:
        ids = [tok.encode(p).ids for p in prompts]
    reward = ChrfReward(tok.decode, args.reference) if args.reward == "chrf" else None
    try:
        outputs = generate(loaded.model, ids, cfg, reward=reward)
    except ValueError as e:
        parser.error(str(e))
    completions = [tok.decode(o) for o in outputs]
    if args.prompt is not None:
        sys.stdout.write(completions[0] + "\n")
        return
    for prompt, completion in zip(prompts, completions, strict=True):
        print(json.dumps({"prompt": prompt, "completion": completion}))


if __name__ == "__main__":
    main()
