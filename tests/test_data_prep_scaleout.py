"""Scale-out: the output bytes do not depend on --workers, on 2 ranks (gloo and mpirun), or on a kill -9
followed by --resume."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep import core
from data_prep import format as fmt
from data_prep import inputs as inp
from data_prep.chinese import SHARD_CACHE_FILE
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


@pytest.fixture(scope="module")
def gz_reference(reference, tmp_path_factory):
    """The reference corpus gzipped: read by the main process as a stream (not in byte ranges)."""
    import gzip

    tmp = tmp_path_factory.mktemp("scale_gz")
    corpus = tmp / "pd.txt.gz"
    corpus.write_bytes(gzip.compress(reference[0].read_bytes()))
    meta = core.build(small_config(corpus, tmp / "ref", shard_documents=SHARD_DOCS))
    assert meta["run"]["reading"] == "stream"
    return corpus, dataset_bytes(tmp / "ref")


def test_byte_ranges_and_a_stream_give_the_same_dataset(reference, gz_reference, tmp_path):
    """Uncompressed text of one document a line is read in byte ranges (each shard by the worker that
    analyses it; meta.json run.reading "ranges"), the same text gzipped as one stream by the main
    process: the same token files, with 1 and 2 workers (meta.json differs only in what it records
    of the inputs)."""
    for (corpus, expected), reading in ((reference, "ranges"), (gz_reference, "stream")):
        meta = core.build(small_config(corpus, tmp_path / f"{reading}2", shard_documents=SHARD_DOCS, workers=2))
        assert meta["run"]["reading"] == reading and "reading" not in meta["build"]
        assert dataset_bytes(tmp_path / f"{reading}2") == expected
    tokens = [{k: v for k, v in dataset_bytes(tmp_path / f"{r}2").items() if k != "meta.json"} for r in ("ranges", "stream")]
    assert tokens[0] == tokens[1] and len(tokens[0]) > 5


def test_a_shard_analysed_from_other_byte_ranges_is_analysed_again(reference, tmp_path):
    """A shard's counts are only taken if its range file lists the ranges the plan gives it now: one
    from other ranges, or without its range file, is read and analysed again."""
    corpus, _ = reference
    scan = inp.scan_input(inp.InputSpec(str(corpus), "text", text_mode="line"))
    record = {"path": str(corpus), "bytes": scan.bytes, "characters": scan.characters, "lines": scan.lines}
    plan = inp.plan_ranges([record], 10**6, SHARD_DOCS)
    assert len(plan) > 3 and all(len(shard) == 1 for shard in plan)
    core._worker_init("zh", small_config(corpus, tmp_path / "x").language_plugin_options(core.get_language("zh")))
    shard = tmp_path / "shard"
    task = (str(shard), plan[1], "strict", 10**6, False)
    assert core._read_range_task(task) == (str(shard), plan[1][0][2] - plan[1][0][1])
    info = json.loads((shard / core.SHARD_RANGE_FILE).read_text())
    assert info["segments"] == [list(plan[1][0])] and SHARD_DOCS // 2 < info["documents"] < 2 * SHARD_DOCS
    counts = (shard / core.SHARD_COUNTS_FILE).read_bytes()
    (shard / core.SHARD_COUNTS_FILE).write_bytes(b"kept")
    core._read_range_task(task)  # the same ranges: the counts are kept
    assert (shard / core.SHARD_COUNTS_FILE).read_bytes() == b"kept"
    for stale in ({**info, "segments": [list(plan[2][0])]}, None):
        (shard / core.SHARD_COUNTS_FILE).write_bytes(b"kept")
        if stale is None:
            (shard / core.SHARD_RANGE_FILE).unlink()
        else:
            (shard / core.SHARD_RANGE_FILE).write_text(json.dumps(stale))
        core._read_range_task(task)
        assert (shard / core.SHARD_COUNTS_FILE).read_bytes() == counts
        assert json.loads((shard / core.SHARD_RANGE_FILE).read_text()) == info


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


def test_workers_sum_the_counts_of_their_own_shards(reference, tmp_path, monkeypatch):
    """Each worker (and the inline one) sums the word counts of the shards it analyses as it goes
    (``Chinese.counts_so_far``; here its word table is dropped and folded at a small cap, as on a
    large corpus): no shard's table is read back, and the bytes are those of the reference. A
    language that keeps no sum has every table read back, with the same bytes."""
    from data_prep.chinese import Chinese

    corpus, expected = reference
    real_read_back = core._sum_shard_counts

    def refuse(shard_dirs):
        raise AssertionError(f"count tables read back: {shard_dirs}")

    monkeypatch.setattr(core, "_sum_shard_counts", refuse)
    monkeypatch.setattr(Chinese, "MAX_KEPT_WORDS", 300)
    for workers in (1, 2):  # the pool is forked from this process: the patches hold in its workers
        out = tmp_path / f"kept{workers}"
        core.build(small_config(corpus, out, shard_documents=SHARD_DOCS, workers=workers))
        assert dataset_bytes(out) == expected, workers
    read_back = []
    monkeypatch.setattr(core, "_sum_shard_counts", lambda dirs: read_back.append(len(dirs)) or real_read_back(dirs))
    monkeypatch.setattr(Chinese, "counts_so_far", lambda self: None)
    core.build(small_config(corpus, tmp_path / "none", shard_documents=SHARD_DOCS))
    assert dataset_bytes(tmp_path / "none") == expected
    assert read_back == [1200 // SHARD_DOCS]


def test_shard_size_does_not_change_the_output(reference, tmp_path):
    """Shards cut by characters (uneven documents per shard) and one big shard: the same bytes (the
    shard sizes are recorded with the run, in meta.json "run": they shape how the build ran)."""
    corpus, expected = reference
    meta = core.build(small_config(corpus, tmp_path / "chars", shard_documents=SHARD_DOCS, shard_characters=700))
    assert meta["run"]["shard_characters"] == 700 and meta["run"]["shard_documents"] == SHARD_DOCS
    assert "shard_characters" not in meta["build"]
    assert dataset_bytes(tmp_path / "chars") == expected
    core.build(small_config(corpus, tmp_path / "one", shard_documents=10**6, shard_characters=10**9))
    assert dataset_bytes(tmp_path / "one") == expected


def test_resume_with_other_workers_keeps_the_shard_size_it_started_with(tmp_path, monkeypatch):
    """The default Chinese shard size follows the workers: a build stopped after its analysis with 1
    worker and resumed with 2 keeps the shards it had cut: the bytes of an uninterrupted build."""
    corpus = write_corpus(tmp_path / "pd.txt", lines=6000)
    fresh = core.build(small_config(corpus, tmp_path / "fresh", shard_documents=10**6, workers=2))
    out = tmp_path / "resumed"
    real_mark = core._mark

    def stop_after_the_analysis(path, info=None):
        if path.name == core.READ_FILE:
            raise KeyboardInterrupt
        real_mark(path, info)

    with monkeypatch.context() as m:
        m.setattr(core, "_mark", stop_after_the_analysis)
        with pytest.raises(KeyboardInterrupt):
            core.build(small_config(corpus, out, shard_documents=10**6, workers=1))
    started = json.loads((core.work_dir_for(out) / core.PARAMS_FILE).read_text())["shard_characters"]
    assert abs(started - 2 * fresh["run"]["shard_characters"]) <= 1 and started > 100_000  # 1 worker: twice as large
    analysed = len(list(core.work_dir_for(out).glob("shards/*/counts.pkl")))
    assert analysed >= 3
    meta = core.build(small_config(corpus, out, shard_documents=10**6, workers=2, resume=True))
    assert meta["run"]["shard_characters"] == started and meta["run"]["workers"] == 2
    assert dataset_bytes(out) == dataset_bytes(tmp_path / "fresh")


def test_default_shard_size_scales_with_the_corpus_and_the_workers():
    """English: the corpus's bytes / 32 whatever the workers (its report reads evenly spaced shards);
    Chinese: ~4 shards a worker (bytes / 12 a worker, ~3 bytes a character); both within [50k, 16M]."""
    from data_prep.chinese import Chinese
    from data_prep.english import English

    for lang in (None, English):
        assert core.auto_shard_characters([{"bytes": 10, "content_bytes": 5_000_000}], lang, 4) == 5_000_000 // 32
        assert core.auto_shard_characters([{"bytes": 1000, "content_bytes": None}], lang) == 50_000
        assert core.auto_shard_characters([{"bytes": 10**12, "content_bytes": 10**12}], lang) == 16_000_000
    one, two = (core.auto_shard_characters([{"bytes": 10, "content_bytes": 24_000_000}], Chinese, w) for w in (1, 2))
    assert (one, two) == (2_000_000, 1_000_000)  # 24 MB of Chinese, ~8M characters: 4 shards, then 8
    assert core.auto_shard_characters([{"bytes": 10**12, "content_bytes": 10**12}], Chinese, 64) == 16_000_000
    assert core.auto_shard_characters([{"bytes": 1000, "content_bytes": 100_000}], Chinese, 2) == 50_000


@pytest.mark.parametrize("batch_chars", [300, 1 << 18])
def test_shards_end_where_documents_reach_the_size_whatever_the_read_batches(tmp_path, monkeypatch, batch_chars):
    """The reader hands over documents a batch at a time: each shard still ends with the document that
    brings it to --shard-documents or to its characters (the rule applied one document at a time),
    batches smaller and larger than a shard alike; empty lines, NULs and over-long lines counted."""
    rng = random.Random(3)
    lines = ["中" * rng.choice([1, 5, 40, 300]) + "\n" for _ in range(400)]
    lines[7] = "  \n"
    lines[50] = "a\0b\n"
    lines[90] = "字" * 1200 + "\n"
    path = tmp_path / "docs.txt"
    path.write_text("".join(lines), encoding="utf-8")
    monkeypatch.setattr(inp, "_BATCH_CHARS", batch_chars)
    specs = [inp.resolve_text_mode(s) for s in inp.resolve_inputs([str(path)], text_mode="line")]
    config = core.BuildConfig(language="zh", output=str(tmp_path / "out"), inputs=[str(path)], shard_documents=9,
                              max_document_chars=1000)

    class Recorder:
        pool = None

        def __init__(self):
            self.tasks = []

        def submit(self, fn, task):
            self.tasks.append(task[1])

        def ready(self):
            return iter(())

    executor = Recorder()
    summary = core._read_into_shards(config, core.SingleProcess(), specs, tmp_path / "work", executor, None, False,
                                     {"shard_characters": 700})
    read = list(inp.iter_documents(specs, max_document_chars=1000))
    kept = [d.replace("\0", "") for d in lines if d.strip()]
    assert "".join(read) == "".join(kept) and len(read) == len(kept) + 1  # the long line cut in two
    expected, shard, size = [], [], 0
    for d in read:
        shard.append(d)
        size += len(d)
        if len(shard) == 9 or size >= 700:
            expected.append(shard)
            shard, size = [], 0
    expected += [shard] if shard else []
    assert executor.tasks == expected
    assert summary["shard_starts"] == [sum(map(len, expected[:k])) for k in range(len(expected))]
    assert (summary["empty_documents_skipped"], summary["nul_bytes_removed"], summary["long_documents_cut"]) == (1, 1, 1)
    assert any(len(s) == 9 for s in expected) and any(len(s) < 9 for s in expected[:-1])


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


def _rank_build_with_a_stale_copy(corpus: str, stale: str, output: str) -> str:
    from data_prep import core as rank_core
    from data_prep import inputs as rank_inputs
    from tests.test_data_prep_zh import small_config as config

    comm = rank_core.detect_communicator()
    if comm.rank == 1:  # this "machine" has another copy at the same path
        rank_inputs._data_files = lambda spec: [Path(stale)]
    try:
        rank_core.build(config(Path(corpus), Path(output), shard_documents=SHARD_DOCS))
    except rank_core.BuildError as exc:
        return str(exc)
    return "built"


def test_a_rank_reading_other_content_at_the_same_path_is_refused(reference, tmp_path):
    """Ranks compared only the input paths: a rank reading a stale node-local copy (same path, same
    length, other words) wrote its shards from it, --verify passed and meta.json gave rank 0's sha256."""
    corpus, _ = reference
    text = corpus.read_text(encoding="utf-8")
    stale = tmp_path / "stale.txt"
    stale.write_text(text.replace("中国", "美国"), encoding="utf-8")
    assert stale.stat().st_size == corpus.stat().st_size and stale.read_bytes() != corpus.read_bytes()
    out = tmp_path / "out"
    results = run_distributed(_rank_build_with_a_stale_copy, world_size=2, args=(str(corpus), str(stale), str(out)),
                              timeout=300)
    assert "rank 1" in results[1] and f"reads other content at {corpus} than rank 0" in results[1], results
    assert "stale node-local copy" in results[1]
    assert results[0].startswith("another rank failed") and "reads other content" in results[0], results
    assert not out.exists() and not list(core.work_dir_for(out).glob("shards/*"))


