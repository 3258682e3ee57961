"""Corpus inputs, read one way for every tool (tools/train_tokenizer.py, tools/prepare_data.py,
the demo corpus): which files an input names (`find_inputs`) and the documents in them
(`read_documents`), streamed, never a whole file in memory.

Formats, by file name:
- plain text (`.txt`, `.md`, `.py`, `.rst`): the whole file is one document;
- JSON lines (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.json.gz`, `.zst`): one document per line,
  its `text_field`;
- parquet (`.parquet`: FineWeb, DCLM, a hub dataset's snapshot): the `text_field` column, read
  a record batch at a time;
- Arrow IPC (`.arrow`): the same, e.g. the files of a Hugging Face dataset directory.

A directory is a Hugging Face `save_to_disk` dataset when it holds `state.json` (its arrow
files, in their order) or `dataset_dict.json` (every split's, in the listed order); any other
directory contributes the files of the formats above below it, sorted by path.

A record without the text field, with a null or a non-string value, or a line that is not
JSON is a bad record: `on_bad_record="error"` stops at the first, naming the file and the
row; `"skip"` counts them (`ReadReport`). Documents that are not text (`not_text`) are
skipped and counted apart.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".zst")
TABLE_SUFFIXES = (".parquet", ".arrow")
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + TABLE_SUFFIXES
BAD_RECORD_CHOICES = ("error", "skip")
BATCH_ROWS = 1024
"""Rows per record batch read from a parquet or arrow file."""

NOT_TEXT_FRACTION = 0.01
"""A document with more than this fraction of its characters not valid UTF-8, or with a NUL
character, is not text (a binary file, another encoding): skipped and counted."""


class BadRecord(ValueError):
    """A record without usable text, with on_bad_record=error."""


@dataclass
class ReadReport:
    """What reading skipped: records without usable text, and documents that are not text.
    Each list holds "<where>: <why>" for the first few; the counts are complete."""

    bad_records: int = 0
    bad_examples: list[str] = field(default_factory=list)
    rejected: int = 0
    """Documents skipped as not text."""
    rejected_examples: list[str] = field(default_factory=list)
    bytes_done: int = 0
    """How much of the input's size on disk has been read (progress against the total): the
    files read to their end, and the part of the current one (its compressed bytes read, or
    the share of its rows)."""

    EXAMPLES = 10

    def bad(self, where: str, why: str) -> None:
        self.bad_records += 1
        if len(self.bad_examples) < self.EXAMPLES:
            self.bad_examples.append(f"{where}: {why}")

    def reject(self, where: str, why: str) -> None:
        self.rejected += 1
        if len(self.rejected_examples) < self.EXAMPLES:
            self.rejected_examples.append(f"{where}: {why}")


def add_arguments(parser: Any, required: bool = True) -> None:
    """The input options both corpus tools take (argparse): --input, --text-field,
    --on-bad-record."""
    parser.add_argument("--input", nargs="+", required=required,
                        help="files or directories: text, jsonl(.gz/.zst), parquet, arrow, "
                             "Hugging Face dataset directories")  # fmt: skip
    parser.add_argument(
        "--text-field",
        default="text",
        help="the column or JSON key holding the text (default: text)",
    )
    parser.add_argument("--on-bad-record", choices=BAD_RECORD_CHOICES, default="error",
                        help="a record without usable text: stop naming it (error), or skip "
                             "and count it (skip)")  # fmt: skip


def find_inputs(inputs: list[str | Path]) -> list[Path]:
    """The files `inputs` name: files as given, Hugging Face dataset directories as their
    data files, other directories as the readable files below them (sorted)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += _hf_dataset_files(item) or sorted(
                p for p in item.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES)
            )
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"corpus input {item} does not exist")
    return files


def _hf_dataset_files(directory: Path) -> list[Path]:
    """A `save_to_disk` dataset's arrow files in order ([] for another directory)."""
    if (directory / "dataset_dict.json").is_file():
        splits = json.loads((directory / "dataset_dict.json").read_text())["splits"]
        return [f for split in splits for f in _hf_dataset_files(directory / split)]
    state = directory / "state.json"
    if not state.is_file():
        return []
    names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} is a Hugging Face dataset missing {missing[0]}")
    return [directory / n for n in names]


def not_text(text: str) -> str | None:
    """Why `text` (decoded with errors="replace") is not text, or None when it is."""
    if "\x00" in text:
        return "it holds NUL characters (a binary file?)"
    bad = text.count("\ufffd")
    if bad > NOT_TEXT_FRACTION * len(text):
        return (f"{bad:,} of its {len(text):,} characters are not valid UTF-8 (binary, or "
                "another encoding?)")  # fmt: skip
    return None


def read_documents(
    files: list[Path], text_field: str = "text", on_bad_record: str = "error",
    report: ReadReport | None = None,
) -> Iterator[str]:  # fmt: skip
    """The documents of `files`, in order (see the module's docstring for the formats)."""
    if on_bad_record not in BAD_RECORD_CHOICES:
        raise ValueError(f"on_bad_record={on_bad_record!r}: choose error or skip")
    report = report if report is not None else ReadReport()
    for path in files:
        yield from _file_documents(path, text_field, on_bad_record, report)


