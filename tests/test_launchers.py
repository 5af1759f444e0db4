"""Launchers: every template parses; per-node (2 "nodes" on loopback, no ssh) and plain mpirun
really train and agree with the single-node reference run; srun's environment is understood."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.metrics import read_metrics
from tests.distributed import free_port
from tests.test_pretrain import (
    BASE,
    PRETRAIN,
    REFERENCE_OVERRIDES,
    ROOT,
    get_dataset,
    get_reference_run,
    run_env,
)

LAUNCHERS = ROOT / "launchers"
SHORT = ["schedule.stop_after=3"]  # the reference schedule (20 steps), this job stops after 3


def _assert_matches_reference(run: Path, reference: Path, steps=(1, 2, 3)) -> None:
    got, ref = read_metrics(run), read_metrics(reference)
    assert sorted(got) == list(steps), sorted(got)
    for step in steps:
        for key in ("loss", "fine_loss", "coarse_loss"):
            assert abs(got[step][key] - ref[step][key]) <= 1e-6 * abs(ref[step][key]), (run, step, key)


def test_every_template_parses():
    scripts = sorted(LAUNCHERS.glob("*.sh")) + [LAUNCHERS / "slurm.sbatch"]
    assert {p.name for p in scripts} >= {"demo.sh", "multinode_pdsh.sh", "openmpi.sh", "per_node.sh", "slurm.sbatch"}
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, (script, result.stderr)
    sbatch = (LAUNCHERS / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=USR1@" in sbatch and "#SBATCH --requeue" in sbatch and "scontrol requeue" in sbatch
    docs = list(yaml.safe_load_all((LAUNCHERS / "kubernetes.yaml").read_text()))
    job = docs[0]
    assert job["kind"] == "PyTorchJob"
    for role in ("Master", "Worker"):
        container = job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"][0]
        command = " ".join(container["args"])
        assert "torchrun" in command and "pipeline/pretrain.py" in command and "--resume auto" in command
    hosts = [line.split() for line in (LAUNCHERS / "hostfile.example").read_text().splitlines() if line and not line.startswith("#")]
    assert all(len(h) == 2 and h[1].startswith("slots=") for h in hosts)


def test_the_launchers_examples_keep_the_recipes_global_batch():
    """The examples (16 ranks on the example hostfile and two pods, 32 with `sbatch --nodes 4`) ran
    bert-base.yaml, whose micro-batch 32 x 8 ranks is its global batch 256: each one stopped at
    start-up. Each example's micro-batch, at its world size, now passes the start-up check."""
    import re

    from pipeline.config import ConfigError, load_config, validate

    examples = {"multinode_pdsh.sh": 16, "openmpi.sh": 16, "per_node.sh": 16, "slurm.sbatch": 32, "kubernetes.yaml": 16}
    for name, world in examples.items():
        text = (ROOT / "launchers" / name).read_text()
        micro = set(re.findall(r"parallelism\.micro_batch_size=(\d+)", text))
        assert len(micro) == 1, (name, micro)
        override = f"parallelism.micro_batch_size={micro.pop()}"
        validate(load_config(ROOT / "pipeline/recipes/bert-base.yaml", [override]), world, paths=False)
        with pytest.raises(ConfigError, match="parallelism.global_batch_size=256 != micro_batch_size 32"):
            validate(load_config(ROOT / "pipeline/recipes/bert-base.yaml", []), world, paths=False)
    readme = (ROOT / "README.md").read_text()
    assert "sbatch --nodes 4 launchers/slurm.sbatch --config pipeline/recipes/bert-base.yaml data.path=... " \
           "parallelism.micro_batch_size=8" in readme


