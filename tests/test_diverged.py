"""A diverged run (NaN / inf loss or gradient norm) stops at once, saves nothing, names the checkpoint to resume."""

from __future__ import annotations

import math

import pytest

from tests.test_pretrain import REFERENCE_OVERRIDES, assert_ok, get_dataset, get_reference_run, launch, losses
from tests.test_profiling import assert_traced


def test_check_finite_names_the_values_and_the_newest_checkpoint(tmp_path):
    from pipeline.pretrain import TrainingDiverged, check_finite

    check_finite(3, {"loss": 7.5, "fine_loss": 3.5, "coarse_loss": 4.0, "fine_accuracy": 0.1}, 1.25, tmp_path)
    check_finite(3, {"loss": 7.5}, None, tmp_path)  # no gradient norm (no clipping): the loss alone
    with pytest.raises(TrainingDiverged) as info:
        check_finite(3, {"loss": 7.5, "fine_loss": 3.5, "coarse_loss": 4.0}, math.inf, tmp_path)
    assert str(info.value).startswith("step 3: training diverged (loss 7.5, fine_loss 3.5, coarse_loss 4, gradient norm inf)")
    assert f"There is no complete checkpoint in {tmp_path} yet: lower optimizer.lr" in str(info.value)
    assert str(info.value).endswith("then start again (optimizer.stop_on_nonfinite=false trains on regardless)")
    with pytest.raises(TrainingDiverged, match=r"\(loss 7.5, non-finite weights\)"):  # ZeRO-0 in fp32: no norm kept
        check_finite(3, {"loss": 7.5}, None, tmp_path, weights_finite=False)
    with pytest.raises(TrainingDiverged, match=r"\(loss nan, fine_loss nan, coarse_loss 4\)"):
        check_finite(3, {"loss": math.nan, "fine_loss": math.nan, "coarse_loss": 4.0}, None, tmp_path)


def test_a_nan_step_stops_every_rank_saves_nothing_and_the_resumed_run_follows_the_reference(tmp_path, tmp_path_factory):
    """The reference run's settings (2 ranks, ZeRO-3, a loader worker), checkpoints every 2 steps, steps
    4-6 profiled on rank 1; step 5's loss is multiplied by NaN before backward (gradients, weights, loss:
    NaN). The job stops at step 5 with exit code 1 and one error line, keeps steps 2 and 4, logs no step
    5, and writes the trace it was recording (steps 4-5). Resumed from step 4 without the fault, it
    traces the rest of the window (steps 5-6), and its steps 5 and 6 equal the uninterrupted reference
    run's (the profiler changes nothing either)."""
    reference = losses(get_reference_run(tmp_path_factory))
    out = tmp_path / "run"
    common = [f"data.path={get_dataset(tmp_path_factory)}", f"output_dir={out}", *REFERENCE_OVERRIDES,
              "checkpointing.save_every=2", "logging.profile_steps=4-6", "logging.profile_ranks=1"]
    code, output = launch(common, env={"AMBERT_FAULT": "nan_loss_at=5"}, launcher="torchrun")
    assert code == 1, output[-4000:]
    newest = out / "checkpoints" / "step_00000004"
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: step 5: training diverged (loss nan"), output[-4000:]
    assert f"The newest complete checkpoint is {newest} (step 4): lower optimizer.lr" in errors[0]
    assert "--resume auto" in errors[0]
    assert "error: step 5: training diverged" in (out / "logs" / "rank1.log").read_text(encoding="utf-8")
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    assert sorted(losses(out)) == [1, 2, 3, 4]

    code, output = launch([*common, "checkpointing.resume=auto", "schedule.stop_after=2"], launcher="torchrun")
    assert_ok(code, output)
    resumed = losses(out)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-6), (step, loss, reference[step])
    assert_traced(out / "profile", {"rank1_steps4-5": {"step 4", "step 5"}, "rank1_steps5-6": {"step 5", "step 6"}})


def test_weights_check_finds_a_non_finite_weight():
    import torch

    from pipeline.pretrain import weights_are_finite

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    assert weights_are_finite(model)
    with torch.no_grad():
        model[1].bias[2] = float("inf")
    assert not weights_are_finite(model)
    with torch.no_grad():
        model[1].bias[2] = float("nan")
    assert not weights_are_finite(model)


def test_bookkeeping_collectives_use_the_gpu_under_nccl(monkeypatch):
    """NCCL takes no CPU tensors ("No backend type associated with device type cpu"): the loop's metrics,
    preemption-flag and valid-sum collectives build their tensors on parallel.collective_device()."""
    import torch
    import torch.distributed as dist

    from pipeline import parallel

    assert parallel.collective_device() == torch.device("cpu")  # no process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert parallel.collective_device() == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert parallel.collective_device() == torch.device("cuda", 3)
