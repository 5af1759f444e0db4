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