def _rank_build_with_a_stale_user_dict(corpus: str, user_dict: str, stale: str, output: str) -> str:
    from data_prep import core as rank_core
    from tests.test_data_prep_zh import small_config as config

    comm = rank_core.detect_communicator()
    if comm.rank == 1:  # this "machine" has another copy of the user dictionary at the same path
        read = rank_core._sha256
        rank_core._sha256 = lambda path: read(Path(stale) if str(path) == user_dict else path)
    try:
        rank_core.build(config(Path(corpus), Path(output), shard_documents=SHARD_DOCS,
                               language_options={"user_dict": user_dict}))
    except rank_core.BuildError as exc:
        return str(exc)
    return "built"


def test_a_rank_reading_another_user_dict_at_the_same_path_is_refused(reference, tmp_path):
    """The --user-dict segments each rank's shards: a rank with another copy of it would mix two
    segmentations in one dataset; its content is compared with rank 0's, as the inputs' are."""
    corpus, _ = reference
    user_dict, stale = tmp_path / "user.dict", tmp_path / "stale.dict"
    user_dict.write_text("迈向充满 1000 n\n", encoding="utf-8")
    stale.write_text("迈向充满 1000 n\n新年讲话稿件 100000 n\n", encoding="utf-8")
    out = tmp_path / "out"
    results = run_distributed(_rank_build_with_a_stale_user_dict, world_size=2,
                              args=(str(corpus), str(user_dict), str(stale), str(out)), timeout=300)
    assert "rank 1" in results[1] and "reads other content in its --user-dict file than rank 0" in results[1], results
    assert results[0].startswith("another rank failed") and "--user-dict" in results[0], results
    assert not out.exists()


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


