"""The multi-process test helper itself: results in rank order, failures and hangs reported."""

import pytest

from tests.distributed import DistributedTestError, run_distributed


def _all_reduce(scale):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return (dist.get_rank(), t.item() * scale)


def _rank1_raises():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise RuntimeError("boom on rank one")
    dist.barrier()  # rank 0 blocks here: the helper must not wait for the full timeout


def _hang():
    import time

    time.sleep(60)


def test_results_in_rank_order():
    assert run_distributed(_all_reduce, world_size=2, args=(2.0,), timeout=120) == [(0, 6.0), (1, 6.0)]


def test_failure_names_rank_and_traceback():
    with pytest.raises(DistributedTestError) as err:
        run_distributed(_rank1_raises, world_size=2, timeout=120)
    assert "rank 1" in str(err.value) and "boom on rank one" in str(err.value)


def test_hang_is_killed():
    with pytest.raises(DistributedTestError, match=r"did not finish within 2s"):
        run_distributed(_hang, world_size=2, timeout=2, init=None)
