"""Guards around fine-tuning: a stale lock of DeepSpeed's CPU-op JIT build is reported on the console
before the job waits on it, ranks started with different flags stop together, and results.json is
never overwritten by accident nor left half-written."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.test_finetune import make_sentiment_files, make_tiny_zh_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zh_dataset(tmp_path_factory) -> Path:
    return make_tiny_zh_dataset(tmp_path_factory.mktemp("guards") / "dataset")


def _config(dataset: Path, tmp_path: Path, **kw):
    from pipeline.finetuning import FinetuneConfig

    files = make_sentiment_files(tmp_path, sizes=(20, 10, 10))
    values = dict(model="random:tiny", dataset=str(dataset), train=str(files["train"]), dev=str(files["dev"]),
                  test=str(files["test"]), output=str(tmp_path / "out"), seeds=[1], epochs=1.0, batch_size=16,
                  max_length=32)
    values.update(kw)
    return FinetuneConfig(**values)


def _home_with_build_lock(monkeypatch, home: Path, age_seconds: float) -> Path:
    """A lock file where torch's JIT build of DeepSpeed's CPU op would wait on it, under ``home``."""
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    from torch.utils.cpp_extension import _get_build_directory  # torch's own answer (creates the directory)

    lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    assert str(lock).startswith(str(home))
    lock.touch()
    os.utime(lock, (time.time() - age_seconds, time.time() - age_seconds))
    return lock


def _extensions_dir_with_build_lock(monkeypatch, directory: Path, age_seconds: float) -> Path:
    """A lock file where torch's JIT build of DeepSpeed's CPU op would wait on it, under the
    user's TORCH_EXTENSIONS_DIR ``directory``."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(directory))
    from torch.utils.cpp_extension import _get_build_directory  # torch's own answer (creates the directory)

    lock = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    assert lock == directory / "deepspeed_shm_comm" / "lock"
    lock.touch()
    os.utime(lock, (time.time() - age_seconds, time.time() - age_seconds))
    return lock


# ---------------------------------------------------------------------------------------------
# 1. A stale lock of DeepSpeed's JIT build
# ---------------------------------------------------------------------------------------------
def test_stale_build_lock_is_reported_with_path_age_and_fix(tmp_path, monkeypatch, capsys):
    from pipeline import parallel

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("HOME", str(tmp_path / "empty-home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert parallel.warn_deepspeed_build_lock() is None and capsys.readouterr().err == ""  # no lock: silent

    lock = _home_with_build_lock(monkeypatch, tmp_path / "home", age_seconds=3 * 3600)
    assert parallel.deepspeed_build_lock() == lock  # where torch builds DeepSpeed's CPU op
    message = parallel.warn_deepspeed_build_lock()
    err = capsys.readouterr().err
    assert err.strip() == message and "\n" not in message  # on the console (stderr), one line
    assert str(lock) in message and "180 min old" in message and "STALE" in message
    assert f"rm -f {lock}" in message
    assert lock.exists()  # only reported: a running build may own it

    os.utime(lock)  # a fresh lock: maybe a build running right now, not called stale
    message = parallel.warn_deepspeed_build_lock()
    assert "STALE" not in message and "another process is building" in message and f"rm -f {lock}" in message

    monkeypatch.setenv("LOCAL_RANK", "1")  # other ranks of the host stay quiet
    capsys.readouterr()
    assert parallel.warn_deepspeed_build_lock() is not None and capsys.readouterr().err == ""

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))  # where torch builds when it is set
    assert parallel.deepspeed_build_lock() == tmp_path / "ext" / "deepspeed_shm_comm" / "lock"


def test_each_environment_builds_deepspeeds_ops_in_its_own_directory(tmp_path, monkeypatch):
    """torch's default JIT-build directory is one per user, shared by every venv: two clones rebuilt
    DeepSpeed's CPU op (60-90 s) whenever their jobs alternated. A venv now builds in its own, unless
    the user set TORCH_EXTENSIONS_DIR; outside a virtual environment torch's default stays."""
    from torch.utils.cpp_extension import _get_build_directory

    from pipeline import parallel

    venv = tmp_path / "venv"
    venv.mkdir()
    # set, then deleted: monkeypatch then removes what the code under test sets (a delenv of an absent
    # variable records nothing, and the later tests' ranks would build DeepSpeed's op in this tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "system-python"))
    mine = parallel.use_this_environments_extensions_dir()
    flavour = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert Path(mine).parent == venv / "torch_extensions" and Path(mine).name.startswith(flavour + "_"), mine
    assert os.environ["TORCH_EXTENSIONS_DIR"] == mine
    lock = parallel.deepspeed_build_lock()
    assert lock == Path(mine) / "deepspeed_shm_comm" / "lock"
    assert Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) == lock.parent  # where torch builds
    assert parallel.use_this_environments_extensions_dir() == mine  # again: the same

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "users-choice"))  # the user's choice is kept
    assert parallel.use_this_environments_extensions_dir() == str(tmp_path / "users-choice")
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "users-choice")

    # A system Python (not a virtual or conda environment): torch's default, under the user's home.
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(sys, "base_prefix", str(venv))
    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    default = parallel.use_this_environments_extensions_dir()
    assert "TORCH_EXTENSIONS_DIR" not in os.environ
    assert Path(default).parent == tmp_path / "home" / ".cache" / "torch_extensions", default
    monkeypatch.setenv("CONDA_PREFIX", str(venv))  # a conda environment: its own again
    assert parallel.use_this_environments_extensions_dir() == mine


