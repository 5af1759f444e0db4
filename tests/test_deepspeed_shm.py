"""DeepSpeed's CPU all-reduce workspaces leave nothing in /dev/shm (pipeline.parallel.init_distributed).

DeepSpeed (csrc/cpu/comm/shm.cpp) creates a 69 MB /dev/shm file per rank of a one-host CPU job and
never unlinks it; ours unlinks each name once every rank has mapped it. LOCAL_SIZE is set as the
``deepspeed`` launcher sets it (DeepSpeed's condition for creating the workspaces).
"""

import os

import pytest

from tests.distributed import run_distributed

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm (Linux)")


def _after_init():
    import torch
    from deepspeed import comm as ds_comm

    from pipeline import parallel

    rank, world = ds_comm.get_rank(), ds_comm.get_world_size()
    left = [r for r in range(world) if os.path.exists(parallel.deepspeed_shm_file(r))]
    with open("/proc/self/maps") as f:
        mapped = [line.split(None, 5)[-1].strip() for line in f if parallel.DEEPSPEED_SHM_PREFIX in line]
    # The workspaces still work after their names are gone: DeepSpeed's shared-memory all-reduce.
    t = torch.full((4096,), float(rank + 1))
    ds_comm.inference_all_reduce(t)
    ds_comm.barrier()
    return left, sorted(set(mapped)), t[0].item(), os.environ["MASTER_PORT"]


def _shm_files() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer")}


def test_workspaces_are_mapped_then_unlinked():
    before = _shm_files()
    results = run_distributed(_after_init, world_size=2, init="deepspeed", env={"LOCAL_SIZE": "2"}, timeout=600)
    for rank, (left, mapped, reduced, _) in enumerate(results):
        assert left == [], f"rank {rank}: DeepSpeed shm files still in /dev/shm: {left}"
        # Both ranks' workspaces were created and mapped (the test is not vacuous) and are deleted.
        assert len(mapped) == 2 and all(m.endswith("(deleted)") for m in mapped), mapped
        assert reduced == 3.0
    # and nothing of this job's appeared after it either (other jobs may be running beside the tests)
    port = results[0][3]
    assert {f for f in _shm_files() - before if f"_{port}_" in f} == set()


def test_stale_workspaces_are_reported_not_deleted(tmp_path, monkeypatch, caplog):
    from pipeline import parallel

    monkeypatch.setattr(parallel, "SHM_DIR", str(tmp_path))
    assert parallel.warn_stale_deepspeed_shm() == 0 and not caplog.records
    stale = tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29500_0"
    stale.write_bytes(b"\0" * 1000)
    (tmp_path / "unrelated").write_bytes(b"\0" * 10)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29501")  # this job's own: its peers are unlinking them
    (tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29501_1").write_bytes(b"\0" * 10)
    assert parallel.warn_stale_deepspeed_shm() == 1000
    message = caplog.records[-1].getMessage()
    assert "1 DeepSpeed CPU all-reduce workspaces" in message and f"rm {tmp_path}/deepspeed_allreduce_buffer_" in message
    assert stale.exists()  # they may belong to a running job: only reported


def test_deepspeed_op_builds_use_the_venvs_ninja_whatever_the_callers_path(monkeypatch):
    """Set-up built DeepSpeed's CPU op with one ninja and jobs started without the venv's bin on PATH
    with Debian's older one, which does not read the newer build log: the op was rebuilt (60-90 s) at
    the start of such jobs, and again by the next job from an activated shell."""
    import sys
    from pathlib import Path

    from pipeline.parallel import use_this_environments_ninja

    bindir = Path(sys.executable).parent
    if not (bindir / "ninja").is_file():
        pytest.skip(f"no ninja in {bindir} (set-up installs one)")
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/local/bin", "/usr/bin", str(bindir), "/bin"]))
    use_this_environments_ninja()
    assert os.environ["PATH"].split(os.pathsep) == [str(bindir), "/usr/local/bin", "/usr/bin", "/bin"]
    use_this_environments_ninja()  # already first: unchanged
    assert os.environ["PATH"].split(os.pathsep) == [str(bindir), "/usr/local/bin", "/usr/bin", "/bin"]
    import shutil

    assert Path(shutil.which("ninja")).parent == bindir  # what torch's JIT build runs