def _mpirun(np_: int = 2) -> list[str]:
    launcher = ["mpirun", "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return launcher + (["-np", str(np_)] if np_ else [])


needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None,
                                  reason="needs OpenMPI's mpirun (launchers/setup.sh installs it)")


@needs_mpirun
@pytest.mark.parametrize("case", ["shard-documents", "output", "input", "language-option"])
def test_mpirun_ranks_with_different_settings_are_refused(reference, tmp_path, case):
    """Each rank owns the shards k % K == rank: a rank with another --shard-documents used to drop a
    quarter of the corpus with --verify passing, another --output hung, a missing --input on one rank
    was an unclear FileNotFoundError. All are refused before any work, naming the flag and the ranks."""
    corpus, _ = reference
    out = tmp_path / "out"
    rank0 = _cli(corpus, out)
    if case == "shard-documents":
        rank1 = _cli(corpus, out)
        rank1[rank1.index("--shard-documents") + 1] = "45"
        expected = "rank 1: --shard-documents 45 (rank 0: 60)"
    elif case == "language-option":  # named by its own flag (it read "--language-options --max-sentence-chars")
        rank1 = _cli(corpus, out) + ["--max-sentence-chars", "300"]
        expected = "rank 1: --max-sentence-chars 300 (rank 0: 510)"
    elif case == "output":
        rank1 = _cli(corpus, tmp_path / "elsewhere")
        expected = f"rank 1: --output '{tmp_path / 'elsewhere'}' (rank 0: '{out}')"
    else:
        rank1 = _cli(tmp_path / "only-on-rank-0.txt", out)
        expected = "rank 1 of 2: every rank must see the same input paths"
    proc = subprocess.run(_mpirun(0) + ["-np", "1", *rank0, ":", "-np", "1", *rank1], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-3000:]
    if case != "input":  # the same message on every rank: printed once, by rank 0
        assert proc.stderr.count("Every rank must run the same command") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    # refused before any work: no dataset, no work directory on either side
    for path in (out, core.work_dir_for(out), tmp_path / "elsewhere", core.work_dir_for(tmp_path / "elsewhere")):
        assert not path.exists(), path


