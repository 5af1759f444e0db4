"""Wrong paths given to the tools that read a trained model (convert, export_hf, finetune): each is
named for what it is, before any work, and no existing output is overwritten or left half-written."""

from __future__ import annotations

import json
import os

import pytest

from tests.test_export import _model
from tests.test_finetune import make_sentiment_files, make_tiny_zh_dataset


@pytest.fixture(scope="module")
def zh_dataset(tmp_path_factory):
    return make_tiny_zh_dataset(tmp_path_factory.mktemp("zh") / "dataset")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, zh_dataset):
    from pipeline.inference import save_exported

    return save_exported(_model(zh_dataset), zh_dataset, tmp_path_factory.mktemp("model") / "export")


def _checkpoints(root):
    """A checkpoints folder: a complete save (marker only: enough for the path checks) and an interrupted one."""
    complete = root / "checkpoints" / "step_00000010"
    complete.mkdir(parents=True)
    (complete / "COMPLETE").write_text(json.dumps({"step": 10}), encoding="utf-8")
    (root / "checkpoints" / "step_00000020").mkdir()
    return root / "checkpoints"


def test_each_kind_of_wrong_checkpoint_path_is_named(tmp_path, zh_dataset, export_dir):
    from pipeline.checkpoint import why_not_a_checkpoint

    checkpoints = _checkpoints(tmp_path)
    (tmp_path / "file.pt").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    cases = {
        tmp_path / "missing": "does not exist",
        tmp_path / "file.pt": "is a file",
        checkpoints: f"is a checkpoints folder: pass one of its step_NNNNNNNN directories (the newest complete one is {checkpoints / 'step_00000010'})",
        checkpoints / "step_00000020": f"has no COMPLETE marker: that save was interrupted (a job stopped while saving); use a complete one (the newest complete one is {checkpoints / 'step_00000010'})",
        export_dir: "is an exported model",
        zh_dataset: "is a pre-training dataset",
        tmp_path / "empty": "is not a training checkpoint",
    }
    for path, expected in cases.items():
        assert expected in why_not_a_checkpoint(path), path


