"""Tensor/data-parallel state on top of megatron-core's parallel_state, safe on CPU (gloo) and GPU.

megatron-core assumes CUDA in three places we touch (see /work/shared/ENVIRONMENT.md): the RNG
tracker (``model_parallel_cuda_manual_seed``, ``get_cuda_rng_tracker().fork()``), the global memory
buffer (allocates on ``torch.cuda.current_device()``) and GPU initialisation. On a machine without
CUDA we install a CPU RNG tracker with the same names and semantics (one dropout stream per TP rank,
used inside tensor-parallel regions) and a global memory buffer that allocates on the accelerator
device; on GPU we use megatron-core's own. Sequence parallelism stays off (no CPU path).

    initialize_parallel(tensor_parallel_size=2, seed=1234)   # after init_process_group
    model = build_model(config)                                # megatron layers now know their TP group
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as megatron_random
from megatron.core.utils import GlobalMemoryBuffer

from pipeline.config import uses_gpu

log = logging.getLogger(__name__)

MODEL_PARALLEL_RNG = megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME
# megatron-core's offset between the shared seed and the per-TP-rank dropout seed.
_TP_SEED_OFFSET = 2718


def accelerator_device() -> torch.device:
    """The device this rank computes on: its CUDA device if there is one, else the CPU."""
    if uses_gpu():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class CpuRNGStatesTracker(megatron_random.CudaRNGStatesTracker):
    """megatron's RNG tracker on the CPU generator: ``fork(name)`` swaps the global CPU RNG state
    for the named stream and back, so dropout inside a TP region differs per TP rank while dropout
    on replicated activations stays identical across TP ranks."""

    def __init__(self) -> None:
        super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=False)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already exists in the tracker")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists in the tracker")
        self.seeds_.add(seed)
        generator = torch.Generator()
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()
        self._is_initialized = True

    def get_states(self) -> dict:
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict) -> None:
        self._is_initialized = True
        self.states_ = {name: state.clone() for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} was never added; call initialize_parallel() first")
        outside = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outside)


class DeviceGlobalMemoryBuffer(GlobalMemoryBuffer):
    """megatron's GlobalMemoryBuffer, allocating on the accelerator device instead of CUDA."""

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        required = int(np.prod(tensor_shape))
        buffer = self.buffer.get((name, dtype))
        if buffer is None or buffer.numel() < required:
            buffer = torch.empty(required, dtype=dtype, device=accelerator_device())
            self.buffer[(name, dtype)] = buffer
        return buffer[:required].view(*tensor_shape)


# DeepSpeed's CPU all-reduce (ShareMemComm, csrc/cpu/comm/shm.cpp) gives each rank of a one-host
# job a shared-memory workspace /dev/shm/<prefix>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (69 MB)
# and never unlinks it: every CPU run, finished or killed, left them behind (a test machine here
# had 19 GB of them in /dev/shm, RAM no process could use). Known upstream; sglang hit the same.
DEEPSPEED_SHM_PREFIX = "deepspeed_allreduce_buffer"
SHM_DIR = "/dev/shm"