def test_finetune_cli_prints_the_stale_lock_warning_before_deepspeed_waits(tmp_path, monkeypatch, zh_dataset):
    """The real scenario: the lock sits where this job's DeepSpeed would build its CPU op (a
    TORCH_EXTENSIONS_DIR of its own, so neither the venv's op nor other jobs see it). DeepSpeed then waits on it
    forever, so the job is killed as soon as the warning is on stderr (or after a deadline)."""
    from tests.distributed import free_port

    lock = _extensions_dir_with_build_lock(monkeypatch, tmp_path / "ext", age_seconds=3600)
    files = make_sentiment_files(tmp_path, sizes=(20, 10, 10))
    env = {**os.environ, "HOME": str(tmp_path / "home"), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "pipeline.finetune", "--deepspeed", "--model", "random:tiny", "--dataset",
               str(zh_dataset), "--train", str(files["train"]), "--dev", str(files["dev"]), "--output",
               str(tmp_path / "out"), "--seeds", "1", "--epochs", "1", "--batch-size", "4", "--max-length", "32"]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    err, deadline = [], time.monotonic() + 180
    try:
        while time.monotonic() < deadline and not any(str(lock) in line for line in err):
            try:
                err.append(lines.get(timeout=1.0))
            except queue.Empty:
                if proc.poll() is not None and lines.empty():
                    break
    finally:
        if proc.poll() is None:
            proc.kill()  # ours, by its PID: it waits on the lock
        proc.wait(timeout=30)
    warning = [line for line in err if str(lock) in line]
    assert warning, "no warning about the lock on stderr:\n" + "".join(err)
    assert "STALE" in warning[0] and "60 min old" in warning[0] and f"rm -f {lock}" in warning[0]


# ---------------------------------------------------------------------------------------------
# 2. Every rank must run with the same settings
# ---------------------------------------------------------------------------------------------
def _compare_settings() -> list:
    import torch.distributed as dist

    from pipeline.finetuning import FinetuneConfig, FinetuneError, check_same_settings

    flags = dict(model="random:tiny", dataset="data", train="train.jsonl", dev="dev.jsonl", output="out", seeds=[1])
    check_same_settings(FinetuneConfig(**flags))  # the same command on every rank passes
    if dist.get_rank() == 1:
        flags.update(seeds=[2], lr=1e-3, train="other.jsonl", overwrite=True)
    messages = []
    try:
        check_same_settings(FinetuneConfig(**flags))
    except FinetuneError as exc:
        messages.append(str(exc))
    return messages


def test_ranks_started_with_different_flags_all_stop_naming_flag_and_rank():
    from tests.distributed import run_distributed

    results = run_distributed(_compare_settings, world_size=2, timeout=240)
    assert all(len(messages) == 1 for messages in results), results  # every rank stopped
    assert results[0] == results[1]  # with the same message
    message = results[0][0]
    assert "rank 1: --seeds 2 (rank 0: 1)" in message
    assert "rank 1: --lr 0.001 (rank 0: 5e-05)" in message
    assert "rank 1: --train other.jsonl (rank 0: train.jsonl)" in message
    assert "rank 1: --overwrite (rank 0: --no-overwrite)" in message
    assert message.endswith("every rank must run the same command") and "\n" not in message


def test_run_compares_settings_right_after_the_process_group_exists(tmp_path, monkeypatch, zh_dataset):
    from pipeline import finetuning

    calls = []
    monkeypatch.setattr(finetuning, "setup_deepspeed", lambda seed: calls.append("setup"))

    def differ(config):
        calls.append("check")
        raise finetuning.FinetuneError("ranks differ")

    monkeypatch.setattr(finetuning, "check_same_settings", differ)
    monkeypatch.setattr(finetuning, "encode_split", lambda *a, **k: pytest.fail("work started before the check"))
    with pytest.raises(finetuning.FinetuneError, match="ranks differ"):
        finetuning.run(_config(zh_dataset, tmp_path, deepspeed=True))
    assert calls == ["setup", "check"]


# ---------------------------------------------------------------------------------------------
# 3. results.json: never overwritten by accident, never half-written
# ---------------------------------------------------------------------------------------------
EARLIER = '{"earlier": "run"}'


