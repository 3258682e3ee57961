"""The evaluation tools on one real run (demo data, a BPE tokenizer, in-loop validation):
tools/generate.py and tools/eval_ppl.py read the checkpoint and its HF export alike."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, read_metrics, subprocess_env, train

pytestmark = pytest.mark.multiprocess

PROMPT = "import os\ndef "


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    train(root / "run", ["data=demo", "data.max_bytes=300000", "trainer.max_steps=30",
                         # A model still warming up (the LR peaks past step 30) writes varied
                         # text; warmed up at this LR it repeats one token, and BLEU needs
                         # 4-grams (test_bleu_and_chrf_of_generated_continuations).
                         "optim.lr=3e-3", "optim.warmup_steps=100",
                         "checkpoint.export_hf=true", "trainer.log_every=10",
                         "trainer.eval_every_steps=30", f"trainer.eval_tokens={EVAL_TOKENS}",
                         f"+trainer.eval_data.all={root}/data/demo/shards/*.tar"],
          env={"PRETRAIN_DATA_DIR": str(root / "data")})  # fmt: skip
    return root / "run"


EVAL_TOKENS = 2048


def tool(name: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=subprocess_env())  # fmt: skip


def cli(*args: object) -> subprocess.CompletedProcess:
    return tool("generate.py", *args)


def test_eval_ppl_repeats_the_in_loop_validation(run_dir: Path, tmp_path: Path) -> None:
    """With the checkpoint's seq_len, micro-batch and seed, --tokens eval_tokens scores the
    windows of the last in-loop evaluation: the same loss."""
    (last,) = [r for r in read_metrics(run_dir) if "val_loss" in r]
    # trainer.eval_data: a named set (every demo shard, by glob) scored beside the val split.
    assert last["val_all_tokens"] == EVAL_TOKENS and last["val_all_loss"] != last["val_loss"]
    assert last["val_all_bpb"] > 0
    shards = run_dir.parent / "data" / "demo" / "shards"
    out = tmp_path / "ppl.json"
    ckpt = tool("eval_ppl.py", run_dir, "--data", shards, "--tokens", EVAL_TOKENS, "--output", out)
    assert ckpt.returncode == 0, ckpt.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    assert figures["bpb"] == pytest.approx(last["val_bpb"], rel=1e-6)
    assert figures["tokens"] == EVAL_TOKENS and figures["ppl"] == pytest.approx(last["val_ppl"])
    # Without --data: the run's own val split, as its in-loop validation read it.
    own = json.loads(tool("eval_ppl.py", run_dir).stdout)
    assert own["loss"] == pytest.approx(last["val_loss"], rel=1e-6)
    assert own["tokens"] == EVAL_TOKENS and own["split"] == "val"
    whole = json.loads(tool("eval_ppl.py", run_dir, "--data", shards).stdout)
    assert whole["tokens"] > EVAL_TOKENS  # the whole val split
    bad = tool("eval_ppl.py", run_dir, "--data", shards / "*.tar")
    assert bad.returncode == 2 and "has no val split" in bad.stderr


@pytest.mark.parametrize(("beams", "source"), [(1, "checkpoint"), (3, "export")])
def test_checkpoint_and_export_print_what_transformers_generates(
    run_dir: Path, beams: int, source: str
) -> None:
    transformers = pytest.importorskip("transformers")
    args = ["--prompt", PROMPT, "--max-new-tokens", 12, "--num-beams", beams]
    proc = cli(run_dir if source == "checkpoint" else run_dir / "hf", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
    tok = transformers.AutoTokenizer.from_pretrained(run_dir / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    ids = tok(PROMPT, return_tensors="pt")
    out = hf.generate(**ids, max_new_tokens=12, num_beams=beams, do_sample=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    new = [t for t in new if t != tok.pad_token_id]
    assert proc.stdout == tok.decode(new) + "\n"  # the completion alone


def test_prompt_file_gives_one_json_line_per_prompt(run_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (PROMPT, "x", "class A")))
    proc = cli(run_dir, "--prompt-file", prompts, "--max-new-tokens", 6, "--temperature", 0.7,
               "--top-k", 20, "--top-p", 0.9, "--seed", 1)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == [PROMPT, "x", "class A"]
    assert all(isinstance(r["completion"], str) for r in rows)


def test_bad_input_is_named(tmp_path: Path, run_dir: Path) -> None:
    proc = cli(tmp_path / "nowhere", "--prompt", "x")
    assert proc.returncode == 2 and "nowhere does not exist" in proc.stderr
    proc = cli(run_dir, "--prompt", "x", "--top-p", "0")
    assert proc.returncode == 2 and "top_p=0.0: must be in (0, 1]" in proc.stderr


MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

PPL_YAML = """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