def deepspeed_shm_file(rank: int) -> str:
    """The shared-memory workspace DeepSpeed's CPU all-reduce creates for ``rank`` of this job."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return os.path.join(SHM_DIR, f"{DEEPSPEED_SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}")


def warn_cpu_torch_on_gpu_node() -> bool:
    """A venv set up on a CPU machine (a login node, the demo) holds a CPU-only torch: on a GPU node
    every rank would train on the CPU over gloo, only slower, without an error. Warns (stderr) when
    ``nvidia-smi`` lists a GPU that this torch cannot use; returns whether it warned."""
    import shutil
    import subprocess
    import sys

    if torch.cuda.is_available() or torch.version.cuda is not None or getattr(torch.version, "hip", None):
        return False
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return False
    print(f"warning: this node has an NVIDIA GPU ({listed.stdout.splitlines()[0].strip()}) but torch "
          f"{torch.__version__} is a CPU-only build, so this run trains on the CPU over gloo. Run "
          f"launchers/setup.sh on this node (it replaces a CPU-only torch when nvidia-smi works), or "
          f"pip install a CUDA build of torch into {sys.prefix}", file=sys.stderr, flush=True)
    return True


def use_this_environments_ninja() -> None:
    """Put this interpreter's bin directory first on PATH when it holds a ``ninja``. torch JIT-builds
    DeepSpeed's CPU op with the first ``ninja`` on PATH, and the venv's (pip's 1.13) and Debian's (1.11)
    do not read each other's build log: a job started without the venv's bin on PATH (``.venv/bin/python
    pipeline/pretrain.py``, the launchers) rebuilt the op an activated shell or set-up had built, and
    the reverse, 60-90 s of a start-up each time."""
    bindir = Path(sys.executable).parent
    paths = os.environ.get("PATH", "").split(os.pathsep)
    if (bindir / "ninja").is_file() and paths[0] != str(bindir):
        os.environ["PATH"] = os.pathsep.join([str(bindir), *(p for p in paths if p != str(bindir))])


def _extensions_flavour() -> str:
    """torch's name for this interpreter and accelerator in its JIT-build directory: ``py311_cpu``."""
    if torch.version.hip is not None:
        accelerator = "rocm" + torch.version.hip.replace(".", "")
    elif torch.version.cuda is not None:
        accelerator = "cu" + torch.version.cuda.replace(".", "")
    else:
        accelerator = "cpu"
    return f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accelerator}"


def this_environments_extensions_dir() -> Path | None:
    """Where this environment's JIT-built ops go: ``<venv>/torch_extensions/pyXY_<accelerator>`` for a
    virtual environment (or conda environment) that can be written to; None elsewhere (a system
    Python, a read-only shared environment: torch's default, ``~/.cache/torch_extensions``)."""
    prefix = Path(sys.prefix)
    in_env = sys.prefix != sys.base_prefix or os.environ.get("CONDA_PREFIX") == sys.prefix
    root = prefix / "torch_extensions"
    if not in_env or not os.access(root if root.is_dir() else prefix, os.W_OK):
        return None
    return root / _extensions_flavour()


def use_this_environments_extensions_dir() -> str:
    """Set TORCH_EXTENSIONS_DIR, unless the user did, to ``this_environments_extensions_dir()``.

    torch JIT-builds DeepSpeed's ops (on CPU its shared-memory communication op; DeepSpeedCPUAdam
    for ZeRO-Offload) into one directory per user by default, shared by every environment: two
    clones with their own venvs rebuilt the op (60-90 s) whenever their jobs alternated, their build
    files naming different paths. Set-up builds the op where this points. Returns the directory used."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        mine = this_environments_extensions_dir()
        if mine is not None:
            os.environ["TORCH_EXTENSIONS_DIR"] = str(mine)
    return str(deepspeed_build_lock().parent.parent)


def init_distributed(backend: str | None = None, auto_mpi_discovery: bool = True, timeout_minutes: float = 30.0) -> None:
    """``deepspeed.init_distributed`` (gloo on CPU, nccl on GPU, or ``backend``), then the
    release of DeepSpeed's CPU shared-memory names (``release_deepspeed_shm``). A collective that
    waits longer than ``timeout_minutes`` for a peer fails instead of hanging the job."""
    from datetime import timedelta

    use_this_environments_extensions_dir()  # where set-up built DeepSpeed's CPU op (unless the user chose)
    warn_deepspeed_build_lock()  # before DeepSpeed may wait on it (forever, if it is stale)
    warn_cpu_torch_on_gpu_node()
    use_this_environments_ninja()  # the ninja set-up built DeepSpeed's CPU op with
    import deepspeed

    # NCCL exactly when DeepSpeed's accelerator is the GPU (pretrain.py sets DS_ACCELERATOR from
    # torch.cuda.is_available(); DS_ACCELERATOR=cpu keeps a GPU node's job on the CPU, over gloo).
    backend = backend or ("nccl" if uses_gpu() else "gloo")
    if backend == "nccl":  # before any collective: NCCL object collectives use the current device
        select_gpu()
    # DeepSpeed's MPI discovery (plain `mpirun`, or no launcher at all) sets MASTER_PORT to its
    # distributed_port, 29500 unless told: the user's MASTER_PORT is passed on, or it would be ignored.
    port = os.environ.get("MASTER_PORT", "29500")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"MASTER_PORT={port!r} is not a port number: export MASTER_PORT=<a free port, 1024-65535>")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=auto_mpi_discovery, verbose=False,
                               timeout=timedelta(minutes=timeout_minutes), distributed_port=int(port))
    release_deepspeed_shm()


# DeepSpeed JIT-builds its CPU shared-memory op (deepspeed_shm_comm) with torch.utils.cpp_extension
# on the first CPU init_distributed. torch guards the build with a lock file in the build directory
# and every other process polls until that file disappears; a start-up killed during the build
# (Ctrl-C, a test timeout, scancel) leaves the file behind and every later DeepSpeed start on CPU
# waits on it forever, silently. A real build takes about a minute (well under 10).
DEEPSPEED_JIT_OP = "deepspeed_shm_comm"
STALE_BUILD_LOCK_MINUTES = 10.0


def deepspeed_build_lock() -> Path:
    """The lock file torch's JIT build of DeepSpeed's CPU op uses, where torch would put it:
    $TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/lock (``init_distributed`` sets it to the environment's own
    directory unless the user did), else ~/.cache/torch_extensions/pyXY_<cpu|cuXYZ|rocmX>/
    deepspeed_shm_comm/lock (XDG_CACHE_HOME replaces ~/.cache), as torch.utils.cpp_extension does."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = os.path.join(get_default_build_root(), _extensions_flavour())
    return Path(root) / DEEPSPEED_JIT_OP / "lock"


