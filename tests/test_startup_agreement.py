"""A rank that fails its own start-up checks (what it finds on its node: the dataset, a checkpoint,
a fine-tuning file) stops the whole job at once, with its message on every rank, instead of leaving
the other ranks waiting for it in ``init_distributed`` until the collective timeout (30 min).

Multi-node jobs are where this happens: a node without the dataset, or with a stale copy. Here two
"nodes" are two torchrun agents on loopback (``--nnodes 2``), one given a path that does not exist."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.distributed import free_port, run_distributed
from tests.test_pretrain import BASE, PRETRAIN, ROOT, TORCHRUN, get_dataset, run_env


# ---------------------------------------------------------------------------------------------
# parallel.agree_on_startup / startup_failed, on gloo
# ---------------------------------------------------------------------------------------------
def _agree(cases: list[list[str | None]]) -> list[str]:
    """Every case once, in the same process group: each rank's error (or None) -> what it did."""
    import torch.distributed as dist

    from pipeline import parallel

    outcomes = []
    for errors in cases:
        mine = errors[dist.get_rank()]
        try:
            parallel.agree_on_startup(None if mine is None else ValueError(mine))
            outcomes.append("passed")
        except parallel.PeerStartupError as exc:
            outcomes.append(f"stopped: {exc}")
    return outcomes


def test_agreement_stops_every_rank_with_the_failing_ranks_message():
    cases = [[None, None, None], [None, "no dataset on this node", None], [None, "bad 1", "bad 2"]]
    by_rank = run_distributed(_agree, world_size=3, args=(cases,))
    everyone_passed, one_failed, two_failed = zip(*by_rank)
    assert everyone_passed == ("passed",) * 3
    assert one_failed[1] == "passed"  # the failing rank raises its own error next, not this one
    for rank in (0, 2):
        assert one_failed[rank].startswith("stopped: rank 1 (host "), one_failed[rank]
        assert "failed its start-up checks" in one_failed[rank]
        assert one_failed[rank].endswith("Rank 1 said: no dataset on this node")
    assert two_failed[0].startswith("stopped: rank 1 (host ") and "(and 1 other rank(s): 2)" in two_failed[0], two_failed[0]
    assert two_failed[1:] == ("passed", "passed")


def _same_errors(errors: list[str | None]) -> int | None:
    import torch.distributed as dist

    from pipeline import parallel

    mine = errors[dist.get_rank()]
    parallel.agree_on_startup(ValueError(mine))
    return parallel.startup_error_same_as_rank


def test_ranks_failing_with_the_same_error_leave_its_line_to_the_lowest_one():
    """Every rank of a job started with a wrong setting finds the same problem: each printed the same
    error three times (six lines for two ranks). The lowest rank with that error prints its line."""
    assert run_distributed(_same_errors, world_size=3, args=(["same", "same", "other"],)) == [None, 0, None]


def _late_peer(delay: float) -> str:
    """Rank 1 fails before any process group and tells the others (``startup_failed``); rank 0 is
    slower to start and then meets it in ``init_distributed``."""
    import torch.distributed as dist

    from pipeline import parallel

    if int(os.environ["RANK"]) == 1:
        parallel.startup_failed(ValueError("rank 1's dataset is missing"), world_size=2, timeout_minutes=2)
        return "told" if dist.is_initialized() else "alone"
    time.sleep(delay)
    parallel.init_distributed("gloo", timeout_minutes=2)
    try:
        parallel.agree_on_startup()
    except parallel.PeerStartupError as exc:
        return str(exc)
    return "passed"


def test_a_failing_rank_joins_its_peers_to_tell_them():
    results = run_distributed(_late_peer, world_size=2, args=(3.0,), init=None, timeout=240)
    assert results[1] == "told"
    assert "rank 1 (host" in results[0] and results[0].endswith("Rank 1 said: rank 1's dataset is missing"), results[0]


