"""Scale-out: the output bytes do not depend on --workers, on 2 ranks (gloo and mpirun), or on a kill -9
followed by --resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep import core
from data_prep import format as fmt
from tests.distributed import run_distributed
from tests.test_data_prep_zh import dataset_bytes, small_config, write_corpus

ROOT = Path(__file__).resolve().parents[1]
SHARD_DOCS = 60


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    corpus = write_corpus(tmp / "pd.txt", lines=1200)
    core.build(small_config(corpus, tmp / "ref", shard_documents=SHARD_DOCS))
    return corpus, dataset_bytes(tmp / "ref")


def _cli(corpus: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "data_prep" / "build.py"), "--lang", "zh", "--input", str(corpus),
            "--output", str(output), "--text-mode", "line", "--shard-documents", str(SHARD_DOCS),
            "--valid-fraction", "0.05", "--no-progress", *extra]


def _env() -> dict:
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def test_two_workers_identical_to_one(reference, tmp_path):
    corpus, expected = reference
    meta = core.build(small_config(corpus, tmp_path / "w2", shard_documents=SHARD_DOCS, workers=2))
    assert meta["run"]["workers"] == 2
    assert dataset_bytes(tmp_path / "w2") == expected


def test_shard_size_does_not_change_the_output(reference, tmp_path):
    """Shards cut by characters (uneven documents per shard) and one big shard: the same bytes."""
    corpus, expected = reference

    def without_shard_params(files: dict) -> dict:
        meta = json.loads(files[fmt.META_FILE])
        for key in ("shard_documents", "shard_characters"):
            meta["build"].pop(key)
        return {**files, fmt.META_FILE: meta}

    meta = core.build(small_config(corpus, tmp_path / "chars", shard_documents=SHARD_DOCS, shard_characters=700))
    assert meta["build"]["shard_characters"] == 700
    assert without_shard_params(dataset_bytes(tmp_path / "chars")) == without_shard_params(expected)
    core.build(small_config(corpus, tmp_path / "one", shard_documents=10**6, shard_characters=10**9))
    assert without_shard_params(dataset_bytes(tmp_path / "one")) == without_shard_params(expected)


def test_default_shard_size_scales_with_the_corpus():
    assert core.auto_shard_characters([{"bytes": 10, "content_bytes": 5_000_000}]) == 5_000_000 // 64
    assert core.auto_shard_characters([{"bytes": 1000, "content_bytes": None}]) == 50_000
    assert core.auto_shard_characters([{"bytes": 10**12, "content_bytes": 10**12}]) == 16_000_000


def _rank_build(corpus: str, output: str) -> dict:
    from data_prep import core as rank_core
    from tests.test_data_prep_zh import small_config as config

    comm = rank_core.detect_communicator()
    assert isinstance(comm, rank_core.TorchComm) and comm.size == 2
    meta = rank_core.build(config(Path(corpus), Path(output), shard_documents=SHARD_DOCS))
    return {"rank": comm.rank, "ranks": meta["run"]["ranks"], "documents": meta["stats"]["documents"]}


def test_two_gloo_ranks_identical_to_one_process(reference, tmp_path):
    corpus, expected = reference
    results = run_distributed(_rank_build, world_size=2, args=(str(corpus), str(tmp_path / "g2")), timeout=300)
    assert [r["rank"] for r in results] == [0, 1] and all(r["ranks"] == 2 for r in results)
    assert results[0]["documents"] == results[1]["documents"]
    assert dataset_bytes(tmp_path / "g2") == expected


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs OpenMPI's mpirun (launchers/setup.sh installs it)")
def test_mpirun_two_ranks_identical_to_one_process(reference, tmp_path):
    corpus, expected = reference
    launcher = ["mpirun", "-np", "2", "--oversubscribe"]
    if os.geteuid() == 0:
        launcher.append("--allow-run-as-root")
    proc = subprocess.run(launcher + _cli(corpus, tmp_path / "mpi"), capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ranks=2" in proc.stdout
    assert dataset_bytes(tmp_path / "mpi") == expected


def _run_until(cmd: list[str], work: Path, marker: str, count: int) -> None:
    """Start the build, kill -9 it (and its pool workers) once ``count`` shards carry ``marker``."""
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(work.glob(f"shards/*/{marker}"))) >= count:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert killed, f"the build finished (rc={proc.returncode}) before {count} shards had {marker}"


def test_kill9_then_resume_gives_identical_bytes(reference, tmp_path):
    """Killed while segmenting, resumed and killed again while encoding, resumed to the end."""
    corpus, expected = reference
    out = tmp_path / "killed"
    work = core.work_dir_for(out)
    _run_until(_cli(corpus, out, "--workers", "2"), work, "analyzed.done", 3)
    assert not out.exists() and 3 <= len(list(work.glob("shards/*/analyzed.done"))) < 20
    assert not (work / "fit.done").exists()
    # the same command without --resume refuses to clobber the unfinished work
    again = subprocess.run(_cli(corpus, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr
    _run_until(_cli(corpus, out, "--workers", "2", "--resume"), work, "encoded.done", 3)
    assert not out.exists() and (work / "fit.done").exists()
    assert 3 <= len(list(work.glob("shards/*/encoded.done"))) < 20
    resumed = subprocess.run(_cli(corpus, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    assert dataset_bytes(out) == expected
    assert not work.exists() and not list(tmp_path.glob("killed.partial-*"))


def test_sum_counters_equals_sequential_update():
    """languages.sum_counters == updating one Counter with each in turn: same values and key order,
    for string/tuple keys, empty inputs, and the fallbacks (huge totals, non-integer values)."""
    import random
    from collections import Counter

    from data_prep.languages import sum_counters

    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(500)] + [("a", i) for i in range(50)]
    parts = [Counter({rng.choice(vocab): rng.randint(0, 9) for _ in range(rng.randint(0, 300))}) for _ in range(12)]
    parts.insert(3, Counter())
    expected: Counter = Counter()
    for p in parts:
        expected.update(p)
    got = sum_counters(parts)
    assert got == expected and list(got) == list(expected) and list(got.values()) == list(expected.values())
    assert all(type(v) is int for v in got.values())
    assert sum_counters([]) == Counter() and sum_counters([Counter(a=1)]) == Counter(a=1)
    big = [Counter(a=2**52, b=1), Counter(a=2**52, c=2)]
    assert sum_counters(big) == Counter(a=2**53, b=1, c=2)
    assert sum_counters([Counter(a=0.5), Counter(a=0.25, b=1)]) == Counter(a=0.75, b=1)


def test_packed_count_tables_sum_like_counters():
    """PackedCounter (a shard's counts as one NUL-joined string + an int64 array) round-trips through
    pickle, and sum_count_tables over packed tables == sum_counters over the Counters: same values and
    key order; tables it cannot pack (tuple keys, a NUL in a key, floats, huge values) stay Counters
    and a mix sums through the plain path."""
    import pickle
    import random
    from collections import Counter

    from data_prep.languages import PackedCounter, sum_count_tables, sum_counters

    rng = random.Random(5)
    vocab = [f"w{i}" for i in range(400)] + ["", "中国", "a b", "\x1f"]
    parts = [Counter({rng.choice(vocab): rng.randint(0, 9) for _ in range(rng.randint(0, 200))}) for _ in range(10)]
    parts.insert(2, Counter())
    packed = [PackedCounter.pack(p) for p in parts]
    assert all(isinstance(p, PackedCounter) for p in packed)
    for p, q in zip(parts, packed):
        back = pickle.loads(pickle.dumps(q, protocol=4)).unpack()
        assert back == p and list(back) == list(p)
    expected = sum_counters(parts)
    got = sum_count_tables(packed)
    assert isinstance(got, PackedCounter)
    got = got.unpack()
    assert got == expected and list(got) == list(expected) and all(type(v) is int for v in got.values())
    # sums of sums (worker tables, then the ranks') are the same
    halves = [sum_count_tables(packed[:5]), sum_count_tables(packed[5:])]
    assert list(sum_count_tables(halves).unpack().items()) == list(expected.items())
    for odd in (Counter({("a", 1): 2}), Counter({"a\0b": 1}), Counter(a=0.5), Counter(a=2**41), Counter(a=-1)):
        assert PackedCounter.pack(odd) is odd
        mixed = sum_count_tables([packed[0], odd, packed[1]])
        assert mixed == sum_counters([parts[0], odd, parts[1]]) and not isinstance(mixed, PackedCounter)
    empty = sum_count_tables([])
    assert isinstance(empty, PackedCounter) and empty.unpack() == Counter()