def select_gpu() -> None:
    """``torch.cuda.set_device(local rank)``, or an error that says why this process cannot: each
    process takes GPU <local rank> of its node, so it must see all of the node's GPUs (a scheduler
    that gives each task one GPU made it fail with CUDA's bare "invalid device ordinal")."""
    local, count = _local_rank(), torch.cuda.device_count()
    if local >= count:
        raise RuntimeError(
            f"local rank {local}, but this process sees {count} GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): each process takes GPU <local rank> of its node, so "
            f"every process must see all of the node's GPUs (under srun: --gpu-bind=none and no --gpus-per-task, as "
            f"launchers/slurm.sbatch does), or start no more processes per node than it has GPUs")
    torch.cuda.set_device(local)


def _local_rank() -> int:
    for name in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def warn_deepspeed_build_lock(stale_minutes: float = STALE_BUILD_LOCK_MINUTES) -> str | None:
    """If the lock of DeepSpeed's CPU-op JIT build exists, print on stderr (local rank 0 only) its
    path, its age and the command that deletes it, saying plainly when it is older than
    ``stale_minutes`` (a killed build: every DeepSpeed start on CPU would wait on it forever).
    Call it before ``deepspeed.init_distributed`` (``init_distributed`` does); returns the message.
    Only GPU jobs (which do not build this op) skip the check."""
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        return None
    lock = deepspeed_build_lock()
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return None  # no lock: nothing to wait for
    minutes = max(age, 0.0) / 60
    when = f"{minutes:.0f} min" if minutes >= 1 else f"{max(age, 0.0):.0f} s"
    if minutes >= stale_minutes:
        message = (f"warning: {lock} is {when} old: it is STALE (a JIT build of DeepSpeed's CPU op takes well "
                   f"under {stale_minutes:.0f} min; this one was killed) and every DeepSpeed start on CPU waits "
                   f"on it forever. Delete it: rm -f {lock}")
    else:
        message = (f"warning: {lock} exists ({when} old): another process is building DeepSpeed's CPU op, "
                   f"and this job waits for it. If start-up still waits {stale_minutes:.0f} min after the lock "
                   f"was made, that build was killed: delete it with rm -f {lock}")
    if _local_rank() == 0:
        print(message, file=sys.stderr, flush=True)
    return message


