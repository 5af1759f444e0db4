"""The learning-rate schedules (pipeline/optim.py) against values worked out by hand: BERT's linear
warm-up and decay, ModernBERT's warm-up / stable / decay (WSD). f(s) is the multiplier of the peak
learning rate after s optimizer steps (step s + 1 trains at it)."""

import pytest
import torch

from pipeline.optim import LearningRateSchedule, ScheduleLR


def test_linear_warms_up_then_decays_to_the_floor():
    f = LearningRateSchedule("linear", train_steps=10, warmup_steps=2, decay_fraction=0.2, min_lr_ratio=0.1)
    # warm-up 1/2, 2/2; then from 1.0 at s=2 down to 0.1 at s=10 over 8 steps; held after the end
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.1 + 0.9 * 6 / 8, 6: 0.55, 9: 0.1 + 0.9 / 8, 10: 0.1, 12: 0.1}
    for step, value in expected.items():
        assert f(step) == pytest.approx(value, abs=1e-12), (step, f(step))


def test_wsd_holds_the_peak_until_the_last_decay_fraction():
    f = LearningRateSchedule("wsd", train_steps=10, warmup_steps=2, decay_fraction=0.2, min_lr_ratio=0.0)
    # warm-up 2 steps, stable at 1.0 until s=8, then 2 decay steps (20% of 10) to 0
    expected = {0: 0.5, 1: 1.0, 5: 1.0, 7: 1.0, 8: 1.0, 9: 0.5, 10: 0.0, 11: 0.0}
    for step, value in expected.items():
        assert f(step) == pytest.approx(value, abs=1e-12), (step, f(step))
    # a decay share that is not a whole number of steps rounds up (3 steps of 11 at 0.2: 2.2 -> 3)
    g = LearningRateSchedule("wsd", train_steps=11, warmup_steps=1, decay_fraction=0.2, min_lr_ratio=0.25)
    assert [round(g(s), 12) for s in (7, 8, 9, 10, 11)] == [1.0, 1.0, 0.75, 0.5, 0.25]
    # a warm-up longer than the stable phase: the decay starts when the warm-up ends
    h = LearningRateSchedule("wsd", train_steps=10, warmup_steps=9, decay_fraction=0.2, min_lr_ratio=0.0)
    assert [h(s) for s in (8, 9, 10)] == [1.0, 1.0, 0.5]


def test_the_optimizer_steps_at_the_schedule():
    """Through LambdaLR: the learning rate the optimizer uses at its k-th step is peak x f(k - 1)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=3e-3)
    scheduler = ScheduleLR(optimizer, LearningRateSchedule("linear", 8, 2, 0.2, 0.0))
    used = []
    for _ in range(8):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used == pytest.approx([3e-3 * v for v in (0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6)], rel=1e-12)
