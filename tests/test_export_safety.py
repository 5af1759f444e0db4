"""Exports replace an earlier export of their kind, and nothing else: `convert export` and `export_hf` once
renamed any OUT holding config.json + model.safetensors (or config.json + vocab.txt) aside and deleted it
whole, with the fine-tuning results, notes or the training run (its checkpoints included) in it, and
deleted a user's own OUT.old / OUT.partial / OUT.universal-tmp folders on the way."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.test_export import _model, universal_checkpoint
from tests.test_finetune import make_tiny_zh_dataset


@pytest.fixture(scope="module")
def zh_dataset(tmp_path_factory):
    return make_tiny_zh_dataset(tmp_path_factory.mktemp("zh") / "dataset")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, zh_dataset):
    """Two complete (universal) checkpoints of one run, exported in a moment."""
    root = tmp_path_factory.mktemp("run")
    return universal_checkpoint(root, zh_dataset, 2), universal_checkpoint(root, zh_dataset, 4)


@pytest.fixture(scope="module")
def tiny_model(zh_dataset):
    return _model(zh_dataset)


def _tree(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else b"") for p in sorted(path.rglob("*"))}


def _step(export) -> int:
    return json.loads((export / "training.json").read_text(encoding="utf-8"))["step"]


def test_an_export_with_files_the_export_does_not_write_is_refused_and_kept(tmp_path, capsys, checkpoints):
    from pipeline.convert import main

    first, second = checkpoints
    out = tmp_path / "export1"
    assert main(["export", str(first), str(out)]) == 0
    # what `finetune --model export1 --output export1 --save-models` adds, and a user's notes
    (out / "models" / "seed1").mkdir(parents=True)
    (out / "models" / "seed1" / "heads.safetensors").write_bytes(b"heads")
    (out / "results.json").write_text("{}", encoding="utf-8")
    (out / "finetune.log").write_text("log", encoding="utf-8")
    (out / "my_notes.txt").write_text("mine", encoding="utf-8")
    before = _tree(out)
    assert main(["export", str(second), str(out)]) == 2
    err = capsys.readouterr().err
    assert (f"output {out} holds an export but also finetune.log, models/, my_notes.txt, results.json, which an "
            f"export does not write: replacing the folder would delete them. Give a new or empty directory, or "
            f"move them out of {out} first") in err, err
    assert _tree(out) == before and _step(out) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export1"]  # nothing written next to it either


def test_an_output_that_contains_the_source_checkpoint_is_refused(tmp_path, capsys, zh_dataset):
    """`output_dir=X checkpointing.init_from=X` (X an export), then `convert export X/checkpoints/step_N X`:
    the whole run, the checkpoint exported from included, was deleted."""
    from pipeline.convert import main

    run = tmp_path / "export3"
    source = universal_checkpoint(run, zh_dataset, 2)
    assert main(["export", str(source), str(tmp_path / "elsewhere")]) == 0
    for entry in (tmp_path / "elsewhere").iterdir():  # the run was started in an export folder
        shutil.copy2(entry, run / entry.name)
    (run / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    (run / "logs").mkdir()
    before = _tree(run)
    for output in (run, tmp_path):
        assert main(["export", str(source), str(output)]) == 2
        err = capsys.readouterr().err
        assert f"output {output} contains the checkpoint {source} it is made from: replacing {output} would delete " \
               f"it. Give an output directory outside it" in err, err
        assert _tree(run) == before


def test_re_export_replaces_an_export_and_leaves_same_named_folders_alone(tmp_path, capsys, checkpoints):
    from pipeline.convert import main

    first, second = checkpoints
    out = tmp_path / "export"
    # a user's backup, and folders named like the temporary ones of an earlier version
    for name in ("export.old", "export.partial", "export.universal-tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text(name, encoding="utf-8")
    assert main(["export", str(first), str(out)]) == 0
    assert _step(out) == 2
    assert main(["export", str(second), str(out)]) == 0  # an earlier export of the same kind: replaced
    assert _step(out) == 4
    assert sorted(p.name for p in out.iterdir()) == ["coarse_vocab.txt", "config.json", "fine_vocab.txt", "meta.json",
                                                      "model.safetensors", "training.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "export.old", "export.partial",
                                                          "export.universal-tmp"]  # no scratch left either
    for name in ("export.old", "export.partial", "export.universal-tmp"):
        assert (tmp_path / name / "keep.txt").read_text(encoding="utf-8") == name
    capsys.readouterr()


def test_a_previous_export_that_cannot_be_removed_does_not_lose_the_new_one(tmp_path, capsys, checkpoints, monkeypatch):
    from pipeline import convert

    first, second = checkpoints
    out = tmp_path / "export"
    assert convert.export(first, out) == out
    real_rmtree = shutil.rmtree

    def fails_on_the_backup(path, *args, **kwargs):
        if ".old-" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", fails_on_the_backup)
    assert convert.export(second, out) == out and _step(out) == 4
    err = capsys.readouterr().err
    assert f"warning: {out} was written, but the previous output moved aside to {tmp_path}/export.old-" in err, err
    backups = [p for p in tmp_path.iterdir() if p.name.startswith("export.old-")]
    assert len(backups) == 1 and _step(backups[0]) == 2


def test_hf_export_replaces_only_an_hf_export_holding_nothing_else(tmp_path, capsys, zh_dataset, tiny_model):
    from pipeline.convert import ConvertError
    from pipeline.export_hf import export_hf

    state, config = tiny_model.state_dict(), tiny_model.config
    out = tmp_path / "hf"
    (tmp_path / "hf.old").mkdir()
    assert export_hf(state, config, zh_dataset, out) == out
    assert export_hf(state, config, zh_dataset, out) == out  # an earlier HF export: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.old"]
    (out / "my_notes.txt").write_text("mine", encoding="utf-8")
    (out / "eval").mkdir()
    before = _tree(out)
    with pytest.raises(ConvertError, match=rf"output {out} holds a Hugging Face model but also eval/, my_notes.txt, "
                                           r"which a Hugging Face model does not write: .* move them out"):
        export_hf(state, config, zh_dataset, out)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "hf.old"]
