"""The demo conversation set (`data=sft data.path=demo`, conf/experiment/sft_demo.yaml): made
here from this Python's standard library, no download, for the demo model (pretrained on
the same library's sources) to learn to answer in turns.

Each public function and class of a fixed list of modules gives one exchange: where it lives
("Which module has `dumps`?" -> "`dumps` is in the `json` module."), how to import it
("from json import dumps"), or how to call it by its full name; some conversations open with
a system message, and one in three holds two exchanges. The same Python writes the same
file.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
from pathlib import Path

MODULES = ("os", "os.path", "json", "re", "math", "random", "shutil", "itertools", "functools",
           "collections", "string", "textwrap", "time", "datetime", "heapq", "bisect", "copy",
           "glob", "fnmatch", "base64", "hashlib", "struct", "csv", "pathlib", "tempfile",
           "statistics", "operator", "zlib", "gzip", "difflib")  # fmt: skip
SYSTEM = "You answer questions about the Python standard library in one line."
FILE = "conversations.jsonl"


def public_names(module: str) -> list[str]:
    """The module's own public functions and classes, sorted."""
    mod = importlib.import_module(module)
    own = {module, mod.__name__, "posix", "_" + module.split(".")[-1]}
    return sorted(
        name for name, value in vars(mod).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isbuiltin(value) or inspect.isclass(value))
        and getattr(value, "__module__", None) in own
    )  # fmt: skip


def exchange(module: str, name: str, kind: int) -> list[dict[str, str]]:
    """One question about `module.name` and its answer (`kind` 0-2 picks the question)."""
    question, answer = [
        (f"Which module has `{name}`?", f"`{name}` is in the `{module}` module."),
        (f"How do I import {name}?", f"from {module} import {name}"),
        (f"What is the full name of {name}?", f"{module}.{name}"),
    ][kind]
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def conversations() -> list[dict[str, list[dict[str, str]]]]:
    """Every conversation of the demo set, in a fixed order."""
    pairs = [(m, n) for m in MODULES for n in public_names(m)]
    out, i = [], 0
    while i < len(pairs):
        h = int.from_bytes(hashlib.blake2b(f"{pairs[i]}".encode(), digest_size=4).digest())
        turns = 2 if h % 3 == 0 and i + 1 < len(pairs) else 1
        messages = [{"role": "system", "content": SYSTEM}] if h % 4 == 0 else []
        for j in range(turns):
            messages += exchange(*pairs[i + j], kind=(h >> 4 >> j) % 3)
        out.append({"messages": messages})
        i += turns
    return out


def write_demo(directory: str | Path) -> Path:
    """The demo set as `directory/conversations.jsonl` (written once; atomically)."""
    path = Path(directory).expanduser() / FILE
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{FILE}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(c) + "\n" for c in conversations()), encoding="utf-8")
    os.replace(tmp, path)
    return path