def test_openmpi_template_renders_the_mpirun_command(tmp_path):
    """Run the template with `mpirun` replaced by an echo: the command it would run is complete."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "mpirun").write_text('#!/usr/bin/env bash\necho "mpirun $*"\n')
    (fake_bin / "mpirun").chmod(0o755)
    env = {**run_env(), "PATH": f"{fake_bin}:{os.environ['PATH']}", "HOSTFILE": str(LAUNCHERS / "hostfile.example")}
    result = subprocess.run(["bash", str(LAUNCHERS / "openmpi.sh"), "data.path=/x"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("mpirun -np 16 ") and "ppr:8:node" in line and line.endswith("--resume auto data.path=/x")
    # not pinned to one core per rank (Open MPI's default for <= 2 ranks); no -x for a variable that is unset
    # (mpirun warned about each); the user's own binding replaces ours
    assert "--bind-to none" in line and f"-x MASTER_PORT={env.get('MASTER_PORT', 29500)}" in line
    # the rendezvous host: the hostfile's first (DeepSpeed's MPI discovery took rank 0's `hostname -I`)
    assert f"-x MASTER_ADDR={env.get('MASTER_ADDR', 'node001')}" in line
    assert "-x OMP_NUM_THREADS" in line  # the node's cores shared between its ranks (set unless given)
    quiet = {k: v for k, v in env.items() if k not in ("LD_LIBRARY_PATH", "HF_HUB_OFFLINE")}
    line = subprocess.run(["bash", str(LAUNCHERS / "openmpi.sh"), "data.path=/x"], env={**quiet, "MPI_ARGS": "--bind-to socket"},
                          capture_output=True, text=True, timeout=30).stdout.strip()
    assert "-x LD_LIBRARY_PATH" not in line and "-x HF_HUB_OFFLINE" not in line and "-x HF_DATASETS_OFFLINE" in line
    assert "--bind-to socket" in line and "--bind-to none" not in line
    # a hostfile that is missing, or has no slots=, is named (it was `-np 0 --map-by ppr::node`, or an awk error)
    (tmp_path / "noslots").write_text("node001\nnode002\n")
    for hostfile, message in ((tmp_path / "missing", "missing: no such file"), (tmp_path / "noslots", "has no slots=N")):
        result = subprocess.run(["bash", str(LAUNCHERS / "openmpi.sh"), "data.path=/x"], env={**env, "HOSTFILE": str(hostfile)},
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2 and message in result.stderr and not result.stdout, result.stderr


def test_every_template_passes_ds_config_relative_to_the_caller(tmp_path):
    """DS_CONFIG (like HOSTFILE and RECIPE) reaches pretrain.py from every template, given relative
    to the directory the script is started from; openmpi.sh and per_node.sh once dropped it silently
    (the run trained with the recipe's ZeRO stage instead)."""
    fake_venv = tmp_path / "venv"
    (fake_venv / "bin").mkdir(parents=True)
    for name in ("mpirun", "deepspeed"):
        (fake_venv / "bin" / name).write_text(f'#!/usr/bin/env bash\necho "{name} $*"\n')
        (fake_venv / "bin" / name).chmod(0o755)
    caller = tmp_path / "caller"
    caller.mkdir()
    shutil.copy(LAUNCHERS / "hostfile.example", caller / "myhosts")
    (caller / "my_ds.json").write_text("{}", encoding="utf-8")
    env = {**run_env(), "PATH": f"{fake_venv / 'bin'}:{os.environ['PATH']}", "AMBERT_VENV": str(fake_venv),
           "HOSTFILE": "myhosts", "DS_CONFIG": "my_ds.json", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for script, extra in (("multinode_pdsh.sh", {}), ("openmpi.sh", {"MODE": "mpirun"}),
                          ("openmpi.sh", {"MODE": "deepspeed"}), ("per_node.sh", {})):
        result = subprocess.run(["bash", str(LAUNCHERS / script), "data.path=/x"], env={**env, **extra}, cwd=caller,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, (script, extra, result.stderr)
        line = result.stdout.strip()
        assert f"--deepspeed_config {caller / 'my_ds.json'} --resume auto data.path=/x" in line, (script, extra, line)
        assert f"--hostfile {caller / 'myhosts'}" in line, (script, extra, line)


def test_srun_environment_is_mapped(monkeypatch):
    from pipeline.config import ConfigError
    from pipeline.pretrain import launch_env

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.setenv(name, "")  # recorded, so launch_env's exports are undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    with pytest.raises(ConfigError, match="srun without MASTER_ADDR"):
        launch_env()
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    assert launch_env() == (5, 8, 1)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")


def test_plain_mpirun_with_master_addr_is_mapped(monkeypatch):
    """mpirun sets only OMPI_*: with MASTER_ADDR given (openmpi.sh gives its hostfile's first host) the
    env:// variables are exported, so DeepSpeed does not run its MPI discovery, which replaced
    MASTER_ADDR with rank 0's first `hostname -I` address. Without MASTER_ADDR: left to the discovery."""
    from pipeline.pretrain import launch_env

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_ID"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "16")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")
    assert launch_env() == (3, 16, 3) and "RANK" not in os.environ  # MPI discovery's job
    monkeypatch.setenv("MASTER_ADDR", "node001")
    assert launch_env() == (3, 16, 3)
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")] == ["3", "16", "3", "29500"]


def test_two_nodes_on_loopback_and_mpirun_agree_with_single_node(tmp_path_factory, tmp_path):
    reference = get_reference_run(tmp_path_factory)
    dataset = get_dataset(tmp_path_factory)
    common = [*BASE, f"data.path={dataset}", *REFERENCE_OVERRIDES, *SHORT]

    # Two "nodes" started separately, each with its node rank: launchers/per_node.sh (no ssh).
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        env = run_env({"NODE_RANK": str(node_rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "HOSTFILE": str(hostfile), "RECIPE": "pipeline/recipes/demo.yaml"})
        log = open(tmp_path / f"node{node_rank}.log", "w")
        nodes.append(subprocess.Popen(["bash", str(LAUNCHERS / "per_node.sh"), *common, f"output_dir={tmp_path / 'two_nodes'}"],
                                      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [n.wait(timeout=300) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    assert codes == [0, 0], [(tmp_path / f"node{r}.log").read_text()[-2000:] for r in (0, 1)]
    _assert_matches_reference(tmp_path / "two_nodes", reference)

    # Plain mpirun: ranks discovered through mpi4py.
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun (Open MPI) is not installed: apt-get install openmpi-bin")
    cmd = ["mpirun", "-np", "2", "--bind-to", "none", "--oversubscribe",
           "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH", "-x", f"MASTER_PORT={free_port()}",
           "-x", "MASTER_ADDR=127.0.0.1"]  # as openmpi.sh gives it: no MPI discovery
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    result = subprocess.run([*cmd, sys.executable, PRETRAIN, *common, f"output_dir={tmp_path / 'mpirun'}"],
                            cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    _assert_matches_reference(tmp_path / "mpirun", reference)


@pytest.mark.skipif(os.environ.get("AMBERT_TEST_DEMO") != "1",
                    reason="the full README demo (set-up + dataset build + 2 jobs, ~5 min): AMBERT_TEST_DEMO=1 bash launchers/test.sh -k demo")
def test_readme_demo_command(tmp_path):
    env = run_env({"AMBERT_DEMO_OUT": str(tmp_path / "demo"), "AMBERT_DEMO_STEPS": "40", "MASTER_PORT": str(free_port()),
                   "AMBERT_DEMO_DATA": str(tmp_path / "demo-zh")})  # built and verified by the demo
    result = subprocess.run(["bash", str(LAUNCHERS / "demo.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read_metrics(tmp_path / "demo")
    assert sorted(metrics) == list(range(1, 41))
    assert (tmp_path / "demo" / "loss.png").stat().st_size > 1000
    assert "resumed from" in result.stdout
    assert f"verify {tmp_path / 'demo-zh'}: OK" in result.stdout


SRUN_SHIM = """#!/usr/bin/env bash
# srun on one host: SLURM_NTASKS local tasks with the variables srun gives each task
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < ${SLURM_NTASKS:-2}; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_STEP_ID=0 "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
SCONTROL_SHIM = """#!/usr/bin/env bash
case "$1 $2" in
  "show hostnames") echo localhost ;;
  requeue*) echo "requeue $2" >> "$SHIM_LOG" ;;
esac
"""


def _sbatch(tmp_path: Path, submit_dir: Path, args: list[str], job: int, root: Path | None = None) -> tuple[int, str]:
    """Run launchers/slurm.sbatch as slurmd would (bash, batch environment, from the submit
    directory) with srun / scontrol shims for one host."""
    shims = tmp_path / "shims"
    shims.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN_SHIM), ("scontrol", SCONTROL_SHIM)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    env = run_env({"PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": str(job), "SLURM_NTASKS": "2",
                   "SLURM_SUBMIT_DIR": str(submit_dir), "SLURM_JOB_NODELIST": "localhost", "SLURM_CPUS_PER_TASK": "1",
                   "SHIM_LOG": str(tmp_path / "scontrol.log"), "MASTER_PORT": str(free_port()),
                   "AMBERT_VENV": str(Path(sys.executable).parent.parent)})
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "AMBERT_ROOT"):
        env.pop(name, None)
    if root is not None:
        env["AMBERT_ROOT"] = str(root)
    result = subprocess.run(["bash", str(LAUNCHERS / "slurm.sbatch"), *args], cwd=submit_dir, env=env,
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def test_slurm_template_requeues_until_the_last_step_is_saved(tmp_path, tmp_path_factory):
    """The sbatch script itself, with srun/scontrol shims: a job that stops early (a time limit, here
    schedule.stop_after) saves and requeues itself; the requeued job finishes and is not requeued,
    even with checkpointing.save_at_end=false (which left the last step unsaved: requeued forever);
    submitted from elsewhere without AMBERT_ROOT it says so (it died with no message)."""
    dataset = get_dataset(tmp_path_factory)
    run = tmp_path / "run"
    args = ["--config", "pipeline/recipes/demo.yaml", *BASE, f"data.path={dataset}", f"output_dir={run}",
            "schedule.train_steps=4", "checkpointing.save_at_end=false"]
    code, output = _sbatch(tmp_path, ROOT, [*args, "schedule.stop_after=2"], job=11)
    assert code == 0 and "requeueing 11" in output, output[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 11\n"
    code, output = _sbatch(tmp_path, ROOT, args, job=11)
    assert code == 0 and "training complete" in output, output[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 11\n"  # not requeued again
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, output = _sbatch(tmp_path, elsewhere, args, job=12)
    assert code == 2 and f"error: {elsewhere} is not the AMBERT repository" in output and "AMBERT_ROOT" in output, output


def test_a_process_that_cannot_see_its_gpu_is_told_why(monkeypatch):
    """Each process takes GPU <local rank> of its node; a scheduler that shows a task one GPU made
    local rank 5 fail with CUDA's bare "invalid device ordinal" (slurm.sbatch now passes --gpu-bind=none)."""
    import torch

    from pipeline import parallel

    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    with pytest.raises(RuntimeError, match=r"local rank 5, but this process sees 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES=5\).*"
                                           r"--gpu-bind=none"):
        parallel.select_gpu()
    assert chosen == []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    parallel.select_gpu()
    assert chosen == [5]
    assert "--gpu-bind=none" in (LAUNCHERS / "slurm.sbatch").read_text().split("\nsrun ", 1)[1].split("\n", 1)[0]