def _file_documents(
    path: Path, text_field: str, on_bad_record: str, report: ReadReport
) -> Iterator[str]:
    done, size = report.bytes_done, path.stat().st_size
    for where, value, position in _records(path, text_field, size):
        report.bytes_done = done + position
        text = _usable(where, value, text_field, on_bad_record, report)
        if text:
            yield text
    report.bytes_done = done + size


def _usable(
    where: str, value: Any, text_field: str, on_bad_record: str, report: ReadReport
) -> str | None:
    """The record's text, or None when it has none to give (counted in `report`)."""
    if not isinstance(value, str):
        why = value.why if isinstance(value, _Missing) else _wrong_type(value, text_field)
        if on_bad_record == "error":
            raise BadRecord(
                f"{where}: {why}. Pick the column with --text-field, or skip such "
                "records with --on-bad-record skip (they are counted)"
            )
        report.bad(where, why)
        return None
    reason = not_text(value)
    if reason is not None:
        report.reject(where, reason)
        return None
    return value


@dataclass(frozen=True)
class _Missing:
    why: str


def _wrong_type(value: object, text_field: str) -> str:
    if value is None:
        return f"{text_field!r} is null"
    return f"{text_field!r} is a {type(value).__name__}, not a string"


def _records(path: Path, text_field: str, size: int) -> Iterator[tuple[str, Any, int]]:
    """(where, the text field's value, how much of the file's `size` on disk is read so far)
    of each record of `path`; `_Missing` where a record has no such field."""
    name = path.name
    if name.endswith(TABLE_SUFFIXES):
        yield from _table_records(path, text_field, size)
        return
    with _open_text(path) as (text, raw):
        if name.endswith(JSONL_SUFFIXES):
            for where, value in _json_records(path, text, text_field):
                yield where, value, raw.tell()
        else:
            yield str(path), text.read(), size


@contextmanager
def _open_text(path: Path) -> Iterator[tuple[io.TextIOBase, BinaryIO]]:
    """The file as text (decompressed by its suffix), and the file itself, whose position
    says how much of it is read."""
    with path.open("rb") as raw:
        if path.name.endswith(".gz"):
            stream: Any = gzip.GzipFile(fileobj=raw)  # leaves `raw` open
        elif path.name.endswith(".zst"):
            import zstandard

            decompressor = zstandard.ZstdDecompressor()  # reads of 64 KB: progress in steps
            stream = decompressor.stream_reader(raw, read_size=1 << 16, closefd=False)
        else:
            stream = raw
        with io.TextIOWrapper(stream, encoding="utf-8", errors="replace") as text:
            yield text, raw


def _json_records(path: Path, lines: Iterator[str], text_field: str) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if "\ufffd" in line or "\x00" in line:
                yield where, line  # not_text names it better than the JSON error
            else:
                yield where, _Missing(f"not a JSON line ({e})")
            continue
        if not isinstance(record, dict) or text_field not in record:
            yield where, _Missing(f"no {text_field!r} field")
        else:
            yield where, record[text_field]


def _table_records(path: Path, text_field: str, size: int) -> Iterator[tuple[str, Any, int]]:
    """Rows of a parquet or arrow file, one record batch at a time."""
    row = 0
    for column, rows, names, position in _table_batches(path, text_field, size):
        if column is None:  # the file has no such column: every row lacks it
            values = [_Missing(f"no {text_field!r} column (the columns: {', '.join(names)})")]
            values *= rows
        else:
            values = column.to_pylist()
        for value in values:
            yield f"{path} row {row}", value, position
            row += 1


def _table_batches(
    path: Path, text_field: str, size: int
) -> Iterator[tuple[Any, int, list[str], int]]:
    """(the text column or None when there is none, rows, the column names, how much of the
    file's `size` is read with this batch) per batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.name.endswith(".parquet"):
        parquet = pq.ParquetFile(path)
        names, total = parquet.schema_arrow.names, max(parquet.metadata.num_rows, 1)
        if text_field not in names:
            yield None, parquet.metadata.num_rows, names, size
            return
        done = 0
        # A row group at a time: one iter_batches over the whole file reads ahead with
        # pyarrow's threads and held about the whole file in memory (pyarrow 26;
        # tests/data/test_prepare_memory.py).
        for group in range(parquet.num_row_groups):
            for batch in parquet.iter_batches(BATCH_ROWS, [group], columns=[text_field]):
                done += batch.num_rows
                yield batch.column(0), batch.num_rows, names, size * done // total
        return
    with pa.memory_map(str(path)) as source:
        try:
            stream = pa.ipc.open_stream(source)
            names = stream.schema.names
            batches = ((batch, source.tell()) for batch in stream)
        except pa.ArrowInvalid:  # the random-access format
            source.seek(0)
            file = pa.ipc.open_file(source)
            n, names = file.num_record_batches, file.schema.names
            batches = ((file.get_batch(i), size * (i + 1) // n) for i in range(n))
        for batch, position in batches:
            column = batch.column(text_field) if text_field in names else None
            yield column, batch.num_rows, names, position