DOCS = [
    "import os\nimport sys\n\n\ndef main():\n    print(os.getcwd())\n    return 0\n" * 3,
    "class Foo:\n    def __init__(self, x):\n        self.x = x\n",
]
QUESTIONS = [
    {"question": "import os\nos.path.", "choices": ["join", "banana"], "answer": 0},
    {"question": "def f(x):\n    return", "choices": [" x", " ###"], "answer": 0},
    {"question": "for i in", "choices": [" range(10):", " zzz"], "answer": 0},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lm_eval_harness_offline_agrees_with_eval_ppl(run_dir: Path, tmp_path: Path) -> None:
    """Two local tasks (multiple choice; rolling perplexity) through lm-eval on the checkpoint:
    its bits per byte over documents longer than a window equal tools/eval_ppl.py --text."""
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    mc = write_jsonl(tmp_path / "mc.jsonl", QUESTIONS)
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in DOCS])
    (tasks / "tiny_mc.yaml").write_text(MC_YAML.format(data=mc))
    (tasks / "tiny_ppl.yaml").write_text(PPL_YAML.format(data=docs))
    out = tmp_path / "harness.json"
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "eval_harness.py"), str(run_dir), "--tasks",
         "tiny_mc,tiny_ppl", "--include-path", str(tasks), "--output", str(out),
         "--max-length", "32"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**subprocess_env(), **env},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert 0.0 <= results["tiny_mc"]["acc,none"] <= 1.0
    bpb = results["tiny_ppl"]["bits_per_byte,none"]
    ours = tool("eval_ppl.py", run_dir, "--text", docs, "--seq-len", 32)
    assert ours.returncode == 0, ours.stderr[-2000:]
    figures = json.loads(ours.stdout)
    assert figures["tokens"] > 2 * 32  # several rolling windows per long document
    assert figures["bpb"] == pytest.approx(bpb, rel=1e-5)
    assert results["tiny_ppl"]["byte_perplexity,none"] == pytest.approx(2 ** figures["bpb"])
    (record,) = [json.loads(line) for line in (run_dir / "eval" / "harness.jsonl").open()]
    assert record["step"] == 30 and record["metrics"]["tiny_ppl/bits_per_byte"] == bpb
    assert (run_dir / "eval" / "hf-step_30" / "config.json").is_file()  # the export, kept


def test_tree_search_from_the_cli(run_dir: Path) -> None:
    """--search mcts prints a deterministic continuation; --reward chrf steers it to a
    reference; chrF without a reference is refused."""
    pytest.importorskip("sacrebleu")
    args = [run_dir, "--prompt", PROMPT, "--max-new-tokens", 6, "--search", "mcts",
            "--simulations", 12, "--mcts-width", 4]  # fmt: skip
    first, again = cli(*args), cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.strip() and first.stdout == again.stdout
    steered = cli(*args, "--reward", "chrf", "--reference", first.stdout.strip() + " x")
    assert steered.returncode == 0, steered.stderr[-2000:]
    bad = cli(run_dir, "--prompt", PROMPT, "--reward", "chrf")
    assert bad.returncode == 2 and "--reward chrf needs --search mcts and a --reference" in (
        bad.stderr
    )


def test_bleu_and_chrf_of_generated_continuations(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("sacrebleu")
    prompts = [PROMPT, "class ", "for i in "]
    first = tmp_path / "first.json"
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "reference": "x"} for p in prompts])
    proc = tool("eval_generate.py", run_dir, "--data", pairs, "--max-new-tokens", 16,
                "--output", first)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    completions = [e["completion"] for e in json.loads(first.read_text())["examples"]]
    assert completions[0] + "\n" == cli(run_dir, "--prompt", PROMPT, "--max-new-tokens", 16).stdout
    # The completions as their own references: a perfect score, so prompts, completions and
    # references line up.
    rows = [{"prompt": p, "references": [c, "zzz"]}
            for p, c in zip(prompts, completions, strict=True)]  # fmt: skip
    same = write_jsonl(tmp_path / "same.jsonl", rows)
    scores = json.loads(tool("eval_generate.py", run_dir, "--data", same,
                             "--max-new-tokens", 16).stdout)  # fmt: skip
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)
    assert scores["n"] == 3
    bad = tool("eval_generate.py", run_dir, "--data", write_jsonl(tmp_path / "b.jsonl",
                                                                  [{"prompt": "x"}]))  # fmt: skip
    assert bad.returncode == 2
    assert "b.jsonl:1: each line needs a prompt and a reference" in bad.stderr


@pytest.mark.parametrize(
    ("name", "module", "args"),
    [("eval_harness.py", "lm_eval", ["--tasks", "x", "--output", "o.json"]),
     ("eval_generate.py", "sacrebleu", ["--data", "pairs.jsonl"])],
)  # fmt: skip
def test_a_tool_without_its_extra_names_the_pip_install(
    name: str, module: str, args: list[str], tmp_path: Path
) -> None:
    """The [eval] extra missing (its module made unimportable): exit 2 with the pip line,
    no traceback. tests/test_readme.py sees the same in a real base install."""
    run = (f"import runpy, sys; sys.modules[{module!r}] = None; "
           f"sys.argv = [{name!r}, 'runs/x', *{args!r}]; "
           f"runpy.run_path({str(REPO / 'tools' / name)!r}, run_name='__main__')")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=subprocess_env())  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is not installed" in proc.stderr and module in proc.stderr
    assert "pip install -e '.[eval]'" in proc.stderr and "Traceback" not in proc.stderr
