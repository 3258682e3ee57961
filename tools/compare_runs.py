"""Print a table of the final metrics of several runs, one row each.

    python tools/compare_runs.py runs/*
    python tools/compare_runs.py runs/a runs/b --format markdown --sort final_loss

Final loss is the mean of the last `--last` steps' losses (one step is noisy); tokens/s and
MFU are medians over all steps (the first hold warm-up and compilation); data wait is the
share of step time spent waiting for batches; hours is the summed step time.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

from pretrain.report import load_runs, summarize

COLUMNS = [  # (summary key, header, format)
    ("run", "run", "{}"),
    ("steps", "steps", "{:,}"),
    ("tokens", "tokens", "{:,}"),
    ("world_size", "ranks", "{}"),
    ("final_loss", "final loss", "{:.4f}"),
    ("min_loss", "min loss", "{:.4f}"),
    ("val_loss", "val loss", "{:.4f}"),
    ("val_ppl", "val ppl", "{:.2f}"),
    ("tokens_per_s", "tok/s", "{:,.0f}"),
    ("tokens_per_s_per_gpu", "tok/s/dev", "{:,.0f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("data_wait_share", "data wait", "{:.1%}"),
    ("peak_mem_gib", "peak GiB", "{:.2f}"),
    ("skipped_steps", "skipped", "{}"),
    ("train_hours", "hours", "{:.3f}"),
]


def cell(value: object, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def render(rows: list[dict], style: str) -> str:
    """The table as aligned text or markdown; columns no run has are left out."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    table = [[header for _, header, _ in cols]]
    table += [[cell(r.get(key), fmt) for key, _, fmt in cols] for r in rows]
    if style == "markdown":
        lines = ["| " + " | ".join(row) + " |" for row in table]
        lines.insert(1, "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = []
    for row in table:
        cells = [v.rjust(w) for v, w in zip(row, widths, strict=True)]
        cells[0] = row[0].ljust(widths[0])  # run names read best left-aligned
        lines.append("  ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="run dirs (or metrics.jsonl files)")
    parser.add_argument("--format", choices=("table", "markdown", "csv", "json"), default="table")
    parser.add_argument("--sort", choices=[key for key, _, _ in COLUMNS], help="sort rows by")
    parser.add_argument("--last", type=int, default=10, help="steps averaged for final loss")
    args = parser.parse_args()
    if args.last < 1:
        parser.error(f"--last {args.last}: must be >= 1")
    try:
        runs = load_runs(args.runs)
    except (OSError, ValueError) as e:
        parser.error(str(e))  # exit status 2, with the usage line
    rows = [summarize(run, args.last) for run in runs]
    if args.sort:
        rows.sort(key=lambda r: (r[args.sort] is None, r[args.sort] or 0))
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    else:
        print(render(rows, args.format))


if __name__ == "__main__":
    main()
