"""Corpus inputs as they ship: parquet (row groups, extra columns, nulls), Hugging Face
dataset directories, JSON lines; bad records stop naming the file and row, or are counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.data.inputs import BadRecord, ReadReport, find_inputs, read_documents

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_parquet(path: Path, texts: list[object], field: str = "text") -> Path:
    """Several row groups (3 rows each) and an extra column, as FineWeb ships."""
    table = pa.table({"id": list(range(len(texts))), field: texts,
                      "url": [f"https://x/{i}" for i in range(len(texts))]})  # fmt: skip
    pq.write_table(table, path, row_group_size=3)
    return path


def test_parquet_reads_the_text_column_across_row_groups(tmp_path: Path) -> None:
    texts = [f"document {i}" for i in range(8)]
    path = write_parquet(tmp_path / "a.parquet", texts)
    assert pq.ParquetFile(path).num_row_groups == 3
    assert list(read_documents(find_inputs([path]))) == texts
    other = write_parquet(tmp_path / "b.parquet", texts, field="content")
    assert list(read_documents([other], text_field="content")) == texts


def test_a_null_text_stops_naming_the_row_or_is_counted(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", ["one", "two", None, "four"])
    with pytest.raises(BadRecord, match=r"a\.parquet row 2: 'text' is null.*--on-bad-record skip"):
        list(read_documents([path]))
    report = ReadReport()
    docs = list(read_documents([path], on_bad_record="skip", report=report))
    assert docs == ["one", "two", "four"] and report.bad_records == 1
    numbers = ReadReport()  # a column that is not text
    assert list(read_documents([path], "id", "skip", numbers)) == []
    assert numbers.bad_records == 4
    assert numbers.bad_examples[3].endswith("row 3: 'id' is a int, not a string")


def test_a_missing_column_names_the_columns_there(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "a.parquet", ["x", "y"], field="body")
    with pytest.raises(BadRecord, match=r"row 0: no 'text' column \(the columns: id, body, url\)"):
        list(read_documents([path]))
    report = ReadReport()
    assert list(read_documents([path], on_bad_record="skip", report=report)) == []
    assert report.bad_records == 2


def test_json_lines_bad_records_name_the_line(tmp_path: Path) -> None:
    lines = ['{"text": "good"}', '{"text": null}', '{"other": 1}', "not json", "[1, 2]",
             '{"text": 7}', '{"text": "also good"}']  # fmt: skip
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRecord, match=r"c\.jsonl:2: 'text' is null"):
        list(read_documents([path]))
    report = ReadReport()
    assert list(read_documents([path], on_bad_record="skip", report=report)) == [
        "good",
        "also good",
    ]
    assert report.bad_records == 5
    assert [e.split(": ", 1)[1] for e in report.bad_examples] == [
        "'text' is null", "no 'text' field", "not a JSON line (Expecting value: line 1 "
        "column 1 (char 0))", "no 'text' field", "'text' is a int, not a string",
    ]  # fmt: skip


def test_a_hugging_face_dataset_directory_reads_in_its_own_order(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    texts = [f"row {i}" for i in range(40)]
    ds = datasets.Dataset.from_dict({"text": texts, "n": list(range(40))})
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    files = find_inputs([tmp_path / "ds"])
    assert [f.suffix for f in files] == [".arrow"] * 3
    assert list(read_documents(files)) == texts
    both = datasets.DatasetDict({"train": ds, "test": ds.select(range(5))})
    both.save_to_disk(str(tmp_path / "dd"))
    docs = list(read_documents(find_inputs([tmp_path / "dd"])))
    assert docs == texts + texts[:5]  # every split, in dataset_dict.json's order


def test_a_directory_of_mixed_files_and_a_missing_input(tmp_path: Path) -> None:
    write_parquet(tmp_path / "b.parquet", ["p"])
    (tmp_path / "a.txt").write_text("t")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "j"}) + "\n")
    (tmp_path / "notes.csv").write_text("ignored")
    assert list(read_documents(find_inputs([tmp_path]))) == ["t", "p", "j"]
    with pytest.raises(FileNotFoundError, match=r"corpus input .*nope does not exist"):
        find_inputs([tmp_path / "nope"])


def test_two_workers_write_the_same_bytes_as_one(tmp_path: Path) -> None:
    """Shards and manifest do not depend on --workers: documents keep their input order
    (batches of 16 here, so many are in flight) and the manifest holds no timing."""
    from pretrain.data import shards

    rows = [f"document {i}: " + "word " * (i % 37) + f"end {i}" for i in range(400)]
    corpus = write_parquet(tmp_path / "c.parquet", rows)
    outs = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        shards.prepare([corpus], "bytes", out, shard_tokens=3000, member_tokens=500,
                       val_fraction=0.1, batch_docs=16, progress=False,
                       workers=workers)  # fmt: skip
        outs[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert outs[1] == outs[2] == outs[3]
    manifest = json.loads(outs[2]["manifest.json"])
    assert manifest["documents"] == 400 and len(manifest["train"]) > 3 and manifest["val"]


def _compressed(path: Path, lines: list[str]) -> Path:
    body = "".join(line + "\n" for line in lines).encode()
    if path.name.endswith(".gz"):
        import gzip

        body = gzip.compress(body)
    elif path.name.endswith(".zst"):
        zstandard = pytest.importorskip("zstandard")
        body = zstandard.ZstdCompressor().compress(body)
    path.write_bytes(body)
    return path


def _arrow(path: Path, texts: list[str], stream: bool) -> Path:
    table = pa.table({"text": texts})
    with pa.OSFile(str(path), "wb") as sink:
        writer = (pa.ipc.new_stream if stream else pa.ipc.new_file)(sink, table.schema)
        for batch in table.to_batches(max_chunksize=100):
            writer.write_batch(batch)
        writer.close()
    return path


@pytest.mark.parametrize(
    "name", ["c.jsonl", "c.jsonl.gz", "c.jsonl.zst", "c.parquet", "stream.arrow", "file.arrow"]
)
def test_progress_moves_within_one_large_file(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The progress bar's count moves while a single file is read (not only at its end):
    bytes read of a (compressed) JSON lines file, the share of a table's rows."""
    import random

    from pretrain.data import inputs

    monkeypatch.setattr(inputs, "BATCH_ROWS", 100)  # 30 record batches of a parquet file

    rng = random.Random(0)  # text that compresses little, so compressed files are large too
    texts = [" ".join(f"{rng.getrandbits(40):x}" for _ in range(30)) for _ in range(3000)]
    first = _compressed(tmp_path / "first.jsonl", [json.dumps({"text": "x"})])
    path = tmp_path / name
    if name.endswith(".parquet"):
        write_parquet(path, texts)
    elif name.endswith(".arrow"):
        _arrow(path, texts, stream=name.startswith("stream"))
    else:
        _compressed(path, [json.dumps({"text": t}) for t in texts])
    report = ReadReport()
    seen = [report.bytes_done for _ in read_documents([first, path], report=report)][1:]
    base, size = first.stat().st_size, path.stat().st_size
    assert seen == sorted(seen) and base <= seen[0] < base + size / 2
    assert len(set(seen)) >= 5, f"the count moved {len(set(seen))} times in {size:,} bytes"
    assert seen[-1] <= base + size == report.bytes_done
