"""Damaged or mistyped models given to finetune / inference / export_hf, an --output under a file, and a
training file in another language than the model's: each is one clear error line (or, for the
language, a warning), never a traceback.

One real tiny pre-training run (one process, 4 steps, complete checkpoints at steps 2 and 4) and its
export (``pipeline.convert export``) are shared by the module; each test damages its own copy."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_finetune import make_sentiment_files, make_tiny_en_dataset, make_tiny_zh_dataset
from tests.test_pretrain import ROOT, run_env, train_one_process

OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory) -> Path:
    """checkpoints/step_00000002 and step_00000004 of a 4-step tiny run (torchrun, 1 process: ~6 s)."""
    from tests.test_data_loader import write_synthetic_dataset

    root = tmp_path_factory.mktemp("damaged")
    dataset = write_synthetic_dataset(root / "dataset", num_docs=60)
    checkpoints = train_one_process(dataset, root / "run", steps=4, save_every=2)
    assert (checkpoints / "step_00000002" / "COMPLETE").is_file() and (checkpoints / "step_00000004" / "COMPLETE").is_file()
    return checkpoints


@pytest.fixture(scope="module")
def exported(pretrained_run, tmp_path_factory) -> Path:
    from pipeline.convert import export

    return export(pretrained_run / "step_00000004", tmp_path_factory.mktemp("export") / "model")


@pytest.fixture(scope="module")
def zh_dataset(tmp_path_factory) -> Path:
    return make_tiny_zh_dataset(tmp_path_factory.mktemp("zh") / "dataset")


def _cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damaged_checkpoints(pretrained_run: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the run's checkpoints folder whose step_00000004/``name`` is cut to half its size."""
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(pretrained_run, checkpoints)
    _cut_in_half(checkpoints / "step_00000004" / name)
    return checkpoints


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**run_env(), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


# ---------------------------------------------------------------------------------------------
# 1. Damaged weights
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [OPTIM, MODEL_STATES])
def test_truncated_checkpoint_file_names_the_checkpoint_the_file_and_the_older_one(pretrained_run, tmp_path, name):
    from pipeline.finetuning import FinetuneError, resolve_pretrained

    checkpoints = _damaged_checkpoints(pretrained_run, tmp_path, name)
    step = checkpoints / "step_00000004"
    with pytest.raises(FinetuneError) as caught:
        resolve_pretrained(str(step))
    message = str(caught.value)
    assert message.startswith(f"checkpoint {step} cannot be read (")
    assert "one of its files is missing or damaged" in message and f"cut short or corrupt: {name}" in message
    assert message.endswith(f"use the newest older complete checkpoint: pass --model {checkpoints / 'step_00000002'}")
    # Positional MODEL (inference, export_hf) is named as such.
    with pytest.raises(FinetuneError, match=f"pass {checkpoints / 'step_00000002'} as MODEL$"):
        resolve_pretrained(str(step), flag="MODEL")


def test_damaged_checkpoint_without_an_older_one_says_so(pretrained_run, tmp_path):
    from pipeline.finetuning import FinetuneError, _checkpoint_state_dict

    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(pretrained_run / "step_00000002", checkpoints / "step_00000002")
    (checkpoints / "step_00000002" / OPTIM).unlink()  # a file deleted after the save was committed
    with pytest.raises(FinetuneError, match=f"checkpoint {checkpoints / 'step_00000002'} cannot be read "
                                            r"\(FileNotFoundError: .*\): one of its files is missing or damaged\. "
                                            f"No older complete checkpoint is left in {checkpoints}"):
        _checkpoint_state_dict(checkpoints / "step_00000002")


