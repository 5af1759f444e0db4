"""Logs go to files as well as the console: the data_prep build log next to the dataset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_build_log_records_the_run_and_its_error(tmp_path):
    # A tiny real build, then a failing one into the same place: both land in OUTPUT.build.log.
    corpus = tmp_path / "zh.txt"
    corpus.write_text("".join(f"今天北京的天气很好，我们去公园散步{i}次。\n\n" for i in range(40)), encoding="utf-8")
    out = tmp_path / "ds"
    cmd = [sys.executable, "data_prep/build.py", "--lang", "zh", "--input", str(corpus), "--output", str(out),
           "--no-progress", "--fine-min-count", "1"]
    ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert ok.returncode == 0, ok.stderr[-3000:]
    # a rebuild (--overwrite) that fails on its input: its error is logged too, the dataset stays
    # (a run refused before it starts, e.g. without --overwrite, writes nothing: test_data_prep_bad_input)
    english = tmp_path / "en.txt"
    english.write_text("The weather in Beijing is fine today, so we walk in the park.\n" * 40, encoding="utf-8")
    again = subprocess.run(cmd[:cmd.index("--input") + 1] + [str(english)] + cmd[cmd.index("--input") + 2:]
                           + ["--overwrite"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 2
    log = (tmp_path / "ds.build.log").read_text(encoding="utf-8")
    first_error = again.stderr[again.stderr.index("error:"):].strip()
    assert "does not look like Chinese" in first_error and "--lang" in first_error  # names the fix
    assert log.count("error:") == 1 and first_error in log, (log[-2000:], first_error)
    assert f"wrote {out}" in log and "coarse/fine" in log  # the successful build's summary is logged too
    assert (out / "meta.json").is_file()  # the failed second run left the dataset alone


def test_two_builds_in_one_process_keep_their_own_logs(tmp_path, capsys):
    """build.main() left its log handler (and a filter on every console handler) on the root logger: a
    second build in the same process (a notebook) also wrote into the first build's log file."""
    import logging

    from data_prep import build

    corpus = tmp_path / "zh.txt"
    corpus.write_text("".join(f"今天北京的天气很好，我们去公园散步{i}次。\n\n" for i in range(40)), encoding="utf-8")
    root = logging.getLogger()
    before = (list(root.handlers), [list(h.filters) for h in root.handlers])
    for name in ("m1", "m2"):
        assert build.main(["--lang", "zh", "--input", str(corpus), "--output", str(tmp_path / name), "--no-progress",
                           "--fine-min-count", "1"]) == 0
        assert (list(root.handlers), [list(h.filters) for h in root.handlers]) == before
    first, second = ((tmp_path / f"{name}.build.log").read_text(encoding="utf-8") for name in ("m1", "m2"))
    assert str(tmp_path / "m1") in first and str(tmp_path / "m2") not in first
    assert str(tmp_path / "m2") in second and "wrote" in second


def test_a_config_error_every_rank_finds_is_printed_once_per_node(tmp_path):
    """`parallelism.tensor_parallel=3` on 2 ranks: every rank finds it before any process group; it
    printed an `error:` line (and a log line) per rank. Now the node's local rank 0 prints it, and the
    job still exits 2."""
    from tests.test_pretrain import launch

    for launcher in ("torchrun", "deepspeed"):
        code, output = launch([f"output_dir={tmp_path / launcher}", "parallelism.tensor_parallel=3"], nproc=2,
                              launcher=launcher, timeout=120)
        assert code != 0, output[-3000:]
        line = "error: parallelism.tensor_parallel=3 does not divide the world size 2"
        assert output.count(line) == 1, (launcher, output[-3000:])


def test_a_warning_of_the_checks_before_the_log_exists_is_in_the_log(tmp_path, monkeypatch, capsys):
    """The checks before the build log is opened (next to the dataset) warned on the console only:
    "data_prep/_native.c is not compiled" was missing from the build log."""
    from data_prep import build, chinese, languages

    monkeypatch.delenv("AMBERT_PURE_PYTHON", raising=False)
    monkeypatch.setattr(languages, "_native", None)
    monkeypatch.setattr(chinese, "_NOT_COMPILED_WARNED", [])
    corpus = tmp_path / "zh.txt"
    corpus.write_text("".join(f"今天北京的天气很好，我们去公园散步{i}次。\n\n" for i in range(40)), encoding="utf-8")
    assert build.main(["--lang", "zh", "--input", str(corpus), "--output", str(tmp_path / "ds"), "--no-progress",
                       "--fine-min-count", "1"]) == 0
    log = (tmp_path / "ds.build.log").read_text(encoding="utf-8")
    assert log.count("data_prep/_native.c is not compiled") == 1, log[:2000]
    assert capsys.readouterr().err.count("data_prep/_native.c is not compiled") <= 1
