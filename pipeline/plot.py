"""Plot loss curves of one or more runs to PNG.

    python -m pipeline.plot runs/demo [runs/other ...] [--output loss.png] [--keys fine_loss coarse_loss]
        [--smooth 20] [--labels a b]

Each run is a directory with metrics.jsonl (or the file itself). One panel per metric key; train
curves are solid, valid points are markers. Resumed runs append to the same file; the last record
of a step wins.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.metrics import read_metrics


def smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(runs: list[Path], output: Path, keys: list[str], window: int = 1, labels: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on cluster nodes
    import matplotlib.pyplot as plt

    labels = labels or [r.name if r.is_dir() else r.parent.name for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for run, label in zip(runs, labels):
        train, valid = read_metrics(run, "train"), read_metrics(run, "valid")
        if not train:
            raise ValueError(f"{run}: no train records in metrics.jsonl")
        for ax, key in zip(axes[0], keys):
            steps = [s for s, r in train.items() if key in r]
            line, = ax.plot(steps, smooth([train[s][key] for s in steps], window), label=f"{label} train")
            vsteps = [s for s, r in valid.items() if key in r]
            if vsteps:
                ax.plot(vsteps, [valid[s][key] for s in vsteps], "o--", color=line.get_color(), label=f"{label} valid")
    for ax, key in zip(axes[0], keys):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl) or metrics files")
    parser.add_argument("--output", type=Path, help="PNG path (default: <first run>/loss.png)")
    parser.add_argument("--keys", nargs="+", default=["fine_loss", "coarse_loss"], help="metrics to plot, one panel each")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window over train steps")
    parser.add_argument("--labels", nargs="+", help="legend names (default: directory names)")
    args = parser.parse_args(argv)
    for run in args.runs:
        metrics = run / "metrics.jsonl" if run.is_dir() else run
        if not metrics.is_file():
            parser.error(f"{run}: no metrics.jsonl (is it a pipeline/pretrain.py output_dir?)")
    output = args.output or (args.runs[0] if args.runs[0].is_dir() else args.runs[0].parent) / "loss.png"
    print(plot(args.runs, output, args.keys, args.smooth, args.labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
