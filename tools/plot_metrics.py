"""Draw training curves of one or more runs, overlaid, into a PNG.

    python tools/plot_metrics.py runs/a runs/b --output curves.png
    python tools/plot_metrics.py runs/a/metrics.jsonl --output a.png --x step --smooth 0.9

Panels: loss (and validation loss when recorded) against tokens, learning rate, tokens/s per
device, MFU, step time split into data wait and compute, and peak GPU memory. A panel whose
metric no run recorded (MFU on CPU, memory without CUDA) says so instead of staying blank.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pretrain.report import Run, load_runs

MISSING = {  # why a panel can be empty
    "MFU": "not recorded (no peak FLOP/s here: set logger.peak_tflops)",
    "memory": "not recorded (CUDA only)",
}
PANELS = [  # (title, [(key, line style)], y label)
    ("loss", [("loss", "-"), ("val_loss", "o--")], "loss"),
    ("learning rate", [("lr", "-")], "lr"),
    ("throughput", [("tokens_per_s_per_gpu", "-")], "tokens/s per device"),
    ("MFU", [("mfu", "-")], "MFU"),
    ("step time", [("compute_s", "-"), ("data_wait_s", ":")], "seconds (compute -, data wait :)"),
    ("memory", [("mem_peak_gib", "-"), ("mem_allocated_gib", ":")], "GiB (peak -, allocated :)"),
]


def ema(values: list[float], beta: float) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's and W&B's smoothing)."""
    if beta <= 0:
        return values
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def plot(runs: list[Run], output: Path, x: str, smooth: float, size: tuple[int, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    dpi = 100
    fig, axes = plt.subplots(2, 3, figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys, ylabel) in zip(axes.flat, PANELS, strict=True):
        drawn = False
        for i, run in enumerate(runs):
            for key, style in keys:
                xs, ys = run.series(key, x)
                if not ys:
                    continue
                if key in ("loss", "compute_s", "data_wait_s", "tokens_per_s_per_gpu", "mfu"):
                    ys = ema(ys, smooth)
                label = run.name if key == keys[0][0] else f"{run.name} {key}"
                ax.plot(xs, ys, style, color=colors[i % len(colors)], label=label,
                        markersize=3, linewidth=1.2)  # fmt: skip
                drawn = True
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if title == "MFU" and drawn:
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        if drawn:
            ax.legend(fontsize=8)
        else:
            why = MISSING.get(title, "not recorded")
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=dpi)
    plt.close(fig)


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        msg = f"{text!r}: give WIDTHxHEIGHT in pixels, e.g. 1600x900"
        raise argparse.ArgumentTypeError(msg) from None
    return w, h


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="run dirs (or metrics.jsonl files)")
    parser.add_argument("--output", required=True, type=Path, help="the PNG to write")
    parser.add_argument("--x", choices=("tokens", "step"), default="tokens", help="x axis")
    parser.add_argument("--smooth", type=float, default=0.0,
                        help="EMA weight in [0, 1) for loss, speed and times; 0: raw")  # fmt: skip
    parser.add_argument("--size", type=parse_size, default=(1600, 900),
                        help="WIDTHxHEIGHT in pixels (default 1600x900)")  # fmt: skip
    args = parser.parse_args()
    if not 0 <= args.smooth < 1:
        parser.error(f"--smooth {args.smooth}: give a weight in [0, 1), e.g. 0.9")
    try:
        runs = load_runs(args.runs)
    except (OSError, ValueError) as e:
        parser.error(str(e))  # exit status 2, with the usage line
    plot(runs, args.output, args.x, args.smooth, args.size)
    print(args.output)


if __name__ == "__main__":
    main()
