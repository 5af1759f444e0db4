"""logging.profile_steps: torch.profiler traces of chosen steps on chosen ranks, numerics unchanged."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError, load_config, validate


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


def test_good_profile_settings_pass_and_parse():
    from pipeline.config import parse_profile_ranks, parse_profile_steps

    for overrides, steps, ranks in ((["logging.profile_steps=200"], (200, 200), {0}),
                                    (["logging.profile_steps= 10 - 12", "logging.profile_ranks=all"], (10, 12), {0, 1, 2, 3}),
                                    (["logging.profile_steps=3", "logging.profile_ranks= 0, 3"], (3, 3), {0, 3}),
                                    (["logging.profile_steps="], None, {0})):
        config = load_config(None, overrides)
        validate(config, 4, paths=False)
        assert parse_profile_steps(config.logging.profile_steps) == steps, overrides
        assert parse_profile_ranks(config.logging.profile_ranks, 4) == ranks, overrides


def assert_traced(profile, expected: dict[str, set[str]]) -> None:
    """``profile`` holds exactly the traces ``expected`` names ({file stem: the "step N" ranges in it}), each
    with the model's matrix products and an operator table."""
    assert sorted(p.name for p in profile.iterdir()) == sorted(
        f"{stem}{suffix}" for stem in expected for suffix in (".pt.trace.json", ".txt"))
    for stem, steps in expected.items():
        trace = json.loads((profile / f"{stem}.pt.trace.json").read_text(encoding="utf-8"))
        names = {e.get("name") for e in (trace["traceEvents"] if isinstance(trace, dict) else trace)}
        assert {n for n in names if isinstance(n, str) and n.startswith("step ")} == steps, stem
        assert names & {"aten::mm", "aten::addmm", "aten::bmm"}, stem
        table = (profile / f"{stem}.txt").read_text(encoding="utf-8")
        assert "Self CPU" in table and "aten::" in table, table[:2000]


# The end-to-end test (a 2-rank ZeRO-3 run traced on rank 1 through an error and a resume, losses equal to
# the unprofiled run's) is tests/test_diverged.py's: one pair of launches for both.


def test_finished_check_accepts_ranks_of_the_whole_job(tmp_path, capsys):
    """`pretrain.py --finished` (the job scripts' check, one process, no world) validates the config
    without the job's world size: ranks traced on other nodes are not "not in this job"."""
    from pipeline import pretrain

    code = pretrain.main(["--finished", f"output_dir={tmp_path}", "logging.profile_steps=2", "logging.profile_ranks=0,8"])
    assert code == pretrain.STOPPED_EARLY
    assert "not finished: the newest complete checkpoint" in capsys.readouterr().out