# ---------------------------------------------------------------------------------------------
# The entry points, as two nodes on loopback
# ---------------------------------------------------------------------------------------------
def _two_nodes(node_commands: list[list[str]], tmp_path: Path, timeout: float = 240) -> list[tuple[int, str, float]]:
    """Start each node's torchrun agent (``--nnodes 2``, loopback rendezvous); returns each node's
    (exit code, output, seconds until it exited)."""
    port = free_port()
    procs, logs, started = [], [], time.monotonic()
    for node_rank, command in enumerate(node_commands):
        log = tmp_path / f"node{node_rank}.log"
        logs.append(log)
        procs.append(subprocess.Popen(
            [TORCHRUN, "--nnodes", "2", "--node-rank", str(node_rank), "--nproc-per-node", "1",
             "--master-addr", "127.0.0.1", "--master-port", str(port), *command],
            cwd=ROOT, env=run_env({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}),
            stdout=open(log, "w"), stderr=subprocess.STDOUT))
    results = [None, None]
    try:
        while any(r is None for r in results) and time.monotonic() - started < timeout:
            for i, p in enumerate(procs):
                if results[i] is None and p.poll() is not None:
                    results[i] = (p.returncode, time.monotonic() - started)
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # ours, by PID: a node still waiting is the defect under test
                p.wait(timeout=30)
    hung = [i for i, r in enumerate(results) if r is None]
    assert not hung, f"node(s) {hung} still running after {timeout} s:\n" + "\n".join(
        log.read_text()[-2000:] for log in logs)
    return [(code, log.read_text(), seconds) for (code, seconds), log in zip(results, logs)]


def test_pretrain_node_without_the_dataset_stops_the_job(tmp_path, tmp_path_factory):
    dataset = get_dataset(tmp_path_factory)
    missing = tmp_path / "not-on-this-node"
    common = [PRETRAIN, *BASE, "schedule.train_steps=4", "schedule.warmup_steps=1"]
    (ok, ok_out, _), (bad, bad_out, _) = _two_nodes(
        [[*common, f"data.path={dataset}", f"output_dir={tmp_path / 'run0'}"],
         [*common, f"data.path={missing}", f"output_dir={tmp_path / 'run1'}"]], tmp_path)
    problem = f"data.path={missing}: {missing} is not a dataset (no meta.json)"
    assert bad != 0 and f"error: {problem}" in bad_out, bad_out[-3000:]
    assert "telling the other 1 rank(s) that this one cannot start" in bad_out
    assert ok != 0, ok_out[-3000:]
    assert "error: rank 1 (host " in ok_out and f"Rank 1 said: {problem}" in ok_out, ok_out[-3000:]
    assert "Traceback (most recent call last):\n  File \"" + PRETRAIN not in ok_out + bad_out
    assert not (tmp_path / "run0" / "metrics.jsonl").exists()  # no step was taken


@pytest.fixture(scope="module")
def zh_vocab_dataset(tmp_path_factory) -> Path:
    from tests.test_finetune import make_tiny_zh_dataset

    return make_tiny_zh_dataset(tmp_path_factory.mktemp("startup") / "dataset")


def test_finetune_node_without_the_train_file_stops_the_job(tmp_path, zh_vocab_dataset):
    from tests.test_finetune import make_sentiment_files

    files = make_sentiment_files(tmp_path, sizes=(20, 10, 10))
    missing = tmp_path / "elsewhere" / "train.jsonl"

    def command(train: Path, node: int) -> list[str]:
        return [str(ROOT / "pipeline" / "finetune.py"), "--deepspeed", "--model", "random:tiny", "--dataset",
                str(zh_vocab_dataset), "--train", str(train), "--dev", str(files["dev"]), "--output",
                str(tmp_path / f"out{node}"), "--seeds", "1", "--epochs", "1", "--batch-size", "4", "--max-length", "32"]

    (ok, ok_out, _), (bad, bad_out, _) = _two_nodes([command(files["train"], 0), command(missing, 1)], tmp_path)
    problem = f"--train: {missing} does not exist"
    assert bad != 0 and f"error: {problem}" in bad_out, bad_out[-3000:]
    assert ok != 0 and "error: rank 1 (host " in ok_out and f"Rank 1 said: {problem}" in ok_out, ok_out[-3000:]
    assert not (tmp_path / "out0" / "results.json").exists()


# ---------------------------------------------------------------------------------------------
# The demo dataset: rank 0 builds it while the others wait; its failure reaches them
# ---------------------------------------------------------------------------------------------
def _demo_config(tmp_path: Path):
    from pipeline import pretrain
    from pipeline.config import load_config

    config = load_config(pretrain.DEFAULT_RECIPE, [f"output_dir={tmp_path / 'run'}"])
    config.data.path = str(tmp_path / "demo-zh")
    return config


