"""Run a function in N processes on gloo, the way DeepSpeed's DistributedTest does, with a timeout.

    from tests.distributed import run_distributed

    def _body(tmp_path, scale):             # module-level: it is pickled into spawned processes
        import torch.distributed as dist
        t = torch.ones(1) * dist.get_rank()
        dist.all_reduce(t)
        return t.item() * scale

    def test_all_reduce(tmp_path):
        results = run_distributed(_body, world_size=2, args=(tmp_path, 2.0))
        assert results == [2.0, 2.0]

Each rank gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, DS_ACCELERATOR=cpu and
one OpenMP thread, and (``init="torch"``, the default) an initialised gloo process group. With
``init="deepspeed"`` the process group comes from ``deepspeed.init_distributed``; with
``init=None`` the function initialises whatever it wants itself.

Every rank's return value comes back in rank order. If any rank raises, the error names the rank
and carries its traceback; if any rank is still running after ``timeout`` seconds, all are killed
and the error names the ranks that hung (a hang is a failure, never a stuck CI job).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any


class DistributedTestError(AssertionError):
    pass


_PORT_SLICE = 1500
_ports_given: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a run to bind a moment later. Not one the kernel picks
    (bind to port 0): those come from its ephemeral range (32768-60999 here), from which every
    outgoing connection (gloo's, another test's) also takes its own port, so one could take it before
    the run binds it ("MASTER_PORT ... is in use" under pytest-xdist). Below that range instead, each
    xdist worker in a slice of its own, in random order, none given twice by this process."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    low = 20000 + _PORT_SLICE * ((int(worker) if worker.isdigit() else 0) % 8)
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(low, low + _PORT_SLICE)
        if port in _ports_given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_given.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # (the slice is full: any free port)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_rank_group():
    """A fixture body (a generator): a 1-rank gloo group in the test process, so megatron-core layers
    have a TP group (TP=1); the group, the parallel state and MASTER_ADDR / MASTER_PORT are taken down
    or put back afterwards (the next test file in this process, under pytest-xdist any file, must not
    find this one's rendezvous variables in its environment)."""
    import torch.distributed as dist

    from pipeline import parallel

    saved = {name: os.environ.get(name) for name in ("MASTER_ADDR", "MASTER_PORT")}
    created = not dist.is_initialized()
    if created:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    parallel.initialize_parallel(tensor_parallel_size=1, seed=1234)
    try:
        yield
    finally:
        if created:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _worker(fn, rank, world_size, port, init, args, kwargs, env, queue):
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            **env,
        }
    )
    try:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        if init == "torch":
            import torch.distributed as dist

            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        elif init == "deepspeed":
            from pipeline import parallel

            parallel.init_distributed("gloo")
        result = fn(*args, **kwargs)
        queue.put((rank, "ok", result))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
        import gc

        gc.freeze()  # the interpreter's final collections would walk torch's heap: ~2 s of each rank's exit


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    timeout: float = 300.0,
    init: str | None = "torch",
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return their results in rank order."""
    if init not in ("torch", "deepspeed", None):
        raise ValueError(f"init must be 'torch', 'deepspeed' or None, got {init!r}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, init, tuple(args), dict(kwargs or {}), dict(env or {}), queue),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()

    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
                results[rank] = (status, payload)
                if status == "error":
                    # One failed rank usually leaves the others blocked in a collective: give them
                    # a short grace period to report their own errors, then stop waiting.
                    deadline = min(deadline, time.monotonic() + 10.0)
            except Exception:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None) and r not in results]
                if dead:
                    for r in dead:
                        results[r] = ("error", f"process exited with code {procs[r].exitcode} without reporting")
                    deadline = min(deadline, time.monotonic() + 10.0)
    finally:
        # The ranks that reported get 5 s in all to exit; a rank that never reported (hung past the
        # timeout, or killed by an error elsewhere) is killed at once, not waited for 5 s more each.
        grace = time.monotonic() + 5
        for rank, p in enumerate(procs):
            if rank in results:
                p.join(timeout=max(0.0, grace - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()

    errors = [f"--- rank {r} ---\n{payload}" for r, (status, payload) in sorted(results.items()) if status == "error"]
    hung = [r for r in range(world_size) if r not in results]
    if errors or hung:
        msg = []
        if errors:
            msg.append("ranks failed:\n" + "\n".join(errors))
        if hung:
            msg.append(f"ranks {hung} did not finish within {timeout:.0f}s (killed)")
        raise DistributedTestError("\n".join(msg))
    return [results[r][1] for r in range(world_size)]