def test_existing_results_are_refused_before_any_work(tmp_path, monkeypatch, zh_dataset, capsys):
    from pipeline import finetune, finetuning

    config = _config(zh_dataset, tmp_path)
    results = tmp_path / "out" / "results.json"
    results.parent.mkdir()
    results.write_text(EARLIER)
    monkeypatch.setattr(finetuning, "resolve_pretrained", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(finetuning.FinetuneError, match=r"--output: .*results.json already holds the results of an "
                                                        r"earlier run; choose another --output, or pass --overwrite"):
        finetuning.run(config)
    argv = ["--model", config.model, "--dataset", config.dataset, "--train", config.train, "--dev", config.dev,
            "--output", config.output, "--seeds", "1"]
    assert finetune.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(results) in err and "--overwrite" in err
    assert results.read_text() == EARLIER  # nothing lost
    assert sorted(p.name for p in results.parent.iterdir()) == ["results.json"]  # not even a log was added


def test_a_refused_run_leaves_no_output_folder_it_made(tmp_path, zh_dataset, capsys):
    """A typo'd --model (or a bad label column) still made --output with finetune.log and .finetune.lock in it;
    an --output that was there before keeps its log (why the run stopped)."""
    from pipeline import finetune

    config = _config(zh_dataset, tmp_path)
    argv = ["--model", str(tmp_path / "no_such_model"), "--dataset", config.dataset, "--train", config.train,
            "--dev", config.dev, "--seeds", "1"]
    assert finetune.main([*argv, "--output", str(tmp_path / "new")]) == 2
    assert "no_such_model does not exist" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    (tmp_path / "there").mkdir()
    assert finetune.main([*argv, "--output", str(tmp_path / "there")]) == 2
    assert "no_such_model does not exist" in (tmp_path / "there" / "finetune.log").read_text()


def _failing_writes_in(directory: Path, monkeypatch) -> None:
    """Every file opened for writing in ``directory`` gets half of its text, then the disk is full."""
    real_open = builtins.open

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    def failing_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and "w" in mode and Path(file).resolve().parent == directory.resolve():
            return HalfWriter(f)
        return f

    monkeypatch.setattr(builtins, "open", failing_open)
    monkeypatch.setattr(io, "open", failing_open)


def test_interrupted_results_write_leaves_no_half_written_file(tmp_path, monkeypatch, zh_dataset):
    from pipeline.finetuning import run

    config = _config(zh_dataset, tmp_path)
    (tmp_path / "out").mkdir()
    _failing_writes_in(tmp_path / "out", monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        run(config)
    monkeypatch.undo()
    # no half-written results.json, no temporary file (the curves went to TensorBoard as training ran)
    assert [p.name for p in (tmp_path / "out").iterdir()] in ([], ["tensorboard"])


def test_ctrl_c_keeps_the_finished_seeds_and_says_so_in_one_line(tmp_path, monkeypatch, zh_dataset, capsys):
    """Ctrl-C during the second seed printed a 40-line KeyboardInterrupt traceback, logged nothing, and
    the first seed's scores were lost."""
    from pipeline import finetune, finetuning

    config = _config(zh_dataset, tmp_path, seeds=[1, 2, 3])
    real = finetuning.train_seed

    def interrupted_at_seed_2(*args, **kwargs):
        if args[6] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(finetuning, "train_seed", interrupted_at_seed_2)
    argv = ["--model", config.model, "--dataset", config.dataset, "--train", config.train, "--dev", config.dev,
            "--test", config.test, "--output", config.output, "--seeds", "1", "2", "3", "--epochs", "1",
            "--batch-size", "16", "--max-length", "32"]
    assert finetune.main(argv) == 130
    err = capsys.readouterr().err
    out = Path(config.output)
    assert ("interrupted: fine-tuning interrupted during seed 2; the 1 seed(s) that finished (1) are in "
            f"{out / finetuning.PARTIAL_RESULTS_FILE}; run the same command again") in err and "Traceback" not in err
    partial = json.loads((out / finetuning.PARTIAL_RESULTS_FILE).read_text())
    assert [r["seed"] for r in partial["seeds"]] == [1] and "accuracy" in partial["test"]
    assert not (out / "results.json").exists()  # a re-run is not refused
    assert "interrupted: fine-tuning interrupted during seed 2" in (out / "finetune.log").read_text()
    monkeypatch.setattr(finetuning, "train_seed", real)
    assert finetune.main(argv[:-10] + ["--seeds", "1", "--epochs", "1", "--batch-size", "16", "--max-length", "32"]) == 0
    assert (out / "results.json").is_file() and not (out / finetuning.PARTIAL_RESULTS_FILE).exists()


def test_overwrite_replaces_earlier_results_only_with_complete_ones(tmp_path, monkeypatch, zh_dataset):
    from pipeline.finetuning import run

    config = _config(zh_dataset, tmp_path, overwrite=True)
    results = tmp_path / "out" / "results.json"
    results.parent.mkdir()
    results.write_text(EARLIER)
    with monkeypatch.context() as patch:  # a re-run interrupted while writing keeps the earlier results
        _failing_writes_in(results.parent, patch)
        with pytest.raises(OSError, match="No space left"):
            run(config)
    assert results.read_text() == EARLIER and sorted(p.name for p in results.parent.iterdir() if p.name != "tensorboard") == ["results.json"]
    summary = run(config)
    assert json.loads(results.read_text()) == json.loads(json.dumps(summary))
    assert sorted(p.name for p in results.parent.iterdir() if p.name != "tensorboard") == ["results.json"]