def test_a_failed_demo_build_reaches_the_waiting_ranks(tmp_path, monkeypatch):
    from pipeline import pretrain
    from pipeline.config import ConfigError

    monkeypatch.setattr(pretrain, "DEMO_DATASET", str(tmp_path / "demo-zh"))
    config = _demo_config(tmp_path)
    marker = tmp_path / ".demo-zh.build-failed"

    class Failed:
        returncode = 3

    monkeypatch.setattr(pretrain.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(ConfigError, match=r"building the demo dataset .*demo-zh failed \(data_prep exited with 3"):
        pretrain.ensure_demo_dataset(config, rank=0)
    assert marker.is_file()
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"rank 0 could not build the demo dataset: building the demo dataset"):
        pretrain.ensure_demo_dataset(config, rank=1)
    assert time.monotonic() - t0 < 5

    # A marker older than this rank's start is an earlier run's: the rank keeps waiting for meta.json.
    old = time.time() - 600
    os.utime(marker, (old, old))
    import threading

    def build_later():
        time.sleep(1.5)
        (tmp_path / "demo-zh").mkdir()
        (tmp_path / "demo-zh" / "meta.json").write_text("{}")

    threading.Thread(target=build_later, daemon=True).start()
    pretrain.ensure_demo_dataset(config, rank=1)  # returns once rank 0's build is there
    assert (tmp_path / "demo-zh" / "meta.json").is_file()


