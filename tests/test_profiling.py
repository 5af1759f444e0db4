"""logging.profile_steps: torch.profiler traces of chosen steps on chosen ranks, numerics unchanged."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError, load_config, validate
from tests.test_pretrain import REFERENCE_OVERRIDES, assert_ok, get_dataset, get_reference_run, launch, losses


@pytest.mark.parametrize("override, message", [
    ("logging.profile_steps=10to12", "logging.profile_steps='10to12': expected a step or a range of steps, e.g. 10 or 10-12"),
    ("logging.profile_steps=12-10", "logging.profile_steps='12-10': expected FIRST-LAST with 1 <= FIRST <= LAST"),
    ("logging.profile_steps=0", "logging.profile_steps='0': expected FIRST-LAST with 1 <= FIRST <= LAST"),
    ("logging.profile_steps=201-210", "logging.profile_steps='201-210': after the run's last step (schedule.train_steps=200)"),
    ("logging.profile_ranks=0,4", "logging.profile_ranks='0,4': rank 4 is not in this job (ranks 0..3); e.g. 0, 0,3 or all"),
    ("logging.profile_ranks=first", "logging.profile_ranks='first': expected global ranks separated by commas"),
    ("logging.profile_ranks=", "logging.profile_ranks='': no rank given"),
])
def test_bad_profile_settings_name_the_field_and_the_fix(override, message):
    config = load_config(None, ["logging.profile_steps=5", override])
    with pytest.raises(ConfigError) as info:
        validate(config, 4, paths=False)
    assert message in str(info.value)


def test_good_profile_settings_pass():
    for overrides in (["logging.profile_steps=200"], ["logging.profile_steps= 10 - 12", "logging.profile_ranks=all"],
                      ["logging.profile_steps=3", "logging.profile_ranks=0,3"], ["logging.profile_steps="]):
        validate(load_config(None, overrides), 4, paths=False)


def _events(trace_path):
    trace = json.loads(trace_path.read_text(encoding="utf-8"))
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def test_profiled_steps_are_traced_on_the_chosen_rank_only_and_train_the_same(tmp_path, tmp_path_factory):
    """Steps 2-4 on rank 1 of the shared reference run's settings (2 ranks, ZeRO-3, a loader worker):
    the job stops after step 3 (schedule.stop_after), inside the window: what was recorded is written
    (steps 2-3); the resumed job traces the rest (step 4). Losses equal the unprofiled reference's."""
    reference = losses(get_reference_run(tmp_path_factory))
    out = tmp_path / "run"
    common = [f"data.path={get_dataset(tmp_path_factory)}", f"output_dir={out}", *REFERENCE_OVERRIDES,
              "logging.profile_steps=2-4", "logging.profile_ranks=1"]
    code, output = launch([*common, "schedule.stop_after=3"], launcher="torchrun")
    assert_ok(code, output)
    code, output = launch([*common, "schedule.stop_after=1", "checkpointing.resume=auto"], launcher="torchrun")
    assert_ok(code, output)

    profile = out / "profile"
    assert sorted(p.name for p in profile.iterdir()) == [
        "rank1_steps2-3.pt.trace.json", "rank1_steps2-3.txt", "rank1_steps4-4.pt.trace.json", "rank1_steps4-4.txt"]
    for name, steps in (("rank1_steps2-3", {"step 2", "step 3"}), ("rank1_steps4-4", {"step 4"})):
        events = _events(profile / f"{name}.pt.trace.json")
        names = {e.get("name") for e in events}
        assert {n for n in names if isinstance(n, str) and n.startswith("step ")} == steps, name
        assert names & {"aten::mm", "aten::addmm", "aten::bmm"}, name  # the model's matrix products
        table = (profile / f"{name}.txt").read_text(encoding="utf-8")
        assert "Self CPU" in table and "aten::" in table, table[:2000]

    profiled = losses(out)
    assert sorted(profiled) == [1, 2, 3, 4]
    for step, loss in profiled.items():
        assert loss == pytest.approx(reference[step], rel=1e-6), (step, loss, reference[step])


def test_finished_check_accepts_ranks_of_the_whole_job(tmp_path, capsys):
    """`pretrain.py --finished` (the job scripts' check, one process, no world) validates the config
    without the job's world size: ranks traced on other nodes are not "not in this job"."""
    from pipeline import pretrain

    code = pretrain.main(["--finished", f"output_dir={tmp_path}", "logging.profile_steps=2", "logging.profile_ranks=0,8"])
    assert code == pretrain.STOPPED_EARLY
    assert "not finished: the newest complete checkpoint" in capsys.readouterr().out