def release_deepspeed_shm() -> bool:
    """Unlink this rank's DeepSpeed CPU all-reduce workspace name once every rank has mapped it.

    DeepSpeed maps every rank's workspace while ``init_distributed`` runs (a rank waits until its
    peers' files exist), so after a barrier the names are no longer needed: the memory stays mapped
    in the live processes and the kernel frees it when the last of them exits, however it exits
    (SIGKILL included). Collective: call it on every rank right after ``init_distributed``; when it
    returns, no name of this job's workspaces is left. Returns whether this rank had a workspace to
    release (only CPU jobs whose ranks all run on one host do)."""
    try:
        from deepspeed.comm import comm as ds_comm
    except ImportError:
        return False
    backend = getattr(ds_comm, "cdb", None)
    if getattr(backend, "shm_comm_op", None) is None or not dist.is_initialized():
        return False  # GPU accelerators: no shared-memory all-reduce
    if os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return False  # DeepSpeed's condition for creating the workspaces: all ranks on this host
    dist.barrier()  # every rank has finished init_distributed, so has mapped every workspace
    path = deepspeed_shm_file(dist.get_rank())
    try:
        os.unlink(path)
        released = True
    except FileNotFoundError:
        released = False
    dist.barrier()  # on return, no workspace name of this job is left (its ranks all unlinked theirs)
    if dist.get_rank() == 0:
        warn_stale_deepspeed_shm()
    return released


def warn_stale_deepspeed_shm() -> int:
    """Warn about DeepSpeed CPU workspaces left in /dev/shm by earlier runs (DeepSpeed's own, or
    this project's before it released them); returns their total bytes. They may belong to a job
    still running on this host, so they are only reported, never deleted here."""
    prefix = f"{DEEPSPEED_SHM_PREFIX}_{os.getuid()}_"
    try:
        ours = os.path.basename(deepspeed_shm_file(0))[:-1]  # this job's own (already unlinked; never stale)
        stale = [os.path.join(SHM_DIR, f) for f in os.listdir(SHM_DIR) if f.startswith(prefix) and not f.startswith(ours)]
        total = sum(os.path.getsize(f) for f in stale)
    except OSError:
        return 0
    if stale:
        log.warning("%d DeepSpeed CPU all-reduce workspaces (%.1f GB of RAM) are in %s, left by earlier DeepSpeed "
                    "runs (DeepSpeed never deletes them). If no other DeepSpeed job runs on this host, free them: "
                    "rm %s/%s*", len(stale), total / 1e9, SHM_DIR, SHM_DIR, prefix)
    return total


def settings_differing_from_rank0(settings: dict) -> list[tuple[str, int, object, object]]:
    """Collective (every rank, after ``init_distributed``): compare this rank's ``settings`` (a
    picklable dict, e.g. the parsed command line) with rank 0's, on every rank. Returns every
    difference of every rank as (key, rank, that rank's value, rank 0's value), the same list on
    every rank, so all ranks can stop together with the same message."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return []
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, settings)
    missing = object()
    reference = gathered[0]
    differences = []
    for rank, other in enumerate(gathered[1:], start=1):
        for key in list(reference) + [k for k in other if k not in reference]:
            mine, theirs = other.get(key, missing), reference.get(key, missing)
            if mine != theirs:
                differences.append((key, rank, None if mine is missing else mine, None if theirs is missing else theirs))
    return differences


class PeerStartupError(RuntimeError):
    """Another rank failed its own start-up checks (``agree_on_startup``): this rank stops too."""


# What ``startup_failed`` already logged on this rank, and the lower rank (if any) that failed with the
# very same error: the error line is then left to that rank (one per job, not one per rank).
startup_error_logged: str | None = None
startup_error_same_as_rank: int | None = None
# Set on every rank by ``agree_on_startup`` when some rank failed its start-up checks: the job stops
# before it has written anything but logs (``pretrain._exit_job`` then leaves without the teardown).
startup_stopped = False


# How long a rank whose own start-up checks failed waits for its peers to join the process group
# that tells them so (``startup_failed``). They are starting at the same time, so minutes suffice.
STARTUP_JOIN_MINUTES = 5.0


def agree_on_startup(error: BaseException | None = None) -> None:
    """Collective, once on every rank right after ``init_distributed``: each rank says whether its
    own start-up checks (the dataset, checkpoints and output it finds on its node) passed. If any
    rank failed, every other rank raises ``PeerStartupError`` naming that rank, its host and its
    error, so the whole job stops at once with the cause on every node's console; the failing rank
    itself returns (it raises its own error next). With one process, or before a process group
    exists, it does nothing."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    import socket

    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (socket.gethostname(), None if error is None else str(error).strip()))
    failed = [(rank, host, message) for rank, (host, message) in enumerate(gathered) if message]
    if failed:
        global startup_stopped
        startup_stopped = True
    if error is not None:
        global startup_error_same_as_rank
        same = [rank for rank, _, message in failed if message == str(error).strip() and rank < dist.get_rank()]
        startup_error_same_as_rank = same[0] if same else None
    if failed and error is None:
        rank, host, message = failed[0]
        others = f" (and {len(failed) - 1} other rank(s): {', '.join(str(r) for r, _, _ in failed[1:])})" if len(failed) > 1 else ""
        raise PeerStartupError(f"rank {rank} (host {host}) failed its start-up checks{others}, so every rank "
                               f"stops; fix that rank's node and start the job again. Rank {rank} said: {message}")


