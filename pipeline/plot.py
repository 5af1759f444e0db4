"""Plot loss curves of one or more runs to PNG.

    python -m pipeline.plot runs/demo [runs/other ...] [--output loss.png] [--keys fine_loss coarse_loss]
        [--smooth 20] [--labels a b]

Each run is a directory with metrics.jsonl (or the file itself). One panel per metric key; train
curves are solid, valid points are markers. Resumed runs append to the same file; the last record
of a step wins. Lines that are not a JSON record with a "step" (a line cut by a kill -9) are skipped
with a warning; a run without any train record, a --keys name that no run logs, a --labels count
other than the number of runs, --smooth < 1 and an --output that cannot be written are errors
(exit code 2) before anything is drawn.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.metrics import scan_metrics

# Record fields that are not metrics.
NOT_METRICS = ("step", "split", "time")


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


def metrics_file(run: Path) -> Path:
    return run / "metrics.jsonl" if run.is_dir() else run


def load_run(run: Path) -> tuple[dict[int, dict], dict[int, dict], int]:
    """(train records, valid records, number of skipped lines) of one run."""
    splits, skipped = scan_metrics(run)
    return splits.get("train", {}), splits.get("valid", {}), skipped


def metric_keys(records: dict[int, dict]) -> set[str]:
    return {k for r in records.values() for k, v in r.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def plot(runs: list[Path], output: Path, keys: list[str], window: int = 1, labels: list[str] | None = None,
         loaded: list[tuple[dict, dict, int]] | None = None) -> Path:
    """Draw ``keys`` of ``runs`` to ``output`` (``loaded``: the runs' load_run() results, if already read)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on cluster nodes
    import matplotlib.pyplot as plt

    labels = labels or [r.name if r.is_dir() else r.parent.name for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    if window < 1:
        raise ValueError(f"smoothing window {window}: must be >= 1")
    loaded = loaded or [load_run(run) for run in runs]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for i, (run, label, (train, valid, _)) in enumerate(zip(runs, labels, loaded)):
        if not train:
            raise ValueError(f"{metrics_file(run)}: no train records")
        for ax, key in zip(axes[0], keys):
            color = f"C{i % 10}"  # one colour per run in every panel, even where a run lacks a key
            steps = [s for s, r in train.items() if _number(r.get(key))]
            if steps:
                ax.plot(steps, smooth([train[s][key] for s in steps], window), color=color, label=f"{label} train")
            vsteps = [s for s, r in valid.items() if _number(r.get(key))]
            if vsteps:
                ax.plot(vsteps, [valid[s][key] for s in vsteps], "o--", color=color, label=f"{label} valid")
    for ax, key in zip(axes[0], keys):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(message: str) -> int:
    """One `error: ...` line on stderr and argparse's exit code for bad input."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def _unwritable(output: Path) -> str | None:
    """Why ``output`` cannot be written (None if it can), checked before any drawing."""
    if output.is_dir():
        return f"--output {output} is a directory: give a file name, e.g. --output {output / 'loss.png'}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--output {output}: cannot create the folder {output.parent} ({exc.strerror}): give a writable path"
    if not os.access(output.parent, os.W_OK | os.X_OK) or (output.exists() and not os.access(output, os.W_OK)):
        return f"--output {output}: no permission to write there: give a writable path"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl) or metrics files")
    parser.add_argument("--output", type=Path, help="PNG path (default: <first run>/loss.png)")
    parser.add_argument("--keys", nargs="+", default=["fine_loss", "coarse_loss"], help="metrics to plot, one panel each")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window over train steps (>= 1; 1 = none)")
    parser.add_argument("--labels", nargs="+", help="legend names, one per run (default: directory names)")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        return _fail(f"--smooth {args.smooth}: the moving-average window must be >= 1 (1 = no smoothing)")
    if args.labels is not None and len(args.labels) != len(args.runs):
        return _fail(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs: give one label per run, in the "
                     f"order of the runs (or leave --labels out to use the directory names)")
    for run in args.runs:
        if not metrics_file(run).is_file():
            return _fail(f"{run}: no metrics.jsonl (is it a pipeline/pretrain.py output_dir?)")

    loaded, available = [], set()
    for run in args.runs:
        try:
            train, valid, skipped = load_run(run)
        except OSError as exc:
            return _fail(f"{metrics_file(run)}: cannot read it ({exc.strerror})")
        if not train:
            why = f"{skipped} malformed line(s) and no train record" if skipped else "no train records (empty file?)"
            return _fail(f"{metrics_file(run)}: {why}: plot a run that has logged at least one training step "
                         f"(pipeline/pretrain.py logs every logging.every steps)")
        if skipped:
            print(f"warning: {metrics_file(run)}: skipped {skipped} malformed line(s) (not JSON, or no \"step\"); "
                  f"plotting its {len(train)} train record(s)", file=sys.stderr)
        loaded.append((train, valid, skipped))
        available |= metric_keys(train) | metric_keys(valid)
    unknown = [k for k in args.keys if k not in available]
    if unknown:
        return _fail(f"--keys: no run has {', '.join(unknown)}; the metrics the runs have are: "
                     f"{', '.join(sorted(available))}")

    output = args.output or (args.runs[0] if args.runs[0].is_dir() else args.runs[0].parent) / "loss.png"
    if not output.suffix and not output.is_dir():
        output = output.with_name(output.name + ".png")  # what matplotlib would write: print the real name
    why = _unwritable(output)
    if why:
        return _fail(why)
    try:
        print(plot(args.runs, output, args.keys, args.smooth, args.labels, loaded))
    except OSError as exc:
        return _fail(f"--output {output}: cannot write it ({exc.strerror or exc}): give a writable path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