def test_master_port_is_honoured_without_a_launcher(tmp_path, tmp_path_factory):
    """`python pipeline/pretrain.py` with no launcher goes through DeepSpeed's MPI discovery, which
    used to set MASTER_PORT to 29500 whatever the user exported. A port held by someone else must
    be the one that is refused, by name, in one error line."""
    import socket

    dataset = get_dataset(tmp_path_factory)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        env = run_env({"MASTER_PORT": str(port), "MASTER_ADDR": "127.0.0.1"})
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(name, None)
        result = subprocess.run(
            [sys.executable, PRETRAIN, *BASE, f"data.path={dataset}", f"output_dir={tmp_path / 'run'}",
             "schedule.train_steps=2", "schedule.warmup_steps=1"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"error: the rendezvous port MASTER_PORT={port} is in use" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_nodes_started_with_different_settings_stop_together(tmp_path, tmp_path_factory):
    """One node's job script edited, not the other's: before, rank 0 finished its 4 steps and waited in
    its last barrier while rank 1 waited in step 5's all-reduce, both until the collective timeout."""
    dataset = get_dataset(tmp_path_factory)
    common = [PRETRAIN, *BASE, f"data.path={dataset}", f"output_dir={tmp_path / 'run'}", "schedule.warmup_steps=1"]
    results = _two_nodes([[*common, "schedule.train_steps=4"], [*common, "schedule.train_steps=6"]], tmp_path)
    for code, output, _ in results:
        assert code != 0 and ("error: the ranks were started with different settings: rank 1: "
                              "schedule.train_steps=6 (rank 0: 4)") in output, output[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _main_error(argv: list[str], monkeypatch) -> str:
    from pipeline import pretrain
    from pipeline.config import ConfigError

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as caught:
        pretrain.main(argv)
    return str(caught.value)


def test_a_fresh_run_does_not_mix_its_curve_into_an_earlier_runs_metrics(tmp_path, tmp_path_factory, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    old = '{"step": 1, "split": "train", "loss": 9.0}\n'
    (out / "metrics.jsonl").write_text(old, encoding="utf-8")
    message = _main_error([*BASE, f"data.path={get_dataset(tmp_path_factory)}", f"output_dir={out}"], monkeypatch)
    assert f"output_dir={out} holds the metrics.jsonl of an earlier run" in message and "Use another output_dir" in message
    assert (out / "metrics.jsonl").read_text(encoding="utf-8") == old


def test_a_dataset_whose_vocabulary_was_edited_is_refused_before_training(tmp_path, tmp_path_factory, monkeypatch):
    """Pre-training trained on a dataset whose fine_vocab.txt had been edited (its ids then meant other
    tokens in exports), which fine-tuning refused only afterwards."""
    import hashlib
    import json
    import shutil

    from data_prep.format import FINE_VOCAB_FILE, FormatError
    from pipeline import pretrain

    dataset = Path(shutil.copytree(get_dataset(tmp_path_factory), tmp_path / "ds"))
    meta = json.loads((dataset / "meta.json").read_text(encoding="utf-8"))
    vocab = dataset / FINE_VOCAB_FILE
    meta["files_sha256"] = {FINE_VOCAB_FILE: hashlib.sha256(vocab.read_bytes()).hexdigest()}  # as data_prep records
    (dataset / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    vocab.write_text(vocab.read_text(encoding="utf-8").replace("\n", "\r\n", 1), encoding="utf-8")  # edited
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(FormatError, match=rf"data.path={dataset}: {FINE_VOCAB_FILE} was changed after the build .*restore it"):
        pretrain.main([*BASE, f"data.path={dataset}", f"output_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unfinished_datasets_are_named_with_the_command_that_finishes_them(tmp_path, monkeypatch):
    from pipeline import pretrain

    (tmp_path / "zh.partial" / "shards").mkdir(parents=True)
    for path in (tmp_path / "zh.partial", tmp_path / "zh"):
        message = _main_error([*BASE, f"data.path={path}", f"output_dir={tmp_path / 'run'}"], monkeypatch)
        assert "is not a dataset but the work of an unfinished data_prep build" in message, message
        assert f"--output {tmp_path / 'zh'}` command again with --resume" in message
    # DIR.partial given when the build has finished (no DIR.partial left): the dataset is named, not --resume
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "meta.json").write_text("{}", encoding="utf-8")
    message = _main_error([*BASE, f"data.path={tmp_path / 'done.partial'}", f"output_dir={tmp_path / 'run'}"], monkeypatch)
    assert f"the finished dataset is {tmp_path / 'done'}: point data.path at it" in message, message
    assert "--resume" not in message

    # The demo dataset's folder holding something else: data_prep's own advice (--overwrite) cannot
    # be given through pretrain, so the message says what to do instead; the waiting ranks hear it.
    monkeypatch.setattr(pretrain, "DEMO_DATASET", str(tmp_path / "demo-zh"))
    (tmp_path / "demo-zh").mkdir()
    (tmp_path / "demo-zh" / "train_fine.bin").write_bytes(b"x")
    config = _demo_config(tmp_path)
    with pytest.raises(Exception, match=r"exists but is not a complete dataset .*rm -rf .*demo-zh"):
        pretrain.ensure_demo_dataset(config, rank=0)
    assert (tmp_path / ".demo-zh.build-failed").is_file() and (tmp_path / "demo-zh" / "train_fine.bin").is_file()


def test_resuming_with_other_data_settings_is_warned_about(tmp_path, tmp_path_factory, caplog):
    """The checkpoint's marker records what fixes the samples and masks; a resume that changes them
    (deliberately, e.g. a longer seq_length for a last phase) is told the data order changes."""
    import logging

    from pipeline import pretrain
    from pipeline.checkpoint import read_marker
    from pipeline.config import load_config
    from tests.test_pretrain import REFERENCE_OVERRIDES, get_reference_run

    reference = get_reference_run(tmp_path_factory)
    newest = sorted((reference / "checkpoints").glob("step_*"))[-1]
    assert read_marker(newest)["data_order"]["data.seq_length"] == 32
    config = load_config(pretrain.DEFAULT_RECIPE, [
        *BASE, f"data.path={get_dataset(tmp_path_factory)}", f"output_dir={reference}", *REFERENCE_OVERRIDES,
        "checkpointing.resume=auto", "data.seq_length=24", "seed=7"])
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        pretrain._startup_checks(config, rank=0, world_size=2)
    warned = [r.getMessage() for r in caplog.records if "other data settings" in r.getMessage()]
    assert len(warned) == 1 and "data.seq_length 32 -> 24" in warned[0] and "seed 1234 -> 7" in warned[0], warned
    caplog.clear()
    config.data.seq_length, config.seed = 32, 1234
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        pretrain._startup_checks(config, rank=0, world_size=2)
    assert not [r for r in caplog.records if "other data settings" in r.getMessage()]


def test_resuming_with_another_global_batch_is_warned_about(tmp_path_factory, caplog, monkeypatch):
    """With parallelism.global_batch_size=0 (the default) a resume on another job size or with other
    batch settings changed the global batch silently; the marker records it now and a resume that
    changes it is told, with the settings that keep it. Checkpoints from before say nothing."""
    import logging

    from pipeline import checkpoint, pretrain
    from pipeline.config import load_config
    from tests.test_pretrain import REFERENCE_OVERRIDES, get_reference_run

    reference = get_reference_run(tmp_path_factory)
    newest = sorted((reference / "checkpoints").glob("step_*"))[-1]
    assert checkpoint.read_marker(newest)["global_batch_size"] == 8  # micro 4 x DP 2

    def warnings(*overrides: str) -> list[str]:
        config = load_config(pretrain.DEFAULT_RECIPE, [
            *BASE, f"data.path={get_dataset(tmp_path_factory)}", f"output_dir={reference}", *REFERENCE_OVERRIDES,
            "checkpointing.resume=auto", *overrides])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pretrain"):
            pretrain._startup_checks(config, rank=0, world_size=2)
        return [r.getMessage() for r in caplog.records if "global batch" in r.getMessage()]

    warned = warnings("parallelism.gradient_accumulation_steps=3")
    assert len(warned) == 1, warned
    assert "global batch of 24 samples per step" in warned[0] and "trained with 8" in warned[0], warned
    assert "sees more samples" in warned[0], warned
    assert "to keep 8 on this job, set parallelism.gradient_accumulation_steps=1;" in warned[0], warned
    warned = warnings("parallelism.micro_batch_size=2")
    assert len(warned) == 1 and "fewer samples" in warned[0], warned
    assert "set parallelism.gradient_accumulation_steps=2;" in warned[0], warned
    warned = warnings("parallelism.micro_batch_size=3")  # 6: 8 is reachable with micro-batches of 2 or 4
    assert len(warned) == 1 and "set parallelism.micro_batch_size=2 and parallelism.gradient_accumulation_steps=2" in warned[0]
    assert warnings() == []
    assert warnings("parallelism.micro_batch_size=2", "parallelism.gradient_accumulation_steps=2") == []
    real = checkpoint.read_marker
    monkeypatch.setattr(checkpoint, "read_marker", lambda path: {
        k: v for k, v in real(path).items() if k != "global_batch_size"})
    assert warnings("parallelism.gradient_accumulation_steps=3") == []  # an older checkpoint: not known


def test_converting_into_the_checkpoints_own_folder_is_refused(tmp_path_factory):
    from pipeline.convert import ConvertError, to_universal
    from tests.test_pretrain import get_reference_run

    newest = sorted((get_reference_run(tmp_path_factory) / "checkpoints").glob("step_*"))[-1]
    with pytest.raises(ConvertError, match=rf"target {newest.parent} is the folder {newest.name} itself is in"):
        to_universal(newest, newest.parent)


@pytest.mark.parametrize("master_addr", [None, "127.0.0.1"], ids=["mpi-discovery", "master-addr-given"])
def test_a_rank_stopping_with_an_error_under_plain_mpirun_ends_the_job(tmp_path, tmp_path_factory, master_addr):
    """Under `mpirun` (no torch launcher), a rank that stops with its own error line used to sit in
    MPI_Finalize (mpi4py calls it at exit; it waits for the other ranks) while its peer waited for it
    in the rendezvous: the job hung until the collective timeout. It now aborts the MPI job. With
    MASTER_ADDR given (as openmpi.sh gives it: no mpi4py), mpirun ends the job on the rank's exit code."""
    import shutil
    import socket

    if shutil.which("mpirun") is None:
        pytest.skip("mpirun (Open MPI) is not installed: apt-get install openmpi-bin")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("0.0.0.0", 0))
        held.listen(1)
        port = held.getsockname()[1]
        cmd = ["mpirun", "-np", "2", "--bind-to", "none", "--oversubscribe", "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS",
               "-x", "PYTHONPATH", "-x", f"MASTER_PORT={port}", *(["-x", f"MASTER_ADDR={master_addr}"] if master_addr else [])]
        if os.geteuid() == 0:
            cmd.insert(1, "--allow-run-as-root")
        started = time.monotonic()
        result = subprocess.run(
            [*cmd, sys.executable, PRETRAIN, *BASE, f"data.path={get_dataset(tmp_path_factory)}",
             f"output_dir={tmp_path / 'run'}", "schedule.train_steps=2", "schedule.warmup_steps=1",
             "parallelism.collective_timeout_minutes=10"],
            cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout[-2000:]
    assert f"error: the rendezvous port MASTER_PORT={port} is in use" in result.stderr, result.stderr[-3000:]
    assert time.monotonic() - started < 150, "the job waited for its collective timeout"