def test_truncated_checkpoint_is_one_error_line_in_finetune_inference_and_export_hf(pretrained_run, tmp_path, capsys):
    from pipeline.export_hf import main as export_hf
    from pipeline.inference import main as inference

    checkpoints = _damaged_checkpoints(pretrained_run, tmp_path, OPTIM)
    step = checkpoints / "step_00000004"
    files = make_sentiment_files(tmp_path, sizes=(8, 4, 4))
    line = _one_error_line(_cli("pipeline.finetune", "--model", str(step), "--train", str(files["train"]),
                                "--dev", str(files["dev"]), "--output", str(tmp_path / "ft")))
    assert line.startswith(f"error: checkpoint {step} cannot be read (RuntimeError: PytorchStreamReader failed")
    assert f"cut short or corrupt: {OPTIM}" in line and f"pass --model {checkpoints / 'step_00000002'}" in line

    capsys.readouterr()
    assert inference([str(step), "今天"]) == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint {step} cannot be read" in err and "missing or damaged" in err
    assert f"pass {checkpoints / 'step_00000002'} as MODEL" in err
    assert export_hf([str(step), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint {step} cannot be read" in err and f"pass {checkpoints / 'step_00000002'} as MODEL" in err
    assert not (tmp_path / "hf").exists()


def test_truncated_export_weights_name_the_file_and_export_again(exported, tmp_path, capsys):
    from pipeline.finetuning import FinetuneError, resolve_pretrained
    from pipeline.inference import main as inference

    export = Path(shutil.copytree(exported, tmp_path / "export"))
    _cut_in_half(export / "model.safetensors")
    with pytest.raises(FinetuneError) as caught:
        resolve_pretrained(str(export))
    message = str(caught.value)
    assert message.startswith(f"{export / 'model.safetensors'} cannot be read (SafetensorError: ")
    assert "damaged or incomplete" in message and "export again" in message
    assert inference([str(export), "今天"]) == 2
    err = capsys.readouterr().err
    assert f"error: {export / 'model.safetensors'} cannot be read" in err and "export again" in err


def test_invalid_export_config_names_the_file(exported, tmp_path, capsys):
    from pipeline.finetuning import FinetuneError, resolve_pretrained

    export = Path(shutil.copytree(exported, tmp_path / "export"))
    config = export / "config.json"
    config.write_text('{"variant": "ambert" "hidden_size": 64}', encoding="utf-8")
    with pytest.raises(FinetuneError, match=f"^{config} is not valid JSON \\(Expecting ',' delimiter: .*export again"):
        resolve_pretrained(str(export))
    line = _one_error_line(_cli("pipeline.inference", str(export), "今天"))
    assert line.startswith(f"error: {config} is not valid JSON (Expecting ',' delimiter") and "export again" in line
    config.write_text(json.dumps([1, 2]), encoding="utf-8")  # valid JSON, not a config
    with pytest.raises(FinetuneError, match=f"^{config} holds a JSON list"):
        resolve_pretrained(str(export))
    config.write_text(json.dumps({"variant": "ambert_combo"}), encoding="utf-8")  # edited by hand
    with pytest.raises(FinetuneError, match=f"^{config} is not a valid model config .*unknown variant 'ambert_combo'"):
        resolve_pretrained(str(export))


def test_damaged_tokenizer_files_of_an_export_are_one_error_line_and_nothing_is_written(exported, tmp_path, capsys):
    """A damaged meta.json in an export: fine-tuning ended in a JSONDecodeError traceback, export_hf
    printed the JSON error without the file and left OUT.partial (weights, no tokenizer) behind. An
    edited vocabulary is named too."""
    from pipeline import export_hf, finetune

    files = make_sentiment_files(tmp_path, sizes=(8, 4, 4))
    export = Path(shutil.copytree(exported, tmp_path / "export"))
    meta = export / "meta.json"
    meta.write_text('{"language": "zh",\n}', encoding="utf-8")
    hf = tmp_path / "hf"
    assert export_hf.main([str(export), str(hf)]) == 2
    err = capsys.readouterr().err
    assert f"error: {meta} cannot be read (" in err and "copy the dataset's meta.json there again" in err, err
    assert not hf.exists() and not Path(f"{hf}.partial").exists()
    run = ["--model", str(export), "--train", str(files["train"]), "--dev", str(files["dev"]), "--epochs", "1"]
    assert finetune.main([*run, "--output", str(tmp_path / "ft")]) == 2
    err = capsys.readouterr().err
    assert f"error: {meta} cannot be read (" in err and "restore it" in err and "Traceback" not in err, err

    shutil.copy(exported / "meta.json", meta)
    vocab = export / "fine_vocab.txt"
    lines = vocab.read_text(encoding="utf-8").splitlines()
    vocab.write_text("\n".join([*lines[:-1], lines[-1] + "x"]) + "\n", encoding="utf-8")  # same size, one token edited
    assert finetune.main([*run, "--output", str(tmp_path / "ft2")]) == 2
    err = capsys.readouterr().err
    assert f"error: the tokenizer files in {export} are not those of the dataset the model was trained on" in err, err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# 2. random:RECIPE[:VARIANT] typos, before any process group
# ---------------------------------------------------------------------------------------------
def test_random_recipe_or_variant_typo_is_refused_before_any_process_group(zh_dataset, tmp_path, monkeypatch):
    from pipeline import finetuning
    from pipeline.finetuning import FinetuneConfig, FinetuneError, run

    def no_process_group(seed):
        raise AssertionError("a process group was set up before the --model check")

    monkeypatch.setattr(finetuning, "setup_deepspeed", no_process_group)
    files = make_sentiment_files(tmp_path, sizes=(8, 4, 4))
    common = dict(dataset=str(zh_dataset), train=str(files["train"]), dev=str(files["dev"]), output=str(tmp_path / "o"),
                  seeds=[1], deepspeed=True, batch_size=4)
    with pytest.raises(FinetuneError, match=r"^--model random:tny: unknown model recipe 'tny'; known recipes: .*tiny"):
        run(FinetuneConfig(model="random:tny", **common))
    with pytest.raises(FinetuneError, match=r"^--model random:tiny:ambert_combo: unknown variant 'ambert_combo'; "
                                            r"known variants: .*ambert-combo"):
        run(FinetuneConfig(model="random:tiny:ambert_combo", **common))
    assert finetuning.resolve_pretrained("random:tiny:ambert-combo", str(zh_dataset)).model_config.variant == "ambert-combo"


# ---------------------------------------------------------------------------------------------
# 3. --output under a regular file
# ---------------------------------------------------------------------------------------------
def test_output_under_a_file_or_an_unwritable_directory_is_refused_by_validate(tmp_path, monkeypatch):
    from pipeline import finetuning
    from pipeline.finetuning import FinetuneConfig, FinetuneError

    files = make_sentiment_files(tmp_path, sizes=(8, 4, 4))
    (tmp_path / "afile").write_text("x")

    def config(output):
        return FinetuneConfig(model="random:tiny", train=str(files["train"]), dev=str(files["dev"]), output=str(output))

    with pytest.raises(FinetuneError, match=f"^--output: {tmp_path / 'afile' / 'ft' / 'deeper'} cannot be created: "
                                            f"{tmp_path / 'afile'} is a file, not a directory"):
        config(tmp_path / "afile" / "ft" / "deeper").validate()
    config(tmp_path / "new" / "ft").validate()  # missing folders are created later: fine
    real_access = os.access
    monkeypatch.setattr(finetuning.os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
    with pytest.raises(FinetuneError, match=f"^--output: {tmp_path / 'new' / 'ft'} cannot be created: {tmp_path} is not "
                                            f"writable"):
        config(tmp_path / "new" / "ft").validate()


# ---------------------------------------------------------------------------------------------
# 4. A training file in another language than the model's
# ---------------------------------------------------------------------------------------------
def _english_reviews(path: Path, n: int = 40) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            good = i % 2 == 0
            text = "this phone is great and I like it" if good else "the service was slow and the price too high"
            f.write(json.dumps({"text": f"{text} ({i})", "label": "pos" if good else "neg"}) + "\n")
    return path


def test_training_file_in_another_language_is_a_warning_not_an_error(zh_dataset, tmp_path, caplog):
    from data_prep.encode import TextEncoder
    from pipeline.finetuning import FinetuneConfig, encode_split

    caplog.set_level(logging.WARNING, logger="finetune")
    zh = TextEncoder(zh_dataset)
    english = _english_reviews(tmp_path / "en.jsonl")
    config = FinetuneConfig(model="random:tiny", dataset=str(zh_dataset), train=str(english), dev=str(english))
    examples, labels = encode_split(config, zh, str(english), None, 32, 32)  # encoded all the same
    assert len(examples) == 40 and labels.names == ["neg", "pos"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"WARNING: {english} does not look like Chinese, the language of model random:tiny ")
    assert "language='zh'" in warnings[0] and str(zh_dataset) in warnings[0]
    assert "0% of the letters in its first 40 texts are Chinese characters" in warnings[0]

    caplog.clear()  # Chinese text with the Chinese model (dev/test are not checked again): silent
    files = make_sentiment_files(tmp_path, sizes=(40, 4, 4))
    encode_split(config, zh, str(files["train"]), None, 32, 32)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    from pipeline.finetuning import warn_if_other_language

    en = TextEncoder(make_tiny_en_dataset(tmp_path / "en-dataset"))  # and the other way round
    texts = [json.loads(line)["text"] for line in files["train"].read_text(encoding="utf-8").splitlines()]
    message = warn_if_other_language(en, texts, "zh.jsonl", "exported/en")
    assert message.startswith("WARNING: zh.jsonl does not look like English, the language of model exported/en ")
    assert "100% of the letters in its first 40 texts are Chinese characters" in message

    def broken(text, source):
        raise RuntimeError("plugin bug")

    zh.plugin.check_sample = broken  # a failing check never stops a run
    assert warn_if_other_language(zh, ["some English text"] * 50, "x.jsonl") is None
