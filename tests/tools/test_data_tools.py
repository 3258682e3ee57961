"""The documented data command lines, end to end: train_tokenizer -> prepare_data -> pretrain."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, read_metrics, subprocess_env


def _run(args: list[str], expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env={**subprocess_env(), "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _shipped_corpus(tmp_path: Path) -> list[str]:
    """Text files, and the same kind of code as corpora ship it, text in a `content` field:
    parquet (row groups, an extra column, one null), a Hugging Face dataset directory
    (save_to_disk, two arrow files) and zstd JSON lines: 30 + 5 + 10 + 5 documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    def code(i: int) -> str:
        return f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * 20

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"{i}.txt").write_text(code(i))
    rows = [code(i) for i in range(30, 35)]
    pq.write_table(pa.table({"content": [*rows[:2], None, *rows[2:]], "n": list(range(6))}),
                   tmp_path / "c.parquet", row_group_size=2)  # fmt: skip
    lines = "".join(json.dumps({"content": code(i)}) + "\n" for i in range(35, 40))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    inputs = [str(corpus), str(tmp_path / "c.parquet"), str(tmp_path / "c.jsonl.zst")]
    datasets = pytest.importorskip("datasets")  # the dev install has it (lm-eval's)
    hub = datasets.Dataset.from_dict({"content": [code(i) for i in range(40, 50)]})
    hub.save_to_disk(str(tmp_path / "hf"), num_shards=2)
    return [*inputs, str(tmp_path / "hf")]


def test_tokenizer_then_shards_then_training(tmp_path: Path) -> None:
    corpus = _shipped_corpus(tmp_path)
    read = ["--text-field", "content", "--on-bad-record", "skip"]
    tok = tmp_path / "tokenizer.json"
    proc = _run(["tools/train_tokenizer.py", "--input", *corpus, "--vocab-size", "300",
                 "--output", str(tok), *read])  # fmt: skip
    assert json.loads(tok.read_text())["model"]["type"] == "BPE"
    assert "skipped 1 bad record(s), first: " in proc.stderr and "c.parquet row 2" in proc.stderr
    out = tmp_path / "shards"
    proc = _run(["tools/prepare_data.py", "--input", *corpus, "--tokenizer", str(tok),
                 "--output", str(out), "--shard-tokens", "2000", "--workers", "2",
                 *read])  # fmt: skip
    assert "train" in proc.stdout and "1 bad record(s) skipped" in proc.stdout
    summary = proc.stdout.splitlines()[1:]  # per split, the skipped records, the speed
    assert summary[0].startswith("  train ") and "tokens/document)" in summary[0]
    assert summary[1].startswith("  val ")
    assert summary[2] == "  skipped 1 bad record(s), 0 not-text document(s)"
    assert summary[3].endswith("MB/s of text")
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["documents"], manifest["bad_records"], manifest["text_field"]) == (
        50, 1, "content")  # fmt: skip
    assert manifest["bad_record_examples"][0].endswith("c.parquet row 2: 'content' is null")
    strict = ["--output", str(tmp_path / "no"), "--text-field", "content"]  # error: the default
    refused = _run(["tools/prepare_data.py", "--input", *corpus, "--tokenizer", str(tok),
                    *strict], expect=2)  # fmt: skip
    assert "c.parquet row 2: 'content' is null" in refused.stderr
    run_dir = tmp_path / "run"
    _run(["-m", "pretrain", "data=shards", f"data.path={out}", "data.num_workers=2",
          "model=tiny", "model.vocab_size=320", "trainer.device=cpu", "trainer.max_steps=5",
          "trainer.seq_len=32", "logger.wandb.mode=disabled", f"run_dir={run_dir}"])  # fmt: skip
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert metrics[-1]["data_skipped_shards"] == 0


def test_pipe_urls_stream_like_files(tmp_path: Path) -> None:
    from pretrain.data import shards
    from pretrain.data.stream import build_loader

    (tmp_path / "c").mkdir()
    for i in range(12):
        (tmp_path / "c" / f"{i}.txt").write_text(f"text number {i} " * 40)
    shards.prepare([tmp_path / "c"], "bytes", tmp_path / "s", shard_tokens=1000,
                   member_tokens=256, val_fraction=0.0, progress=False)  # fmt: skip
    n = len(list((tmp_path / "s").glob("train-*.tar")))
    piped = build_loader(f"pipe:cat {tmp_path}/s/train-{{000000..{n - 1:06d}}}.tar", 259, 16, 2,
                         seed=0, num_workers=0)  # fmt: skip
    local = build_loader(str(tmp_path / "s" / "train-*.tar"), 259, 16, 2, seed=0, num_workers=0)
    for _ in range(10):
        assert next(piped).equal(next(local))


