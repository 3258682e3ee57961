"""List a run's checkpoints: step, tokens, size, complete or not.

    python tools/inspect_ckpt.py RUN_DIR [--json]

A checkpoint is complete when its commit marker (COMMITTED.json) lists every file at its
size (and CRC-32, which resuming verifies); only complete ones are ever resumed from or
exported. Incomplete ones are what an
interrupted save left behind, safe to delete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrain.checkpoint import manager


def describe(path: Path) -> dict:
    complete = manager.is_complete(path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    row = {"name": path.name, "complete": complete, "bytes": size, "step": None, "tokens": None}
    try:
        state = manager.read_client_state(path)
        row.update(state["trainer"])
        derived = state["config"].get("derived", {})
        row["world_size"] = derived.get("world_size")
        row["zero_stage"] = state["config"]["deepspeed"]["zero_stage"]
    except (OSError, ValueError, KeyError):
        pass
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    directory = manager.checkpoint_dir(args.run_dir)
    if not directory.is_dir():
        print(f"error: {directory} does not exist: is {args.run_dir} a run dir?", file=sys.stderr)
        sys.exit(2)
    paths = sorted((p for p in directory.iterdir() if manager.STEP_DIR.match(p.name)),
                   key=lambda p: int(p.name.removeprefix("step_")))  # fmt: skip
    rows = [describe(p) for p in paths]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    print(f"{'checkpoint':<14} {'step':>8} {'tokens':>14} {'size':>10} {'ranks':>5} {'zero':>4}  "
          "status")  # fmt: skip
    for r in rows:
        step = r["step"] if r["step"] is not None else "?"
        tokens = f"{r['tokens']:,}" if r["tokens"] is not None else "?"
        status = "complete" if r["complete"] else "INCOMPLETE (interrupted save; never loaded)"
        ranks, zero = r.get("world_size") or "?", r.get("zero_stage", "?")
        size = f"{r['bytes'] / 2**20:.1f}MB"
        print(f"{r['name']:<14} {step:>8} {tokens:>14} {size:>10} {ranks:>5} {zero:>4}  {status}")
    if not rows:
        print(f"(no checkpoints in {directory})")


if __name__ == "__main__":
    main()