def test_convert_names_a_wrong_source_and_refuses_a_file_or_foreign_folder_as_output(tmp_path, capsys, zh_dataset, export_dir):
    from pipeline.convert import main

    checkpoints = _checkpoints(tmp_path)
    assert main(["export", str(export_dir), str(tmp_path / "out")]) == 2
    assert "is an exported model" in capsys.readouterr().err
    assert main(["universal", str(zh_dataset), str(tmp_path / "out")]) == 2
    assert "is a pre-training dataset" in capsys.readouterr().err
    assert main(["export", str(checkpoints), str(tmp_path / "out")]) == 2
    assert "is a checkpoints folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    # the output is checked before the (expensive) conversion, and left untouched
    target_file = tmp_path / "notes.txt"
    target_file.write_text("mine", encoding="utf-8")
    assert main(["export", str(checkpoints / "step_00000010"), str(target_file)]) == 2
    assert f"output {target_file} is a file" in capsys.readouterr().err
    assert target_file.read_text(encoding="utf-8") == "mine"
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine", encoding="utf-8")
    assert main(["export", str(checkpoints / "step_00000010"), str(foreign)]) == 2
    assert "non-empty folder that does not hold an export" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    assert main(["universal", str(checkpoints / "step_00000010"), str(target_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    # the --help example used to put the conversion in runs/y/checkpoints/step_N/step_N, where
    # --resume auto never looked: the run silently started again from step 0
    assert main(["universal", str(checkpoints / "step_00000010"), str(tmp_path / "y" / "step_00000010")]) == 2
    assert "is named like a checkpoint (step_NNNNNNNN): give the checkpoints folder" in capsys.readouterr().err
    other_run = _checkpoints(tmp_path / "other")  # a folder with another run's complete checkpoint
    assert main(["universal", str(checkpoints / "step_00000010"), str(other_run)]) == 2
    assert "already holds the checkpoint step_00000010 of another run" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not list(other_run.glob("*.partial"))
    (checkpoints / "step_00000010" / "COMPLETE").write_text("{trunc", encoding="utf-8")
    assert main(["export", str(checkpoints / "step_00000010"), str(tmp_path / "out")]) == 2
    assert "COMPLETE is not valid JSON" in capsys.readouterr().err


def test_export_hf_names_a_wrong_model_and_replaces_only_its_own_output(tmp_path, capsys, zh_dataset, export_dir):
    from pipeline.export_hf import main

    out = tmp_path / "hf"
    assert main([str(zh_dataset), str(out)]) == 2
    err = capsys.readouterr().err
    assert "MODEL: " in err and "is a pre-training dataset" in err
    assert "--model" not in err and "random:" not in err  # export_hf takes neither
    assert main(["random:tiny", str(out), "--dataset", str(zh_dataset)]) == 2
    assert "random:tiny does not exist" in capsys.readouterr().err
    target_file = tmp_path / "notes.txt"
    target_file.write_text("mine", encoding="utf-8")
    assert main([str(export_dir), str(target_file)]) == 2
    assert f"output {target_file} is a file" in capsys.readouterr().err
    assert target_file.read_text(encoding="utf-8") == "mine"
    assert not out.exists()

    assert main([str(export_dir), str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    # both kinds of export are readable by the others on a cluster, like every other file written
    # (safetensors writes its files 0600)
    mask = os.umask(0)
    os.umask(mask)
    for weights in (out / "model.safetensors", export_dir / "model.safetensors"):
        assert weights.stat().st_mode & 0o777 == 0o666 & ~mask, (weights, oct(weights.stat().st_mode))
    assert main([str(export_dir), str(out)]) == 0  # a previous HF export is replaced in one step
    assert (out / "model.safetensors").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "notes.txt"]  # no .partial / .old left

    # each kind replaces only its own: an HF export also holds config.json + model.safetensors, which
    # once let `pipeline.convert export` replace it
    from pipeline.convert import main as convert_main

    checkpoints = _checkpoints(tmp_path / "run")
    assert convert_main(["export", str(checkpoints / "step_00000010"), str(out)]) == 2
    assert f"output {out} holds a Hugging Face model, not an export" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == first and (out / "vocab.txt").is_file()
    before = sorted(p.name for p in export_dir.iterdir())
    assert main([str(export_dir), str(export_dir)]) == 2
    assert f"output {export_dir} holds an export, not a Hugging Face model" in capsys.readouterr().err
    assert sorted(p.name for p in export_dir.iterdir()) == before
    # a dataset (it has the vocabularies an export has) is named as one, by either kind of export
    dataset_files = sorted(p.name for p in zh_dataset.iterdir())
    assert main([str(export_dir), str(zh_dataset)]) == 2
    assert f"output {zh_dataset} is a pre-training dataset (data_prep/build.py), not a Hugging Face model" in capsys.readouterr().err
    assert convert_main(["export", str(checkpoints / "step_00000010"), str(zh_dataset)]) == 2
    assert f"output {zh_dataset} is a pre-training dataset (data_prep/build.py), not an export" in capsys.readouterr().err
    assert sorted(p.name for p in zh_dataset.iterdir()) == dataset_files


def test_finetune_names_a_dataset_folder_that_is_not_one(tmp_path, capsys, zh_dataset, export_dir):
    from pipeline.finetune import main

    files = make_sentiment_files(tmp_path, sizes=(8, 4, 4))
    not_a_dataset = tmp_path / "notes"
    not_a_dataset.mkdir()
    (not_a_dataset / "a.txt").write_text("x", encoding="utf-8")
    common = ["--train", str(files["train"]), "--dev", str(files["dev"]), "--output", str(tmp_path / "out")]
    for model in (str(export_dir), "random:tiny"):
        assert main(["--model", model, "--dataset", str(not_a_dataset), *common]) == 2
        err = capsys.readouterr().err
        assert f"--dataset {not_a_dataset} is not a pre-training dataset: it has no meta.json" in err, err
    assert main(["--model", str(tmp_path / "nope"), *common]) == 2
    err = capsys.readouterr().err
    assert "--model: " in err and "does not exist" in err and "random:RECIPE" in err


def test_positional_model_arguments_are_named_as_such(tmp_path, capsys):
    """export_hf and inference take MODEL as a positional argument: their messages used to tell the
    user to 'pass --model OUT', a flag neither has."""
    from pipeline.finetuning import FinetuneError, _checkpoint_state_dict
    from pipeline.inference import main

    step = tmp_path / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    for rank in (0, 1):
        (step / f"mp_rank_0{rank}_model_states.pt").write_bytes(b"")
    with pytest.raises(FinetuneError, match="and pass OUT as MODEL$"):
        _checkpoint_state_dict(step, "MODEL")
    with pytest.raises(FinetuneError, match="and pass --model OUT$"):
        _checkpoint_state_dict(step, "--model")
    assert main([str(tmp_path / "nope"), "text"]) == 2
    err = capsys.readouterr().err
    assert f"MODEL: {tmp_path / 'nope'} does not exist" in err and "--model" not in err
