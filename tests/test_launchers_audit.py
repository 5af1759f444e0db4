"""Launcher, set-up and conversion defects found by the set-up/launcher audit: each test failed
before its fix. Stubs stand in for srun / scontrol / nvidia-smi / pip; nothing here trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ROOT / "launchers"


def _stub(directory: Path, name: str, text: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text("#!/usr/bin/env bash\n" + text)
    (directory / name).chmod(0o755)


def test_slurm_srun_gets_the_cpus_per_task_of_the_job(tmp_path):
    """Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch: the step's tasks got one
    CPU each (under cgroup core confinement: 8 threads and the loader workers of a rank on 1 core).
    The script passes the job's value to srun explicitly."""
    shims = tmp_path / "shims"
    _stub(shims, "srun", 'echo "srun $*" >> "$SHIM_LOG"\n')  # the step "succeeds" without training
    _stub(shims, "scontrol", 'case "$1 $2" in "show hostnames") echo node001 ;; requeue*) echo "requeue $2" >> "$SHIM_LOG" ;; esac\n')
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NODELIST": "node[001-002]", "SLURM_CPUS_PER_TASK": "6",
           "SHIM_LOG": str(tmp_path / "log"), "AMBERT_VENV": str(Path(sys.executable).parent.parent),
           "PYTHONPATH": str(ROOT)}
    env.pop("AMBERT_ROOT", None)
    result = subprocess.run(["bash", str(LAUNCHERS / "slurm.sbatch"), "--config", "pipeline/recipes/demo.yaml",
                             f"output_dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    srun = [line for line in (tmp_path / "log").read_text().splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and " --cpus-per-task=6 " in srun[0], srun


def test_slurm_does_not_requeue_when_it_cannot_tell_whether_training_finished(tmp_path):
    """The "finished?" check exited 1 on any exception (an unreadable checkpoint folder, a broken
    venv), which read as "stopped early": the job requeued itself forever. Now a failed check is an
    error that names the fix; a run stopped early (no checkpoint at the last step) still requeues."""
    shims = tmp_path / "shims"
    _stub(shims, "srun", 'echo "srun $*" >> "$SHIM_LOG"\n')
    _stub(shims, "scontrol", 'case "$1 $2" in "show hostnames") echo node001 ;; requeue*) echo "requeue $2" >> "$SHIM_LOG" ;; esac\n')
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NODELIST": "node001", "SHIM_LOG": str(tmp_path / "log"),
           "AMBERT_VENV": str(Path(sys.executable).parent.parent), "PYTHONPATH": str(ROOT)}
    env.pop("AMBERT_ROOT", None)

    def submit(*overrides: str) -> subprocess.CompletedProcess:
        (tmp_path / "log").unlink(missing_ok=True)
        return subprocess.run(["bash", str(LAUNCHERS / "slurm.sbatch"), "--config", "pipeline/recipes/demo.yaml",
                               f"output_dir={tmp_path / 'run'}", *overrides], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    stopped = submit()  # no checkpoint at the last step: stopped early
    assert stopped.returncode == 0 and "requeue 7" in (tmp_path / "log").read_text(), stopped.stdout + stopped.stderr
    broken = submit("schedule.train_steps=not-a-number")  # the check itself fails
    assert broken.returncode != 0, broken.stdout + broken.stderr
    assert "requeue 7" not in (tmp_path / "log").read_text()
    assert "could not read the run's checkpoints" in broken.stderr and "not requeueing" in broken.stderr


def _fake_checkpoint(tmp_path: Path) -> Path:
    source = tmp_path / "run" / "checkpoints" / "step_00000004"
    source.mkdir(parents=True)
    (source / "COMPLETE").write_text('{"step": 4, "tag": "step_00000004", "model_config": {}}', encoding="utf-8")
    return source


def test_convert_refuses_an_output_inside_the_source_checkpoint(tmp_path, capsys):
    """`convert export CKPT CKPT/export` (or `universal CKPT CKPT/u`) wrote into the checkpoint itself:
    retention (keep_last) later deleted the export together with the checkpoint, without a word."""
    from pipeline.convert import ConvertError, export, to_universal

    source = _fake_checkpoint(tmp_path)
    for call, output in ((export, source / "export"), (to_universal, source / "universal"),
                         (export, source / "a" / "b")):
        with pytest.raises(ConvertError, match="inside the checkpoint"):
            call(source, output)
        assert not output.exists() and sorted(p.name for p in source.iterdir()) == ["COMPLETE"]
    # the Hugging Face export too (it wrote into the checkpoint), before anything is read or written
    from pipeline.export_hf import main as export_hf_main

    assert export_hf_main([str(source), str(source / "hf")]) == 2
    assert "inside the checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in source.iterdir()) == ["COMPLETE"]


FAKE_PYTHON = """#!/usr/bin/env bash
# the venv's python: pip and compileall are only logged; `import torch` finds a fake torch module
case "$1 $2" in
  "-m pip") echo "pip ${*:3}" >> "$SHIM_LOG"; [ "$3" = uninstall ] && rm -rf "$FAKE_TORCH/torch"; exit 0 ;;
  "-m compileall") exit 0 ;;
esac
PYTHONPATH="$FAKE_TORCH" exec "$REAL_PYTHON" -S "$@"  # -S: no site-packages, no real torch
"""


def _setup(tmp_path: Path, torch_cuda: str | None, gpu: bool, without: str = "", sudo: str = "") -> list[str]:
    venv = tmp_path / "venv"
    _stub(venv / "bin", "python", FAKE_PYTHON.removeprefix("#!/usr/bin/env bash\n"))
    (venv / ".ambert-installed").touch()
    os.utime(venv / ".ambert-installed", (2**31, 2**31))  # newer than pyproject.toml: the project is installed
    fake_torch = tmp_path / "fake_torch" / "torch"
    fake_torch.mkdir(parents=True, exist_ok=True)
    (fake_torch / "__init__.py").write_text(
        f"__version__ = {'2.13.0+cpu' if torch_cuda is None else '2.13.0'!r}\n"
        f"class version:\n    cuda = {torch_cuda!r}\n    hip = None\n", encoding="utf-8")
    shims = tmp_path / "shims"
    for name in ("apt-get", "sudo"):
        _stub(shims, name, f'echo "{name} $*" >> "$SHIM_LOG"\n')
    path = os.environ["PATH"]
    if without:  # a PATH of every command but `without`
        only = tmp_path / "path"
        only.mkdir()
        for directory in reversed(os.environ["PATH"].split(os.pathsep)):
            for command in Path(directory).glob("*") if Path(directory).is_dir() else ():
                if command.name != without and os.access(command, os.X_OK):
                    (only / command.name).unlink(missing_ok=True)
                    (only / command.name).symlink_to(command)
        path = str(only)
    if sudo:  # not root; `sudo` does what the test says
        _stub(shims, "id", 'echo 1000\n')
        _stub(shims, "sudo", sudo)
    if gpu:
        _stub(shims, "nvidia-smi", 'echo "GPU 0: NVIDIA H100 (UUID: GPU-0)"\n')
    log = tmp_path / "log"
    log.write_text("")
    env = {**os.environ, "PATH": f"{shims}{os.pathsep}{path}", "AMBERT_VENV": str(venv),
           "SHIM_LOG": str(log), "FAKE_TORCH": str(fake_torch.parent), "REAL_PYTHON": sys.executable}
    env.pop("AMBERT_TORCH", None)
    result = subprocess.run(["bash", str(LAUNCHERS / "setup.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    if sudo:
        return result.stdout + result.stderr, log.read_text()
    return [line for line in log.read_text().splitlines() if line.startswith("pip ")]


@pytest.mark.skipif(not (ROOT / "third_party" / "kenlm" / "bin" / "lmplz").exists(), reason="needs lmplz built")
def test_setup_on_a_gpu_node_replaces_a_cpu_torch(tmp_path):
    """A venv set up on a CPU login node (or by the demo) holds the CPU torch; setup.sh on the GPU
    node kept it (`import torch` worked), and every rank trained on the CPU over gloo. A GPU node now
    gets the CUDA build in place of a CPU-only one; a CUDA torch, or no GPU, is left alone."""
    pip = _setup(tmp_path / "gpu", torch_cuda=None, gpu=True)
    assert any(line.startswith("pip uninstall") and " torch" in line for line in pip), pip
    assert pip[-1].endswith(" torch>=2.4") and "--extra-index-url" not in pip[-1], pip
    assert _setup(tmp_path / "gpu_cuda", torch_cuda="12.8", gpu=True) == []
    assert _setup(tmp_path / "cpu", torch_cuda=None, gpu=False) == []


@pytest.mark.skipif(not (ROOT / "third_party" / "kenlm" / "bin" / "lmplz").exists(), reason="needs lmplz built")
def test_setup_without_root_or_sudo_names_the_missing_packages_and_goes_on(tmp_path):
    """On a cluster login node (no root, no sudo rights) a missing system package (here ninja) made
    setup.sh die at `sudo apt-get update` with only sudo's own message, before the venv or the project
    were installed. It now names the packages and what needs them, and does the rest."""
    output, log = _setup(tmp_path / "a", torch_cuda="12.8", gpu=False, without="ninja",
                         sudo='echo "sudo: a password is required" >&2; exit 1\n')
    assert "WARNING: apt-get could not install" in output and "ninja-build" in output and "DeepSpeed" in output, output
    assert "ready:" in output, output
    # sudo that works: apt-get runs through it, with DEBIAN_FRONTEND set past sudo's environment reset
    output, log = _setup(tmp_path / "b", torch_cuda="12.8", gpu=False, without="ninja",
                         sudo='echo "sudo $*" >> "$SHIM_LOG"\n')
    assert "sudo apt-get update -qq" in log and "sudo env DEBIAN_FRONTEND=noninteractive apt-get install" in log, log


def test_explicit_resume_from_an_older_checkpoint_with_newer_ones_beside_it_is_refused(tmp_path):
    """Rolling back (`--resume .../step_10` while step_20 is still in the folder, as the message for a
    damaged checkpoint advised) mixed the new saves with the abandoned ones: keep_last=1 deleted the
    save just written (step 12) and kept step 20, and the next --resume auto (every SLURM requeue)
    went back to step 20. Refused, naming the newer ones and the move that makes it safe."""
    from pipeline import checkpoint as ckpt

    def save(step: int) -> None:
        (tmp_path / ckpt.tag_for(step)).mkdir()
        (tmp_path / ckpt.tag_for(step) / ckpt.COMPLETE).write_text(json.dumps({"step": step}))

    save(10), save(20)
    assert ckpt.find_resume_checkpoint(tmp_path, str(tmp_path / "step_00000020")).name == "step_00000020"
    with pytest.raises(ckpt.CheckpointError, match=r"also holds newer complete checkpoints \(step_00000020\).*mv "):
        ckpt.find_resume_checkpoint(tmp_path, str(tmp_path / "step_00000010"))
    # a checkpoint of another folder (another run) is fine: this run's folder has nothing newer
    other = tmp_path / "other"
    other.mkdir()
    assert ckpt.find_resume_checkpoint(other, str(tmp_path / "step_00000020")).name == "step_00000020"


def test_a_cpu_torch_on_a_gpu_node_is_warned_about(tmp_path, monkeypatch, capsys):
    """A venv set up on a CPU login node holds a CPU-only torch; on a GPU node pretrain.py trained
    every rank on the CPU over gloo without a word."""
    import torch

    from pipeline import parallel

    shims = tmp_path / "shims"
    _stub(shims, "nvidia-smi", 'echo "GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-0)"\n')
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert parallel.warn_cpu_torch_on_gpu_node()
    err = capsys.readouterr().err
    assert "NVIDIA A100" in err and "CPU-only build" in err and "launchers/setup.sh" in err
    monkeypatch.setattr(torch.version, "cuda", "12.4")  # a CUDA build (the driver may be the problem): no warning
    assert not parallel.warn_cpu_torch_on_gpu_node()
    monkeypatch.setattr(torch.version, "cuda", None)
    _stub(shims, "nvidia-smi", "exit 9\n")  # no usable GPU: no warning
    assert not parallel.warn_cpu_torch_on_gpu_node() and not capsys.readouterr().err


def test_ds_accelerator_cpu_on_a_gpu_node_keeps_every_choice_on_the_cpu(monkeypatch):
    """DS_ACCELERATOR=cpu on a GPU node (the test suite sets it) ran gloo on the CPU, but the RNG
    streams, megatron's memory buffer, the fp16 check and the metrics followed torch.cuda.is_available():
    a CUDA dropout tracker the CPU attention never read, fp16 accepted and failing inside DeepSpeed,
    MFU against an A100 and memory as CUDA memory. All follow one switch now."""
    import torch

    from pipeline import config as C
    from pipeline import metrics, parallel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert not C.uses_gpu() and parallel.accelerator_device() == torch.device("cpu")
    with pytest.raises(C.ConfigError, match="parallelism.precision=fp16: DeepSpeed has no fp16 on CPU"):
        C.validate(C.load_config(None, ["parallelism.precision=fp16"]), 1, paths=False)
    assert metrics.memory_mb() > 0  # this process's resident memory, not CUDA's (0 here)
    parallel.set_seed(3)  # the CPU tracker (the CUDA one would need a GPU)
    assert isinstance(parallel.rng_tracker(), parallel.CpuRNGStatesTracker) and "cuda" not in parallel.rng_state()
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert C.uses_gpu()
    C.validate(C.load_config(None, ["parallelism.precision=fp16"]), 1, paths=False)  # a GPU run may use fp16


def test_bf16_on_a_gpu_without_bf16_units_is_warned_about(monkeypatch):
    import torch

    from pipeline.pretrain import bf16_emulated

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    assert "bf16 on Tesla V100-SXM2-32GB (compute capability 7.0)" in bf16_emulated("bf16")
    assert "use parallelism.precision=fp16" in bf16_emulated("bf16")
    assert bf16_emulated("fp16") is None and bf16_emulated("fp32") is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))  # A100
    assert bf16_emulated("bf16") is None
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    assert bf16_emulated("bf16") is None  # on the CPU


def _argv_recorder(path: Path) -> None:
    """A fake launcher that writes its argv, one argument per line (JSON), to stdout."""
    path.write_text('#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n')
    path.chmod(0o755)


def test_openmpi_mpi_args_and_forwarded_values_keep_their_quoted_spaces(tmp_path):
    """MPI_ARGS is split like a shell line (shlex, as DeepSpeed splits --launcher_args): a quoted value
    with spaces stays one argument; it was split on every space, so `-x NCCL_IB_HCA="mlx5_0 mlx5_1"`
    reached mpirun as three broken arguments. An unbalanced quote is an error that names MPI_ARGS."""
    import shlex

    fake_venv = tmp_path / "venv"
    (fake_venv / "bin").mkdir(parents=True)
    for name in ("mpirun", "deepspeed"):
        _argv_recorder(fake_venv / "bin" / name)
    os.symlink(sys.executable, fake_venv / "bin" / "python")
    env = {name: value for name, value in os.environ.items() if name not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update({"PATH": f"{fake_venv / 'bin'}:{os.environ['PATH']}", "AMBERT_VENV": str(fake_venv),
                "HOSTFILE": str(ROOT / "launchers" / "hostfile.example"),
                "MPI_ARGS": '--mca btl_tcp_if_include eth0 -x NCCL_IB_HCA="mlx5_0 mlx5_1"',
                "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "a b"})  # (the template's default MASTER_PORT below)
    script = str(ROOT / "launchers" / "openmpi.sh")
    result = subprocess.run(["bash", script, "data.path=/x"], env={**env, "MODE": "mpirun"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    at = argv.index("NCCL_IB_HCA=mlx5_0 mlx5_1")
    assert argv[at - 1] == "-x" and argv[at - 4:at - 1] == ["--mca", "btl_tcp_if_include", "eth0"], argv

    result = subprocess.run(["bash", script, "data.path=/x"], env={**env, "MODE": "deepspeed"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    argv = json.loads(result.stdout)
    launcher_args = shlex.split(argv[argv.index("--launcher_args") + 1])  # as DeepSpeed's OpenMPIRunner splits it
    assert "DS_ACCELERATOR=a b" in launcher_args and "NCCL_IB_HCA=mlx5_0 mlx5_1" in launcher_args, launcher_args
    assert "MASTER_PORT=29500" in launcher_args and "HF_HUB_OFFLINE=1" in launcher_args, launcher_args

    result = subprocess.run(["bash", script], env={**env, "MODE": "mpirun", "MPI_ARGS": '-x A="unclosed'},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "MPI_ARGS" in result.stderr and "quote" in result.stderr, result.stderr


def _kubernetes_script() -> str:
    import yaml

    job = next(iter(yaml.safe_load_all((LAUNCHERS / "kubernetes.yaml").read_text())))
    scripts = {role: spec["template"]["spec"]["containers"][0]["args"][0]
               for role, spec in job["spec"]["pytorchReplicaSpecs"].items()}
    assert len(set(scripts.values())) == 1, "the Master and Worker pods run the same command"
    return scripts["Master"]


def test_kubernetes_pod_restarts_until_the_run_reached_its_last_step(tmp_path):
    """The pod's command, run as the container runs it (bash -c, torchrun replaced by a recorder):
    torchrun exiting 0 because the ranks stopped early (a preemption signal on ANY pod: every rank
    saves and exits 0) made the pod, and with the Master the whole PyTorchJob, "Succeeded" half-way.
    Now the container asks `pretrain.py --finished`: exit 1 (OnFailure restarts it) until a complete
    checkpoint is at schedule.train_steps; a SIGTERM to the shell (PID 1 in the pod) reaches torchrun;
    a failed torchrun's status is kept."""
    import signal
    import time

    from pipeline.config import load_config

    work = tmp_path / "workspace"
    (work / ".venv" / "bin").mkdir(parents=True)
    for name in ("pipeline", "data_prep"):
        os.symlink(ROOT / name, work / name)
    python = work / ".venv" / "bin" / "python"  # a wrapper: a symlink outside the venv loses its packages
    python.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    torchrun = work / ".venv" / "bin" / "torchrun"
    torchrun.write_text('#!/usr/bin/env bash\necho "$*" > "$RECORD"\n'
                        'trap \'echo TERM >> "$RECORD"; exit 0\' TERM\n'
                        'if [ -n "${HOLD:-}" ]; then touch "$RECORD.ready"; while :; do sleep 0.1; done; fi\n'
                        'exit "${TORCHRUN_STATUS:-0}"\n')
    torchrun.chmod(0o755)
    run_dir = tmp_path / "run"
    script = _kubernetes_script().replace("output_dir=/shared/runs/bert-base", f"output_dir={run_dir}")
    assert str(run_dir) in script
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "ambert-pretrain-master-0",
           "MASTER_PORT": "23456", "RECORD": str(tmp_path / "torchrun.args"), "PYTHONPATH": str(ROOT)}

    def pod(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", script], cwd=work, env={**env, **extra}, capture_output=True,
                              text=True, timeout=120)

    stopped = pod()  # the ranks stopped early (no checkpoint at the last step): restart the pod
    assert stopped.returncode == 1 and "stopped before the last step" in stopped.stdout, stopped.stdout + stopped.stderr
    args = (tmp_path / "torchrun.args").read_text()
    assert "--nnodes 2 --node_rank 1 --nproc_per_node 8" in args and "--master_port 23456" in args
    assert f"pipeline/pretrain.py --config pipeline/recipes/bert-base.yaml --resume auto data.path=/shared/data/zh output_dir={run_dir}" in args

    # an operator that sets spec.nprocPerNode's variables: WORLD_SIZE counts processes, PET_NNODES the pods
    pod(WORLD_SIZE="16", RANK="1", PET_NNODES="2", PET_NODE_RANK="1", PET_NPROC_PER_NODE="8")
    assert "--nnodes 2 --node_rank 1 --nproc_per_node 8" in (tmp_path / "torchrun.args").read_text()

    failed = pod(TORCHRUN_STATUS="7")  # a failed run keeps its status
    assert failed.returncode == 7, failed.stdout + failed.stderr

    # SIGTERM to the shell (the pod's PID 1) is passed on to torchrun, then the check runs
    proc = subprocess.Popen(["bash", "-c", script], cwd=work, env={**env, "HOLD": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ready = Path(f"{env['RECORD']}.ready")
    for _ in range(200):
        if ready.exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "TERM" in (tmp_path / "torchrun.args").read_text(), out + err
    assert proc.returncode == 1 and "stopped before the last step" in out, out + err

    config = load_config(str(ROOT / "pipeline" / "recipes" / "bert-base.yaml"), [f"output_dir={run_dir}"])
    last = config.checkpoint_dir / f"step_{config.schedule.train_steps:08d}"
    last.mkdir(parents=True)
    (last / "COMPLETE").write_text("{}", encoding="utf-8")
    done = pod()  # finished: the pod succeeds
    assert done.returncode == 0 and "finished" in done.stdout, done.stdout + done.stderr
