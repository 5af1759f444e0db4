"""One live run per output directory (pipeline/run_lock.py).

A job resubmitted while the first still ran (or re-run next to ranks a killed launcher left behind)
resumed into the same output_dir and trained alongside it: both wrote step_25..step_40 and
interleaved metrics.jsonl, both exited 0. Rank 0 of a pre-training or fine-tuning run now holds a
lock in its output directory for the whole run; a second run is refused at start-up, on every rank,
before it writes anything there. The lock goes with the process, so a finished or killed run's lock
file never blocks the next one."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.format import lock_holder as holder
from pipeline.run_lock import RunLock
from tests.distributed import free_port
from tests.test_pretrain import BASE, PRETRAIN, ROOT, TORCHRUN, get_dataset, run_env


def _snapshot(directory: Path) -> dict[str, tuple]:
    """Every file under ``directory``: size, mtime and content hash."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _a_run_in_progress(run: Path) -> None:
    (run / "logs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    for rank in (0, 1):
        (run / "logs" / f"rank{rank}.log").write_text(f"[12:00:00 rank{rank}] the live run's log\n", encoding="utf-8")
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 9.0}\n', encoding="utf-8")
    (run / "config.yaml").write_text("the live run's config\n", encoding="utf-8")


def test_a_second_job_into_a_live_runs_output_dir_is_refused_on_every_rank(tmp_path, tmp_path_factory, capsys):
    from pipeline import pretrain

    run = tmp_path / "run"
    _a_run_in_progress(run)
    live = RunLock(pretrain.RUN_LOCK)  # this process plays the live run's rank 0
    lock_file = live.acquire(run)
    me = f"pid {os.getpid()} on {socket.gethostname()}"
    before = _snapshot(run)
    try:
        command = [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), PRETRAIN, *BASE,
                   f"data.path={get_dataset(tmp_path_factory)}", f"output_dir={run}", "schedule.train_steps=4",
                   "--resume", "auto"]
        proc = subprocess.run(command, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=240)
        out = proc.stdout + proc.stderr
        refusal = (f"output_dir={run} is in use by a pre-training run that is still running ({me}; lock {lock_file}): "
                   f"a second run there would interleave its checkpoints and metrics with it. Wait for it to finish "
                   f"or stop it, then start this job again with --resume auto")
        assert proc.returncode != 0, out[-3000:]
        assert f"\nerror: {refusal}" in "\n" + proc.stderr, out[-3000:]  # rank 0
        assert f"error: rank 0 (host {socket.gethostname()}) failed its start-up checks" in proc.stderr  # rank 1
        assert "exitcode  : 2" in out  # torchrun's summary: the ranks stopped with the start-up refusal's code
        assert 'File "' + PRETRAIN not in out  # no traceback of ours
        assert "--resume auto: no complete checkpoint" not in out  # rank 0 stopped before its own checks
        # --finished only reads: it neither waits for the lock nor takes it
        assert pretrain.main([*BASE, f"output_dir={run}", "schedule.train_steps=4", "--finished"]) == pretrain.STOPPED_EARLY
        assert capsys.readouterr().out.startswith("not finished: ")
        assert holder(lock_file) == me
    finally:
        live.release()
    assert _snapshot(run) == before  # not a byte written: logs, metrics, config and the lock file as they were


def test_a_stale_lock_file_does_not_block_and_the_lock_goes_with_its_run(tmp_path, tmp_path_factory, monkeypatch):
    from pipeline import pretrain
    from pipeline.config import ConfigError, load_config

    run = tmp_path / "run"
    # A run that took the lock and was killed (SIGKILL: no clean-up of any kind): its file stays, its lock not.
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys; from pipeline.run_lock import RunLock; "
                               f"RunLock({pretrain.RUN_LOCK!r}).acquire(sys.argv[1]); os.kill(os.getpid(), signal.SIGKILL)",
         str(run)], cwd=ROOT, env=run_env())
    assert killed.returncode == -signal.SIGKILL
    lock_file = run / pretrain.RUN_LOCK
    assert lock_file.read_text().startswith("pid ") and holder(lock_file) is None

    # pretrain.main goes past it (to the next check, here a missing dataset) and lets the lock go on its way out
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="is not a dataset"):
        pretrain.main([*BASE, f"data.path={tmp_path / 'no-dataset'}", f"output_dir={run}"])
    assert lock_file.read_text() == f"pid {os.getpid()} on {socket.gethostname()}"  # it was taken...
    assert holder(lock_file) is None  # ...and released: an in-process caller can start the next run

    # checkpointing.dir outside output_dir is locked too: a live run saving there refuses this one
    elsewhere = tmp_path / "scratch" / "ckpt"
    live = RunLock(pretrain.RUN_LOCK)
    live.acquire(elsewhere)
    try:
        config = load_config(pretrain.DEFAULT_RECIPE, [f"output_dir={tmp_path / 'other'}", f"checkpointing.dir={elsewhere}"])
        mine = RunLock(pretrain.RUN_LOCK)
        with pytest.raises(ConfigError, match=rf"checkpointing.dir={elsewhere} is in use by a pre-training run that is "
                                              rf"still running \(pid {os.getpid()} on .*; lock {elsewhere / pretrain.RUN_LOCK}\)"):
            pretrain.lock_run_dirs(config, mine)
        mine.release()  # (output_dir's lock, taken first)
        assert holder(tmp_path / "other" / pretrain.RUN_LOCK) is None
    finally:
        live.release()


def test_a_second_fine_tuning_run_into_a_live_output_is_refused(tmp_path, capsys):
    from pipeline import finetune
    from tests.test_finetune import make_sentiment_files, make_tiny_zh_dataset

    files = make_sentiment_files(tmp_path, sizes=(20, 10, 10))
    out = tmp_path / "out"
    live = RunLock(finetune.RUN_LOCK)
    lock_file = live.acquire(out)
    try:
        code = finetune.main(["--model", "random:tiny", "--dataset", str(make_tiny_zh_dataset(tmp_path / "ds")),
                              "--train", str(files["train"]), "--dev", str(files["dev"]), "--output", str(out),
                              "--seeds", "1"])
    finally:
        live.release()
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"error: --output {out} is in use by a fine-tuning run that is still running (pid {os.getpid()} on "
                   f"{socket.gethostname()}; lock {lock_file}): a second run there would mix its models, log and "
                   f"results.json with it. Wait for it to finish or stop it, or give this run another --output\n")
    assert sorted(p.name for p in out.iterdir()) == [finetune.RUN_LOCK]  # no finetune.log of its own