def startup_failed(error: BaseException, world_size: int, timeout_minutes: float = STARTUP_JOIN_MINUTES) -> None:
    """On a rank whose own start-up checks failed before the process group exists, just before it
    raises ``error``: its peers (``world_size`` > 1) are on their way into ``init_distributed`` and
    would wait there for it until the collective timeout. This rank joins them (waiting at most
    ``timeout_minutes``) and hands them its error through ``agree_on_startup``, so the whole job
    stops at once. Best effort: if the peers never come, this rank still raises its own error."""
    if world_size <= 1:
        return
    global startup_error_logged
    startup_error_logged = str(error).strip()
    log.error("%s", startup_error_logged)  # at once: the peers may take a while to answer
    log.warning("telling the other %d rank(s) that this one cannot start (waiting up to %.0f min for them)",
                world_size - 1, timeout_minutes)
    try:
        if not dist.is_initialized():
            init_distributed(timeout_minutes=timeout_minutes)
        agree_on_startup(error)
    except Exception as exc:  # noqa: BLE001 - the peers are gone or never came: our own error is what counts
        log.warning("could not reach the other ranks (%s); they stop at their collective timeout",
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)


def initialize_parallel(tensor_parallel_size: int = 1, seed: int = 1234, timeout_minutes: float = 30.0) -> None:
    """Set up megatron-core TP/DP groups, seeds and CPU-safe helpers on an initialised process group.

    Every rank gets the same ``seed`` for the default generators (weights are built identically and
    replicated activations see identical dropout); the TP-region stream gets ``seed + 2718 + tp_rank``
    as in megatron-core. Calling it again with the same TP size only re-seeds.
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group "
            "(gloo on CPU, nccl on GPU) or deepspeed.init_distributed() before initialize_parallel()"
        )
    world = dist.get_world_size()
    if tensor_parallel_size < 1 or world % tensor_parallel_size:
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} does not divide the world size {world}; "
            "use a divisor of the number of processes"
        )
    if uses_gpu() and "LOCAL_RANK" in os.environ:
        select_gpu()
    if (parallel_state.model_parallel_is_initialized()
            and parallel_state.get_tensor_model_parallel_world_size() != tensor_parallel_size):
        parallel_state.destroy_model_parallel()
    if not parallel_state.model_parallel_is_initialized():
        # (megatron annotates the timeout as int minutes; it only builds a timedelta from it)
        # (no gloo copies of the groups: nothing here uses them, and on GPU nodes they opened a full
        # mesh of extra TCP connections at start-up, through whatever interface gloo picks)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size,
                                                 distributed_timeout_minutes=timeout_minutes,
                                                 create_gloo_process_groups=False)
    if not uses_gpu():
        # megatron's buffer allocates on torch.cuda.current_device(): replace it.
        parallel_state._GLOBAL_MEMORY_BUFFER = DeviceGlobalMemoryBuffer()
    set_seed(seed)


def shutdown_distributed() -> None:
    """At the end of a run, after its last collective: megatron's groups, then the process group (NCCL
    warns at exit about a group never destroyed, and its exit-time teardown can hang)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def set_seed(seed: int) -> None:
    """Seed python/numpy/torch identically on every rank and the per-TP-rank dropout stream."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tp_seed = seed + _TP_SEED_OFFSET + tensor_parallel_rank()
    if uses_gpu():
        megatron_random.model_parallel_cuda_manual_seed(seed)
    else:
        tracker = CpuRNGStatesTracker()
        tracker.add(MODEL_PARALLEL_RNG, tp_seed)
        megatron_random._CUDA_RNG_STATE_TRACKER = tracker
        megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def rng_tracker():
    """The tracker whose ``fork()`` gives the per-TP-rank dropout stream (CPU or CUDA)."""
    return megatron_random.get_cuda_rng_tracker()


def rng_state() -> dict:
    """Everything needed to resume dropout bit-exactly (DeepSpeed does not save RNG state)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": rng_tracker().get_states(),
    }
    if uses_gpu():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def rng_state_fits(state: dict) -> bool:
    """Whether a saved ``rng_state`` can be restored here: its tracker states (megatron's dropout streams)
    are of this run's kind, CUDA generator states on GPUs, CPU ones on CPU (other sizes: set_rng_state
    would raise "RNG state is wrong size" for a checkpoint moved between CPU and GPU machines)."""
    mine, saved = rng_tracker().get_states(), state.get("tracker") or {}
    return set(saved) == set(mine) and all(torch.as_tensor(saved[k]).numel() == mine[k].numel() for k in mine)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    rng_tracker().set_states(state["tracker"])
    if "cuda" in state and uses_gpu():
        torch.cuda.set_rng_state(state["cuda"])