def test_binary_input_is_skipped_and_counted_not_tokenized(tmp_path: Path) -> None:
    """A binary file among text files (named .txt, as a stray one would be), and a .jsonl
    line of invalid UTF-8: named in a warning, counted in the manifest, not tokenized. A
    corpus with no text at all: exit 2, for both tools."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"{i}.txt").write_text(f"plain text number {i}. " * 30)
    (corpus / "image.txt").write_bytes(bytes(range(256)) * 40)  # NULs and invalid UTF-8
    (corpus / "docs.jsonl").write_bytes(
        b'{"text": "a fine line of text"}\n' + b'{"text": "' + b"\xff\xfe" * 50 + b'"}\n'
    )
    out = tmp_path / "shards"
    proc = _run(["tools/prepare_data.py", "--input", str(corpus), "--tokenizer", "bytes",
                 "--output", str(out)])  # fmt: skip
    assert "skipped 2 document(s) that are not text" in proc.stderr
    assert "docs.jsonl:2: " in proc.stderr or "image.txt: it holds NUL" in proc.stderr
    assert "2 not-text document(s) skipped" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["documents"] == 6 and manifest["rejected_documents"] == 2
    assert any("image.txt: it holds NUL" in r for r in manifest["rejected_examples"])
    assert any(
        "docs.jsonl:2: " in r and "not valid UTF-8" in r for r in manifest["rejected_examples"]
    )

    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "blob.txt").write_bytes(bytes(range(256)) * 40)
    proc = _run(["tools/prepare_data.py", "--input", str(binary), "--tokenizer", "bytes",
                 "--output", str(tmp_path / "none")], expect=2)  # fmt: skip
    assert "holds no documents (1 rejected as not text" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run(["tools/train_tokenizer.py", "--input", str(binary), "--vocab-size", "300",
                 "--output", str(tmp_path / "t.json")], expect=2)  # fmt: skip
    assert "holds no text to train on (1 rejected as not text)" in proc.stderr
    assert not (tmp_path / "t.json").exists()


def test_train_tokenizer_says_so_when_the_corpus_is_empty_or_too_small(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    proc = _run(["tools/train_tokenizer.py", "--input", str(empty), "--vocab-size", "300",
                 "--output", str(tmp_path / "t.json")], expect=2)  # fmt: skip
    assert "holds no text to train on; nothing written" in proc.stderr
    assert not (tmp_path / "t.json").exists()
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("abab " * 10)
    proc = _run(["tools/train_tokenizer.py", "--input", str(small), "--vocab-size", "5000",
                 "--output", str(tmp_path / "t.json")])  # fmt: skip
    from tokenizers import Tokenizer

    n = Tokenizer.from_file(str(tmp_path / "t.json")).get_vocab_size()
    assert n < 5000
    assert f"warning: trained {n} tokens, fewer than the 5000 asked" in proc.stderr
    assert f"trained {n} tokens" in proc.stdout


def test_tasks_then_merge_through_the_tool(tmp_path: Path) -> None:
    """--num-tasks/--task-index write task directories; --merge refuses (exit 2, naming the
    task to rerun) until all are done, then writes the manifest."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(f"document {i} " * 50)
    out = tmp_path / "out"
    task = ["tools/prepare_data.py", "--input", str(corpus), "--tokenizer", "bytes",
            "--output", str(out), "--num-tasks", "2"]  # fmt: skip
    proc = _run([*task, "--task-index", "1"])
    assert "task 1 of 2: 3 input file(s)" in proc.stderr
    refused = _run(["tools/prepare_data.py", "--merge", str(out)], expect=2)
    assert "1 of 2 task(s) are missing or unfinished (no manifest.json): 0." in refused.stderr
    _run([*task, "--task-index", "0"])
    merged = _run(["tools/prepare_data.py", "--merge", str(out)])
    assert merged.stdout.startswith("6 documents")
    assert json.loads((out / "manifest.json").read_text())["tasks"] == 2