@needs_mpirun
def test_mpirun_ranks_naming_the_same_files_differently_agree(reference, tmp_path):
    """A relative path on one rank and a glob on the other resolve to the same file: accepted (the
    resolved files are compared), and the output is the single-process build's."""
    corpus, expected = reference
    out = tmp_path / "out"
    rank0 = _cli(Path(os.path.relpath(corpus, tmp_path)), out)
    rank1 = _cli(corpus.parent / (corpus.name[:-1] + "?"), out)
    proc = subprocess.run(_mpirun(0) + ["-np", "1", *rank0, ":", "-np", "1", *rank1], capture_output=True, text=True,
                          env=_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = dataset_bytes(out)
    meta, ref_meta = json.loads(files.pop(fmt.META_FILE)), json.loads(expected[fmt.META_FILE])
    assert files == {k: v for k, v in expected.items() if k != fmt.META_FILE}
    assert meta["stats"]["documents"] == ref_meta["stats"]["documents"]


@needs_mpirun
def test_mpirun_rank_killed_while_writing_its_shards_then_resume(reference, tmp_path):
    """Rank 1 stopped once at its first shard (--workers 1: analysed from the documents in hand, no
    copy of them written), rank 0 left to finish its own, then the job is killed: --resume used to fail
    (rank 0 had marked the corpus as read, rank 1's shards did not exist). Now the read is marked only
    once every rank has written its shards: identical bytes."""
    import psutil

    corpus, expected = reference
    out = tmp_path / "mpi"
    work = core.work_dir_for(out)
    proc = subprocess.Popen(_mpirun() + _cli(corpus, out), env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        rank1 = None
        while time.monotonic() < deadline and rank1 is None and proc.poll() is None:
            if (work / "shards" / "000001").exists():
                for child in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        if child.environ().get("OMPI_COMM_WORLD_RANK") == "1":
                            rank1 = child
                            child.suspend()
                    except psutil.Error:
                        continue
            time.sleep(0.002)
        assert rank1 is not None, "rank 1 never wrote its first shard"
        rank0_shards = [_shard for _shard in range(0, 20, 2)]
        while time.monotonic() < deadline and not all(
                (work / "shards" / f"{k:06d}" / "counts.pkl").exists() for k in rank0_shards):
            time.sleep(0.05)
        assert all((work / "shards" / f"{k:06d}" / "counts.pkl").exists() for k in rank0_shards), \
            "rank 0 did not finish its shards: not the scenario this test is about"
        time.sleep(0.5)  # rank 0 is past its read loop, waiting for rank 1
        assert not (work / "shards" / "000019" / "counts.pkl").exists()
    finally:
        ranks = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        os.killpg(proc.pid, signal.SIGKILL)
        for rank in ranks:  # Open MPI may start them outside mpirun's process group
            try:
                rank.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(ranks, timeout=30)
        proc.wait(timeout=60)
    assert not out.exists()
    resumed = subprocess.run(_mpirun() + _cli(corpus, out, "--resume"), capture_output=True, text=True, env=_env(),
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert dataset_bytes(out) == expected


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


@pytest.mark.parametrize("compressed", [False, True])
def test_one_worker_writes_no_copy_of_the_documents_and_resumes(reference, gz_reference, tmp_path, compressed):
    """--workers 1 (Chinese): each shard is analysed from the documents in hand (read in a stream, or
    its byte ranges) and no copy of them is written. Killed while segmenting, the resume reads the
    inputs again for the shards not analysed; killed while encoding, it reads nothing again (every
    shard was analysed); identical bytes."""
    corpus, expected = gz_reference if compressed else reference
    out = tmp_path / "inline"
    work = core.work_dir_for(out)
    _run_until(_cli(corpus, out, "--workers", "1"), work, "counts.pkl", 3)
    assert 3 <= len(list(work.glob("shards/*/counts.pkl"))) < 20 and not list(work.glob("shards/*/docs.txt"))
    _run_until(_cli(corpus, out, "--workers", "1", "--resume"), work, "encoded.part", 3)
    assert (work / "fit.done").exists() and not list(work.glob("shards/*/docs.txt"))
    resumed = subprocess.run(_cli(corpus, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "reading the inputs again" not in resumed.stderr
    assert dataset_bytes(out) == expected


@pytest.mark.parametrize("compressed", [False, True])
def test_kill9_then_resume_gives_identical_bytes(reference, gz_reference, tmp_path, compressed):
    """Killed while segmenting, resumed and killed again while encoding, resumed to the end; the
    workers reading their shards' byte ranges, or the main process reading the (gzipped) text."""
    corpus, expected = gz_reference if compressed else reference
    out = tmp_path / "killed"
    work = core.work_dir_for(out)
    _run_until(_cli(corpus, out, "--workers", "2"), work, "counts.pkl", 3)
    assert not out.exists() and 3 <= len(list(work.glob("shards/*/counts.pkl"))) < 20
    assert not (work / "fit.done").exists()
    # the same command without --resume refuses to clobber the unfinished work
    again = subprocess.run(_cli(corpus, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr
    _run_until(_cli(corpus, out, "--workers", "2", "--resume"), work, "encoded.part", 3)
    assert not out.exists() and (work / "fit.done").exists()
    encoded = [p.parent for p in work.glob("shards/*/encoded.part")]
    assert 3 <= len(encoded) < 20
    # an encoded shard keeps its byte ranges (text of one document a line, which the workers read
    # themselves) or its documents (written by the main process), and its counts (the resume's
    # markers); its segmentation cache is deleted once the part is written (the kill may fall in
    # between, once per worker)
    kept = "docs.txt" if compressed else "range.json"
    assert all((d / kept).is_file() and (d / "counts.pkl").is_file() for d in encoded)
    assert sum((d / "cache").exists() for d in encoded) <= 2, [d.name for d in encoded if (d / "cache").exists()]
    assert all((d / "cache" / SHARD_CACHE_FILE).is_file() for d in work.glob("shards/*/") if d not in encoded)
    resumed = subprocess.run(_cli(corpus, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    assert dataset_bytes(out) == expected
    assert not work.exists() and not list(tmp_path.glob("killed.partial-*"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_worker_build_says_what_is_kept_then_resumes(reference, tmp_path, signum):
    """Ctrl-C / SIGTERM to the whole process group of a --workers 2 build: one line saying what is kept
    and to pass --resume (before: tracebacks from every worker writing into a closed pipe, and
    sometimes a hang in Pool.terminate), exit 128+signal, no process left; --resume says what it
    reuses and gives the same bytes."""
    import psutil

    corpus, expected = reference
    out = tmp_path / "interrupted"
    work = core.work_dir_for(out)
    proc = subprocess.Popen(_cli(corpus, out, "--workers", "2"), env=_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(list(work.glob("shards/*/counts.pkl"))) < 3:
        time.sleep(0.005)
    workers = [c.pid for c in psutil.Process(proc.pid).children()] if proc.poll() is None else []
    assert len(workers) == 2, "the build finished before it could be interrupted"
    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and "Error" not in err, err[-3000:]
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"interrupted ({signal.Signals(signum).name}): ") and "--resume" in message
    assert "analysed" in message and not out.exists()
    time.sleep(0.5)
    assert not [pid for pid in workers if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    resumed = subprocess.run(_cli(corpus, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the interrupted build" in resumed.stderr and "analysed" in resumed.stderr
    assert dataset_bytes(out) == expected


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
    parts.insert(4, Counter({"": 3}))  # one key, the empty string: packed as "" with one value
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


def test_array_files_round_trip_and_name_a_damaged_file(tmp_path):
    """languages.save_arrays / load_arrays (the shards' caches): every dtype, shape and value back, the
    arrays writable; a truncated file, another file, a header that lies: a ValueError naming the file."""
    from data_prep.languages import ARRAYS_MAGIC, load_arrays, save_arrays

    arrays = {"words": np.frombuffer("中国\x1fword".encode(), dtype=np.uint8), "ids": np.arange(7, dtype=np.int32),
              "empty": np.zeros(0, dtype=np.int64), "grid": np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2],
              "scalar": np.int64(2**40), "flags": np.array([True, False, True])}
    path = tmp_path / "a.arrays"
    save_arrays(path, **arrays)
    got = load_arrays(path)
    assert list(got) == list(arrays)
    for name, a in arrays.items():
        a = np.asarray(a)
        assert got[name].dtype == a.dtype and got[name].shape == a.shape and np.array_equal(got[name], a), name
    got["ids"][0] = 5  # writable, as np.load's arrays were
    assert path.stat().st_size % 8 == 0
    data = path.read_bytes()
    for bad in (data[:-8], data + bytes(8), b"PK\x03\x04" + data[4:], ARRAYS_MAGIC + (10**6).to_bytes(8, "little") + b"{}", b""):
        path.write_bytes(bad)
        with pytest.raises(ValueError, match=f"{path} is not a complete array file"):
            load_arrays(path)
    with pytest.raises(TypeError, match="objects"):
        save_arrays(path, words=np.array(["a"], dtype=object))


def test_arrow_helpers_give_the_values_without_importing_pandas():
    """pa.array() and to_numpy(zero_copy_only=False) import pandas on first use: ~0.15 s in each pool
    worker of an English build (its words files are numbered by Arrow) and in the count sum."""
    code = (
        "import sys, numpy as np, pyarrow.compute as pc\n"
        "from data_prep.languages import arrow_ints, arrow_strings\n"
        "a = arrow_strings(['x\\0中国\\0x'.encode(), b'', 'y\\0中国'.encode()])\n"
        "assert a.to_pylist() == ['x\\0中国\\0x', '', 'y\\0中国']\n"
        "d = pc.dictionary_encode(pc.split_pattern(a, '\\0').flatten())\n"
        "assert d.dictionary.to_pylist() == ['x', '中国', '', 'y']\n"
        "assert arrow_ints(d.indices).tolist() == [0, 1, 0, 2, 3, 1]\n"
        "assert arrow_ints(d.indices.slice(2, 3)).tolist() == [0, 2, 3]\n"
        "assert 'pandas' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_rank_that_cannot_see_the_work_directory_is_named(tmp_path):
    """Shards are exchanged through DIR.partial: a rank on a machine without the shared filesystem is
    told so (with its host name) instead of failing later on a missing shard file."""
    import socket

    class Rank1:
        rank, size = 1, 2

    work = tmp_path / "out.partial"
    params = {"shard_documents": 60}
    with pytest.raises(core.BuildError, match="filesystem every rank shares") as info:
        core._check_shared_work_dir(Rank1(), work, params)
    assert socket.gethostname() in str(info.value) and "rank 1" in str(info.value)
    work.mkdir()
    (work / core.PARAMS_FILE).write_text(json.dumps(params))
    core._check_shared_work_dir(Rank1(), work, params)  # seen: no error
    with pytest.raises(core.BuildError, match=r"rank 1 \(host .*\) sees another .*params.json than the one rank 0 "
                                              r"wrote \(another build's work directory.*every rank shares"):
        core._check_shared_work_dir(Rank1(), work, {"shard_documents": 45})


def test_a_second_build_of_the_same_output_is_refused_while_the_first_runs(reference, tmp_path):
    """A resubmitted job next to a live one (with or without --resume) deleted the caches the first was
    writing (it died with a FileNotFoundError) or rewrote its shards: now it is refused, naming the holder."""
    import socket

    corpus, _ = reference
    out = tmp_path / "out"
    first = core._BuildLock(out)  # what the running build holds
    first.acquire()
    try:
        for resume in (False, True):
            with pytest.raises(core.BuildError, match="another build of .*out is running") as info:
                core.build(small_config(corpus, out, shard_documents=SHARD_DOCS, resume=resume))
            assert f"pid {os.getpid()} on {socket.gethostname()}" in str(info.value)
        assert not out.exists() and not core.work_dir_for(out).exists()
        # --verify (or training) on the output of a build that is still running says so (not "--resume")
        core.work_dir_for(out).mkdir()
        for path in (out, core.work_dir_for(out)):
            with pytest.raises(fmt.FormatError, match=r"is not a dataset yet: a data_prep build of .*out is running "
                                                      rf"\(pid {os.getpid()} on .*wait for it to finish"):
                fmt.PairedDataset(path)
        core.work_dir_for(out).rmdir()
    finally:
        first.release()
    core.build(small_config(corpus, out, shard_documents=SHARD_DOCS))  # free again once it ends
    assert (out / fmt.META_FILE).is_file()


def _kept_work(corpus: Path, tmp_path: Path) -> Path:
    """A finished build whose work directory is kept, output removed: --resume redoes only the merge."""
    out = tmp_path / "out"
    core.build(small_config(corpus, out, shard_documents=SHARD_DOCS, keep_work_dir=True))
    shutil.rmtree(out)
    shards = list(core.work_dir_for(out).glob("shards/*/"))
    assert shards and all((d / "cache" / SHARD_CACHE_FILE).is_file() for d in shards)  # kept, caches included
    return out


@pytest.mark.parametrize("damage", ["counts", "read_json", "bin", "params", "cache"])
def test_resume_of_a_damaged_work_directory_names_the_fix(reference, tmp_path, damage):
    """A work-directory file removed or damaged (by hand, a crash without fsync): --resume used to end
    in a raw traceback, or - a truncated shard .bin - to write a damaged dataset and exit 0."""
    corpus, expected = reference
    out = _kept_work(corpus, tmp_path)
    work = core.work_dir_for(out)
    if damage == "counts":
        (work / "shards" / "000003" / "counts.pkl").write_bytes(b"\x80\x04trunc")  # marked analysed all the same
        (work / "fit.done").unlink()  # so the counts are read again
    elif damage == "read_json":
        (work / core.READ_FILE).write_text("{")
    elif damage == "params":  # it used to call every parameter "different"
        (work / core.PARAMS_FILE).unlink()
    elif damage == "cache":  # the segmentation a shard still to encode reads back
        (work / "shards" / "000003" / core.SHARD_PART_FILE).unlink()
        cache = work / "shards" / "000003" / "cache" / SHARD_CACHE_FILE
        cache.write_bytes(cache.read_bytes()[:-8])
    else:
        part = work / "shards" / "000003" / core.SHARD_PART_FILE
        part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(core.BuildError, match="--overwrite without --resume") as info:
        core.build(small_config(corpus, out, shard_documents=SHARD_DOCS, resume=True))
    if damage == "params":
        assert f"{core.PARAMS_FILE} (the interrupted build's parameters) is missing or damaged" in str(info.value)
    if damage == "bin":
        assert f"000003/{core.SHARD_PART_FILE} is not a complete shard part" in str(info.value)
        assert "truncated" in str(info.value)
    if damage == "cache":
        assert f"000003/cache/{SHARD_CACHE_FILE} is not a complete array file" in str(info.value), str(info.value)
    if damage in ("counts", "read_json"):  # the file is named
        named = (f"000003/{core.SHARD_COUNTS_FILE} is damaged (UnpicklingError" if damage == "counts" else
                 f"{core.READ_FILE} is not valid JSON (Expecting property name")
        assert named in str(info.value), str(info.value)
        assert "a file of that build is missing or damaged (removed by hand, or a machine crash)" in str(info.value)
    assert not out.exists()
    core.build(small_config(corpus, out, shard_documents=SHARD_DOCS, overwrite=True))  # the fix works
    assert dataset_bytes(out) == expected


def test_resume_with_the_inputs_spelled_differently_says_so(reference, tmp_path, monkeypatch):
    """A --resume naming the same files by another path (absolute vs relative) was refused as 'different
    build parameters (inputs)', which reads as if the content had changed."""
    corpus, _ = reference
    out = tmp_path / "out"
    _kept_work(corpus, tmp_path)
    monkeypatch.chdir(corpus.parent)
    with pytest.raises(core.BuildError, match="the inputs are the same files, but spelled differently") as info:
        core.build(small_config(Path(corpus.name), out, shard_documents=SHARD_DOCS, resume=True))
    assert str(corpus) in str(info.value)


def test_an_inline_build_leaves_the_callers_malloc_settings_alone(reference, tmp_path, monkeypatch):
    """keep_freed_memory() is process-wide (glibc's mallopt): the command line and the pool workers set
    it, a program that calls build() with --workers 1 keeps its own malloc behaviour."""
    corpus, expected = reference
    monkeypatch.setattr(core, "keep_freed_memory", lambda: pytest.fail("build() changed the caller's malloc settings"))
    out = tmp_path / "inline"
    core.build(small_config(corpus, out, shard_documents=SHARD_DOCS, workers=1))
    assert dataset_bytes(out) == expected


def test_a_pool_worker_killed_stops_the_build_and_verify_then_resume(reference, tmp_path, monkeypatch):
    """A pool worker killed (the OOM killer, a kill -9): multiprocessing.Pool replaced it and the task it
    held never returned, so the build (and --verify) waited forever at 0% CPU. Now it stops within
    seconds, naming the death and --resume, which then writes the bytes of an uninterrupted build."""
    from data_prep import verify
    from data_prep.chinese import Chinese

    corpus, expected = reference
    marker = tmp_path / "killed"
    analyze = Chinese.analyze_shard

    def dies_once(self, *args, **kwargs):  # in a forked pool worker: the first shard kills its process
        if not marker.exists():
            marker.write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
        return analyze(self, *args, **kwargs)

    monkeypatch.setattr(Chinese, "analyze_shard", dies_once)
    out = tmp_path / "out"
    started = time.monotonic()
    died = r"a worker process died \((killed by SIGKILL|gone, replaced by a new one); out of memory\?"
    with pytest.raises(core.WorkerDied, match=died + r".*run the same command with --resume"):
        core.build(small_config(corpus, out, shard_documents=SHARD_DOCS, workers=2))
    assert time.monotonic() - started < 60 and marker.exists() and not out.exists()
    monkeypatch.undo()
    core.build(small_config(corpus, out, shard_documents=SHARD_DOCS, workers=2, resume=True))
    assert dataset_bytes(out) == expected
    # --verify's pool the same way
    marker.unlink()
    check = verify._Checker.check

    def check_dies_once(self, *args):
        if not marker.exists():
            marker.write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
        return check(self, *args)

    monkeypatch.setattr(verify._Checker, "check", check_dies_once)
    with pytest.raises(core.WorkerDied, match=died + r".*Run --verify again"):
        verify.verify_dataset(str(out), progress=False, workers=2, chunk_tokens=2000)
