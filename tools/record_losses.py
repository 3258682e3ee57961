"""Record the per-step losses of a few fixed runs, or compare them with a recording: the
check that a restructuring left the math alone.

    python tools/record_losses.py --record baseline.json   # before the change
    python tools/record_losses.py --compare baseline.json  # after: equal within --rel

The runs (fp32, CPU, tiny model, 6 steps): synthetic data on 1 rank ZeRO-0 and on 2 ranks
ZeRO-3 (gloo); token shards read by 2 DataLoader workers; a ZeRO-1 run stopped after step 3
and resumed. Floating
point results depend on the machine's CPU kernels: compare recordings made on one machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE = [
    "trainer.device=cpu", "model=tiny", "logger.wandb.mode=disabled", "trainer.seq_len=32",
    "precision=fp32", "trainer.global_batch_size=8", "trainer.micro_batch_size=2",
    "optim.lr=3e-3", "optim.warmup_steps=2", "trainer.max_steps=6",
    "checkpoint.save_final=false",
]  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(run_dir: Path, overrides: list[str], nproc: int = 1) -> list[dict]:
    launcher = [sys.executable, "-m", "pretrain"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_port()}", "-m",
                    "pretrain"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([*launcher, *BASE, f"run_dir={run_dir}", *overrides], cwd=REPO,
                          env=env, capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"run {run_dir.name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _shards(root: Path) -> Path:
    from pretrain.data import shards

    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(40):
        words = " ".join(f"w{(i * 7 + j) % 97}" for j in range(150 + i % 13))
        (corpus / f"{i:03d}.txt").write_text(f"document {i}: {words}")
    shards.prepare([corpus], "bytes", root / "shards", shard_tokens=4000, member_tokens=1000,
                   val_fraction=0.0, progress=False)  # fmt: skip
    return root / "shards"


def record_all(root: Path) -> dict[str, list[list[float]]]:
    """{run name: [[step, loss, grad_norm], ...]} for each fixed run."""
    data = ["data=shards", f"data.path={_shards(root)}", "data.num_workers=2",
            "model.vocab_size=259"]  # fmt: skip
    runs = {
        "1rank-zero0": _train(root / "a", ["data=synthetic"]),
        "2rank-zero3": _train(root / "b", ["data=synthetic", "deepspeed.zero_stage=3"], nproc=2),
        "shards-2workers": _train(root / "c", data),
    }
    resumed = ["data=synthetic", "deepspeed.zero_stage=1", "checkpoint.save_final=true"]
    _train(root / "d", [*resumed, "trainer.stop_at_step=3"])
    runs["resumed-zero1"] = _train(root / "d", resumed)
    return {k: [[m["step"], m["loss"], m["grad_norm"]] for m in v] for k, v in runs.items()}


def compare(baseline: dict, now: dict, rel: float) -> list[str]:
    """Differences beyond `rel` (relative), as lines; [] when the runs match."""
    problems = []
    for name, rows in baseline.items():
        got = now.get(name, [])
        if [r[0] for r in got] != [r[0] for r in rows]:
            problems.append(f"{name}: steps {[r[0] for r in got]}, recorded {[r[0] for r in rows]}")
            continue
        for (step, loss, norm), (_, loss2, norm2) in zip(rows, got, strict=True):
            for what, a, b in (("loss", loss, loss2), ("grad_norm", norm, norm2)):
                if not math.isclose(a, b, rel_tol=rel, abs_tol=0.0):
                    problems.append(f"{name} step {step} {what}: {b!r}, recorded {a!r}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--record", type=Path, help="write the runs' losses here")
    what.add_argument("--compare", type=Path, help="compare the runs with this recording")
    parser.add_argument("--rel", type=float, default=1e-6, help="relative tolerance")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        now = record_all(Path(tmp))
    if args.record:
        args.record.write_text(json.dumps(now, indent=1) + "\n")
        print(f"recorded {len(now)} runs -> {args.record}")
        return
    problems = compare(json.loads(args.compare.read_text()), now, args.rel)
    for line in problems:
        print(line)
    print(f"{len(now)} runs: " + (f"{len(problems)} difference(s) beyond {args.rel:g}"
                                   if problems else f"equal within {args.rel:g}"))  # fmt: skip
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