def _initialized() -> bool:
    return parallel_state.model_parallel_is_initialized()


def tensor_parallel_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank() if _initialized() else 0


def tensor_parallel_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size() if _initialized() else 1


def collective_device() -> torch.device:
    """Where a tensor passed to a collective must live: this rank's GPU under NCCL, which takes no CPU
    tensors ("No backend type associated with device type cpu"), else the CPU (gloo). The loop's small
    bookkeeping collectives (metrics, the preemption flag, valid sums) build their tensors here."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def tensor_parallel_group():
    return parallel_state.get_tensor_model_parallel_group()


def data_parallel_group():
    return parallel_state.get_data_parallel_group()


def data_parallel_rank() -> int:
    return parallel_state.get_data_parallel_rank() if _initialized() else 0


def data_parallel_size() -> int:
    return parallel_state.get_data_parallel_world_size() if _initialized() else 1


class DeepSpeedMPU:
    """The ``mpu`` object DeepSpeed wants (get_model_parallel_* etc.), mapped onto megatron-core's
    tensor-model-parallel groups. Passing ``parallel_state`` itself fails: it has no
    get_model_parallel_* functions. Use together with ``deepspeed.zero.Init(data_parallel_group=
    data_parallel_group(), mpu=DeepSpeedMPU())``: without the explicit group ZeRO-3 partitions over
    the whole world and silently copies TP rank 0's shards to the other TP ranks."""

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)


# ----------------------------------------------------------------------------------------------
# Reassembling tensor-parallel shards (tests, checkpoint export)
# ----------------------------------------------------------------------------------------------
def full_tensor(shard: torch.Tensor, like: torch.nn.Parameter | None = None) -> torch.Tensor:
    """Gather a tensor-parallel shard (a parameter, or its gradient with ``like=param``) into the
    full TP=1 tensor, honouring megatron's ``partition_dim`` and ``partition_stride`` attributes.
    Replicated tensors come back unchanged."""
    meta = like if like is not None else shard
    if not getattr(meta, "tensor_model_parallel", False) or tensor_parallel_size() == 1:
        return shard.detach().clone()
    dim = meta.partition_dim
    stride = getattr(meta, "partition_stride", 1)
    size = tensor_parallel_size()
    pieces = [torch.empty_like(shard) for _ in range(size)]
    dist.all_gather(pieces, shard.detach().contiguous(), group=tensor_parallel_group())
    if stride == 1:
        return torch.cat(pieces, dim=dim)
    # Rank r holds chunks r, r+size, r+2*size, ... of the full tensor split into size*stride chunks.
    chunks_per_rank = [p.chunk(stride, dim=dim) for p in pieces]
    ordered = [chunks_per_rank[r][i] for i in range(stride) for r in range(size)]
    return torch.cat(ordered, dim=dim)
