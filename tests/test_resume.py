"""Exact resume under faults, and continuing a run on another (TP, DP) layout.

One chain of launches against the shared 20-step reference run (dropout on, fp32):
  B: steps 1..10, checkpoints every 5; rank 1 is SIGKILLed while saving step 10 (its DeepSpeed files
     are written, the COMPLETE marker is not): the launcher must exit non-zero, not hang.
  C: --resume auto must pick step 5 (not the interrupted step 10); SIGTERM mid-run to every rank and
     loader worker: a checkpoint is written and every process exits 0.
  D: --resume auto from C's preemption checkpoint, to step 20.
Every loss of B, C and D equals the reference run's loss at the same step.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from pipeline.checkpoint import COMPLETE, complete_checkpoints
from pipeline.metrics import read_metrics
from tests.test_pretrain import (
    REFERENCE_OVERRIDES,
    ROOT,
    assert_ok,
    deepspeed_command,
    get_dataset,
    get_reference_run,
    launch,
    run_env,
)


def _assert_same_losses(run: Path, reference: dict, steps, rel: float = 1e-6) -> None:
    got = read_metrics(run)
    assert set(steps) <= set(got), (sorted(got), list(steps))
    for step in steps:
        for key in ("loss", "fine_loss", "coarse_loss"):
            ref = reference[step][key]
            assert abs(got[step][key] - ref) <= rel * abs(ref), (run.name, step, key, got[step][key], ref)


def _workers(launcher: subprocess.Popen) -> list[psutil.Process]:
    try:
        children = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    ranks = []
    for c in children:
        cmd = " ".join(c.cmdline())
        if "pretrain.py" in cmd and "--local_rank" in cmd and "deepspeed.launcher" not in cmd:
            ranks.append(c)
    pids = {c.pid for c in ranks}
    return [c for c in ranks if c.ppid() not in pids]  # not the DataLoader workers forked by a rank


def test_exact_resume_through_kill_during_save_and_sigterm(tmp_path_factory, tmp_path):
    reference_dir = get_reference_run(tmp_path_factory)
    reference = read_metrics(reference_dir)
    dataset = get_dataset(tmp_path_factory)
    checkpoints = tmp_path / "checkpoints"
    common = [f"data.path={dataset}", *REFERENCE_OVERRIDES, "checkpointing.save_every=5", f"checkpointing.dir={checkpoints}"]

    # B: killed while saving step 10.
    start = time.monotonic()
    code, output = launch(
        [*common, f"output_dir={tmp_path / 'b'}"], env={"AMBERT_FAULT": "kill_rank1_in_save@10"}, log=tmp_path / "b.log", timeout=240
    )
    assert code != 0, output[-3000:]
    assert time.monotonic() - start < 240  # the surviving rank did not hang the job
    assert "error: another rank died" in output  # the survivor says what happened, not just a gloo traceback
    assert (checkpoints / "step_00000010").is_dir() and not (checkpoints / "step_00000010" / COMPLETE).exists()
    assert [s for s, _ in complete_checkpoints(checkpoints)] == [5]
    _assert_same_losses(tmp_path / "b", reference, range(1, 11), rel=0.0)

    # C: resume auto (-> step 5), slowed down so SIGTERM lands mid-run.
    c_dir = tmp_path / "c"
    proc = subprocess.Popen(
        deepspeed_command([*common, f"output_dir={c_dir}", "--resume", "auto"]), cwd=ROOT,
        env=run_env({"AMBERT_FAULT": "sleep_per_step=0.4"}), stdout=open(tmp_path / "c.log", "w"), stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if (c_dir / "metrics.jsonl").exists() and max(read_metrics(c_dir), default=0) >= 7:
                break
            assert proc.poll() is None, (tmp_path / "c.log").read_text()[-3000:]
            time.sleep(0.2)
        workers = _workers(proc)
        assert len(workers) == 2
        loader_workers = [c for w in workers for c in w.children(recursive=True)]
        assert loader_workers  # data.num_workers=1: each rank has one
        # SIGTERM to every process of the job, loader workers too, as SLURM's --signal and a killed
        # process group deliver it before preemption: the workers must not die of it
        for w in [*workers, *loader_workers]:
            w.send_signal(15)
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    c_log = (tmp_path / "c.log").read_text()
    assert code == 0, c_log[-3000:]
    assert "resumed from" in c_log and "step_00000005" in c_log
    assert c_log.count("preemption signal or job time limit: saving at step") == 1, c_log[-3000:]  # not once per rank
    c_steps = sorted(read_metrics(c_dir))
    assert c_steps[0] == 6 and c_steps[-1] < 20
    newest_step, newest = complete_checkpoints(checkpoints)[-1]
    assert newest_step == c_steps[-1]
    assert json.loads((newest / COMPLETE).read_text())["reason"] == "preemption"
    _assert_same_losses(c_dir, reference, c_steps)

    # D: resume from the preemption checkpoint to the end.
    code, output = launch([*common, f"output_dir={tmp_path / 'd'}", "--resume", "auto"], log=tmp_path / "d.log")
    assert_ok(code, output)
    d_steps = sorted(read_metrics(tmp_path / "d"))
    assert d_steps == list(range(newest_step + 1, 21))
    _assert_same_losses(tmp_path / "d", reference, d_steps)
    # valid losses at step 20 agree too (the evaluation sees the same weights)
    assert abs(read_metrics(tmp_path / "d", "valid")[20]["loss"] - read_metrics(reference_dir, "valid")[20]["loss"]) < 1e-5
    # the training FLOPs counted across the kill and the two resumes are the uninterrupted run's (the
    # study's equal-FLOPs runs are sized from them): the same per-step sums, carried in the checkpoints
    flops = read_metrics(tmp_path / "d")[20]["consumed_flops"]
    assert flops > 0 and flops == pytest.approx(reference[20]["consumed_flops"], rel=1e-12)
    assert json.loads((checkpoints / "step_00000020" / COMPLETE).read_text())["consumed_flops"] == flops
    assert all(reference[s]["consumed_flops"] > reference[s - 1]["consumed_flops"] for s in range(2, 21))


def test_resume_refuses_another_dataset_or_model(tmp_path_factory, tmp_path):
    from pipeline import pretrain
    from pipeline.checkpoint import CheckpointError
    from tests.test_data_loader import write_synthetic_dataset

    reference_dir = get_reference_run(tmp_path_factory)
    other = write_synthetic_dataset(tmp_path / "other", num_docs=50, seed=9)
    common = [f"checkpointing.dir={reference_dir / 'checkpoints'}", "--resume", "auto", f"output_dir={tmp_path}", "model.recipe=tiny", "data.seq_length=32"]
    with pytest.raises(CheckpointError, match="different dataset"):
        pretrain.main([*common, f"data.path={other}"])
    with pytest.raises(CheckpointError, match="another model shape.*hidden_size: checkpoint 64 vs run 32"):
        pretrain.main([*common, f"data.path={get_dataset(tmp_path_factory)}", "model.hidden_size=32"])
    # a fresh run (no --resume) into a folder of checkpoints would interleave with them
    fresh = [c for c in common if c not in ("--resume", "auto")]
    with pytest.raises(CheckpointError, match=r"holds checkpoints of an earlier run \(newest step_00000020\): "
                                              r"continue it with --resume auto"):
        pretrain.main([*fresh, f"data.path={get_dataset(tmp_path_factory)}"])
    # saved at TP=1, DP=2, ZeRO-3; this process is a world of 1 (DeepSpeed's own error was a traceback)
    with pytest.raises(CheckpointError, match=r"saved at DP=2, ZeRO stage=3; this run has DP=1, ZeRO stage=1\. .*"
                                              r"python -m pipeline.convert universal"):
        pretrain.main([*common, f"data.path={get_dataset(tmp_path_factory)}",
                       "parallelism.deepspeed_config=ds_configs/zero1_cpu.json"])


def test_model_mismatch_names_where_the_checkpoints_model_settings_are(tmp_path):
    from pipeline import checkpoint as ckpt

    saved = {"hidden_size": 64, "variant": "ambert"}
    marker = {"dataset_fingerprint": "f", "model_config": saved}
    ckpt.check_compatible(marker, "f", dict(saved), tmp_path)
    # the message once pointed at "its config.yaml", which a checkpoint directory does not have
    with pytest.raises(ckpt.CheckpointError, match=r"hidden_size: checkpoint 64 vs run 32\); use the checkpoint's "
                                                   r"model settings \(\"model_config\" in .*COMPLETE\)") as info:
        ckpt.check_compatible(marker, "f", {**saved, "hidden_size": 32}, tmp_path)
    assert str(tmp_path / ckpt.COMPLETE) in str(info.value) and "config.yaml" not in str(info.value)


def test_auto_resume_picks_newest_complete_and_retention(tmp_path):
    from pipeline import checkpoint as ckpt

    for step, complete in ((5, True), (10, True), (15, False), (20, True), (25, False)):
        d = tmp_path / ckpt.tag_for(step)
        d.mkdir()
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if complete:
            (d / ckpt.COMPLETE).write_text(json.dumps({"step": step}))
    (tmp_path / "latest").write_text("step_00000025")  # DeepSpeed's pointer to the interrupted save
    assert ckpt.find_resume_checkpoint(tmp_path, "auto").name == "step_00000020"
    assert ckpt.find_resume_checkpoint(tmp_path, "") is None
    with pytest.raises(ckpt.CheckpointError, match="interrupted"):
        ckpt.find_resume_checkpoint(tmp_path, str(tmp_path / "step_00000025"))
    ckpt._prune(tmp_path, keep_last=2)
    # the 2 newest complete ones stay; the interrupted save older than them is gone; the newer
    # interrupted one (possibly still being written by a live job) is left alone
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000010", "step_00000020", "step_00000025"]
    assert ckpt.find_resume_checkpoint(tmp_path / "nothing-here", "auto") is None


def test_a_save_that_fills_the_disk_names_the_fix_and_frees_its_space(tmp_path, monkeypatch):
    """A checkpoint save that fails on a full disk (torch.save says only "iostream error" or "unexpected
    pos") or a quota: the message says so, with the newest complete checkpoint to resume from and the
    size a checkpoint takes, and the incomplete save is removed; a failure with space left is not
    called a full disk. (Measured for real on a 40 MB tmpfs: the same message from both ranks.)"""
    import errno
    import shutil
    from collections import namedtuple

    from pipeline import checkpoint as ckpt

    for step in (2, 4):
        d = tmp_path / ckpt.tag_for(step)
        d.mkdir()
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * 3_000_000)
        if step == 2:
            (d / ckpt.COMPLETE).write_text(json.dumps({"step": step}))
    failing = tmp_path / ckpt.tag_for(4)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 1 << 20))
    error = ckpt.full_disk_error(tmp_path, failing, RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                                 "unexpected pos 20656896 vs 20656784"), keep_last=3)
    message = str(error)
    assert isinstance(error, ckpt.CheckpointError) and not failing.exists()
    assert message.startswith(f"saving checkpoint step_00000004 to {tmp_path} failed: the disk is full (1.0 MB free of 10.74 GB")
    assert "step_00000002, is intact: --resume auto continues from it" in message
    assert "A checkpoint of this run takes 3.0 MB, and checkpointing.keep_last=3 are kept" in message
    assert message.endswith("then run the same command with --resume auto")
    quota = ckpt.full_disk_error(tmp_path / "none", tmp_path / "none" / "step_1", OSError(errno.EDQUOT, "quota"), 1)
    assert "the disk quota is exceeded" in str(quota) and "there is no complete checkpoint yet" in str(quota)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 1 << 30, 9 << 30))
    assert ckpt.full_disk_error(tmp_path, tmp_path / ckpt.tag_for(2), RuntimeError("CUDA error"), 3) is None
    assert (tmp_path / ckpt.tag_for(2) / ckpt.COMPLETE).is_file()  # not a full disk: nothing removed


def test_hung_rank_fails_the_job_within_the_collective_timeout(tmp_path_factory, tmp_path):
    """A rank that stops answering (SIGSTOP: a hung GPU or a frozen node) makes its peer fail after
    parallelism.collective_timeout_minutes with a message that says so, instead of waiting 30 min in
    silence; and a rank failing with live loader workers still exits (it used to wait for them forever)."""
    import signal

    out = tmp_path / "run"
    proc = subprocess.Popen(
        deepspeed_command([f"data.path={get_dataset(tmp_path_factory)}", f"output_dir={out}", "schedule.train_steps=400",
                           "data.num_workers=1", "parallelism.collective_timeout_minutes=0.1"]),
        cwd=ROOT, env=run_env({"AMBERT_FAULT": "sleep_per_step=0.2"}), stdout=open(tmp_path / "log.txt", "w"),
        stderr=subprocess.STDOUT,
    )
    job: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").exists() and max(read_metrics(out), default=0) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.2)
        ranks = sorted(_workers(proc), key=lambda p: " ".join(p.cmdline()))
        job = [*ranks, *(c for r in ranks for c in r.children(recursive=True))]
        assert len(ranks) == 2 and len(job) == 4  # two ranks, one loader worker each
        stopped = time.monotonic()
        ranks[1].send_signal(signal.SIGSTOP)
        try:  # the peer must fail on its own, within the timeout
            ranks[0].wait(timeout=120)
        except psutil.TimeoutExpired:
            pass
        elapsed = time.monotonic() - stopped
        # Then the stopped rank runs again, as a frozen node would not: DeepSpeed's launcher would
        # otherwise give it 30 s to answer its SIGTERM before killing it (the launcher's wait, not ours).
        ranks[1].send_signal(signal.SIGCONT)
        code = proc.wait(timeout=180)
        time.sleep(1)
        left = [p.pid for p in job if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        for p in job:
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "log.txt").read_text()
    assert code != 0, log[-3000:]
    assert elapsed < 60, elapsed  # 6 s of timeout, then the error and the exit
    assert "error: another rank stopped answering for parallelism.collective_timeout_minutes" in log, log[-3000:]
    assert "--resume auto" in log
    assert not left, f"processes of the job were left behind: {left}"


def test_rank_failing_with_live_loader_workers_exits(tmp_path_factory, tmp_path):
    """An ordinary exception on one rank mid-run (loader workers alive; they ignore SIGTERM) ends
    the job promptly. Before, the failing rank waited at exit for its worker forever, and its peer
    waited in a collective for the default 30 minutes."""
    start = time.monotonic()
    code, output = launch([f"data.path={get_dataset(tmp_path_factory)}", f"output_dir={tmp_path / 'run'}",
                           "schedule.train_steps=50", "data.num_workers=1"],
                          env={"AMBERT_FAULT": "fail_rank0_at=3"}, log=tmp_path / "log.txt", timeout=150)
    assert code != 0, output[-3000:]
    assert "injected failure at step 3" in output
    assert time.monotonic() - start < 120


def test_damaged_checkpoint_file_is_named_with_the_older_checkpoint_to_use(tmp_path_factory, tmp_path, capsys):
    import shutil

    reference_dir = get_reference_run(tmp_path_factory)
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(reference_dir / "checkpoints", checkpoints)  # complete saves at steps 10 and 20
    optim = sorted((checkpoints / "step_00000020").glob("*rank_0*optim_states.pt"))[0]
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])  # truncated after the commit
    code, output = launch([f"data.path={get_dataset(tmp_path_factory)}", *REFERENCE_OVERRIDES, "schedule.train_steps=22",
                           f"checkpointing.dir={checkpoints}", f"output_dir={tmp_path / 'run'}", "--resume", "auto"],
                          log=tmp_path / "log.txt", timeout=240, launcher="torchrun")
    assert code != 0
    assert f"error: checkpoint {checkpoints / 'step_00000020'} cannot be loaded" in output, output[-3000:]
    assert f"checkpointing.resume={checkpoints / 'step_00000010'}" in output

    from pipeline.convert import main as convert

    assert convert(["export", str(checkpoints / "step_00000020"), str(tmp_path / "export")]) == 2
    assert f"checkpoint {checkpoints / 'step_00000020'} cannot be read" in capsys.readouterr().err
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob("export.*"))


def _start_in_terminal_group(command: list[str], log: Path, fault: str) -> subprocess.Popen:
    """A run in a process group of its own, as a shell starts it: Ctrl-C reaches every process in it."""
    return subprocess.Popen(command, cwd=ROOT, env=run_env({"AMBERT_FAULT": fault}), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _ctrl_c(proc: subprocess.Popen, run: Path, log: Path, times: int, after_step: int) -> int:
    import os
    import signal

    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.jsonl").exists() and max(read_metrics(run), default=0) >= after_step):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        for _ in range(times):
            os.killpg(proc.pid, signal.SIGINT)  # the rank and its loader worker, as a terminal delivers it
            time.sleep(0.05)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_ctrl_c_saves_a_checkpoint_at_the_end_of_the_step(tmp_path_factory, tmp_path):
    """Ctrl-C raised KeyboardInterrupt mid-step: a traceback, the steps since the last save lost (and the
    loader workers died of it too). Now it saves at the end of the step and exits 130."""
    import sys

    dataset = get_dataset(tmp_path_factory)
    command = [sys.executable, str(ROOT / "pipeline" / "pretrain.py"), "model.recipe=tiny", "data.seq_length=32",
               "parallelism.micro_batch_size=4", "logging.tensorboard=false", "data.valid_every=0",
               f"data.path={dataset}", "schedule.train_steps=500", "checkpointing.save_every=0", "data.num_workers=1"]
    run = tmp_path / "once"
    log = tmp_path / "once.log"
    code = _ctrl_c(_start_in_terminal_group([*command, f"output_dir={run}"], log, "sleep_per_step=0.2"), run, log, 1, 2)
    output = log.read_text()
    assert code == 130, output[-3000:]
    assert "Traceback" not in output and "Ctrl-C: saving a checkpoint at the end of this step" in output, output[-3000:]
    step, newest = complete_checkpoints(run / "checkpoints")[-1]
    assert step == max(read_metrics(run)) >= 2  # nothing trained is lost
    assert json.loads((newest / COMPLETE).read_text())["reason"] == "preemption"
    assert f"stopped by Ctrl-C after saving step {step}: the same command with --resume auto continues" in output



def test_a_second_ctrl_c_stops_at_once():
    """The first Ctrl-C only asks for a save at the end of the step (which may be far: a long step, a
    start-up); the second raises KeyboardInterrupt, which pretrain.py's main turns into one error line."""
    import os
    import signal

    from pipeline.pretrain import PreemptionFlag

    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    try:
        flag = PreemptionFlag()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert flag.interrupted and flag.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        for sig, handler in zip((signal.SIGINT, signal.SIGTERM, signal.SIGUSR1), previous):
            signal.signal(sig, handler)


def test_an_in_process_run_gives_the_callers_signal_handlers_back(tmp_path, monkeypatch):
    """pretrain.main's preemption handlers are the run's: a caller in the same process (a notebook, a
    sweep driver, these tests) gets its own back, error or not. Left installed, SIGTERM only set a flag
    in the caller and in every process it forked later: a multiprocessing pool's terminate() hung."""
    import signal

    from pipeline import parallel, pretrain
    from pipeline.config import ConfigError
    from tests.test_pretrain import BASE

    during = []

    class Recorded(pretrain.PreemptionFlag):
        def __init__(self) -> None:
            super().__init__()
            during.append([signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)])

    def mine(signum, frame):
        pass

    monkeypatch.setattr(pretrain, "PreemptionFlag", Recorded)
    monkeypatch.setattr(parallel, "startup_failed", lambda *a, **k: None)
    previous = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        with pytest.raises(ConfigError, match="is not a dataset"):  # refused after the handlers are in
            pretrain.main([*BASE, f"data.path={tmp_path / 'ds'}", f"output_dir={tmp_path / 'run'}"])
        assert len(during) == 1 and all(handler is not mine for handler in during[0])  # the run's own, during it
        assert all(signal.getsignal(sig) is mine for sig in previous)  # the caller's, after it
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
