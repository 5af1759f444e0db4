"""checkpointing.init_from: a fresh pre-training run (step 0, new optimizer and schedule) from the
weights of an export or a checkpoint: continued pre-training on another dataset built with the same
vocabularies (data_prep/build.py --vocab-from). The weights load at another tensor-parallel layout
than they were trained at (TP slices, ZeRO-3 partitions), and a model of another shape or a dataset
with other vocabularies is refused before any process group."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.test_pretrain import BASE, assert_ok, get_dataset, get_reference_run, launch, losses


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from pipeline.convert import export as export_checkpoint

    reference = get_reference_run(tmp_path_factory)  # 20 steps, TP=1 DP=2, ZeRO-3
    return export_checkpoint(reference / "checkpoints" / "step_00000020", tmp_path_factory.mktemp("init") / "export")


def _run(tmp_path, tmp_path_factory, export, tp: int, name: str, save: bool = False) -> dict[int, float]:
    out = tmp_path / name
    overrides = [
        f"data.path={get_dataset(tmp_path_factory)}", f"output_dir={out}", f"checkpointing.init_from={export}",
        "schedule.train_steps=2", "model.hidden_dropout=0.0", "model.attention_dropout=0.0", "data.num_workers=0",
        f"parallelism.tensor_parallel={tp}", "parallelism.gradient_accumulation_steps=2", f"checkpointing.save_at_end={str(save).lower()}",
    ]
    code, output = launch(overrides, nproc=tp, log=tmp_path / f"{name}.log", timeout=300, launcher="torchrun")
    assert_ok(code, output)
    assert "initialised the model from checkpointing.init_from" in output
    return losses(out)


def test_init_from_an_export_at_tp1_and_tp2(export, tmp_path, tmp_path_factory):
    """The same weights give the same losses at TP=1 and TP=2 (ZeRO-3 both), and they are the trained
    ones: the first step's loss is the trained model's, far below a random model's."""
    tp1 = _run(tmp_path, tmp_path_factory, export, 1, "tp1", save=True)
    tp2 = _run(tmp_path, tmp_path_factory, export, 2, "tp2")
    assert sorted(tp1) == sorted(tp2) == [1, 2]
    for step in tp1:
        assert abs(tp1[step] - tp2[step]) <= 1e-5 * abs(tp1[step]), (step, tp1[step], tp2[step])
    trained = losses(get_reference_run(tmp_path_factory))
    assert tp1[1] < 0.8 * trained[1], (tp1[1], trained[1])  # a random model's first loss
    assert tp1[1] < 1.1 * trained[20], (tp1[1], trained[20])  # the level the export was trained to
    # Lineage: the run's checkpoints and exports say what it started from (a random run: None).
    import json
    from pathlib import Path

    from pipeline.checkpoint import read_marker
    from pipeline.convert import export as export_checkpoint

    source = read_marker(get_reference_run(tmp_path_factory) / "checkpoints" / "step_00000020")
    assert source["started_from"] is None
    from data_prep.format import PairedDataset

    trained_on = PairedDataset(source["dataset_path"])
    assert source["vocab_fingerprints"] == {"fine": trained_on.fine_vocab.fingerprint(),
                                            "coarse": trained_on.coarse_vocab.fingerprint()}
    assert json.loads((Path(export) / "training.json").read_text())["vocab_fingerprints"] == source["vocab_fingerprints"]
    origin = read_marker(tmp_path / "tp1" / "checkpoints" / "step_00000002")["started_from"]
    assert origin == {"path": str(Path(export).resolve()), "step": 20, "dataset_path": source["dataset_path"],
                      "dataset_fingerprint": source["dataset_fingerprint"]}
    again = export_checkpoint(tmp_path / "tp1" / "checkpoints" / "step_00000002", tmp_path / "tp1_export")
    assert json.loads((again / "training.json").read_text())["started_from"] == origin


def test_init_from_refusals_before_any_process_group(export, tmp_path, tmp_path_factory, monkeypatch):
    from pipeline import parallel, pretrain
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import ConfigError

    dataset = get_dataset(tmp_path_factory)
    other_vocab = tmp_path / "other_vocab"  # the same sizes, two tokens swapped: other ids
    shutil.copytree(dataset, other_vocab)
    lines = (other_vocab / "fine_vocab.txt").read_text(encoding="utf-8").splitlines()
    lines[-1], lines[-2] = lines[-2], lines[-1]
    (other_vocab / "fine_vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    from tests.test_data_loader import write_synthetic_dataset

    smaller_vocab = write_synthetic_dataset(tmp_path / "smaller_vocab", num_docs=300, coarse_vocab=180)
    # An export whose tokenizer files were copied from its dataset after a rebuild (`convert export`
    # warns): they match other_vocab, but the weights were trained with the original ids, which its
    # training.json records.
    stale_export = tmp_path / "stale_export"
    shutil.copytree(export, stale_export)
    shutil.copy(other_vocab / "fine_vocab.txt", stale_export / "fine_vocab.txt")
    english = tmp_path / "english"  # the same files, said to be --lang en: the model's --vocab-from is a zh build
    shutil.copytree(dataset, english)
    meta = json.loads((english / "meta.json").read_text(encoding="utf-8"))
    (english / "meta.json").write_text(json.dumps({**meta, "language": "en"}), encoding="utf-8")
    monkeypatch.setattr(parallel, "startup_failed", lambda *a, **k: None)
    common = [*BASE, "schedule.train_steps=2"]
    cases = [
        (ConfigError, [f"data.path={dataset}", f"checkpointing.init_from={tmp_path / 'nope'}"], "no such directory"),
        (CheckpointError, [f"data.path={dataset}", f"checkpointing.init_from={dataset}"],
         "is a pre-training dataset (data_prep/build.py), not a checkpoint"),
        (CheckpointError, [f"data.path={dataset}", f"checkpointing.init_from={export}", "model.num_layers=3"],
         "is a model of another shape (num_layers: 2 there vs 3 here)"),
        (CheckpointError, [f"data.path={other_vocab}", f"checkpointing.init_from={export}"],
         "was pre-trained with another fine_vocab.txt"),
        (CheckpointError, [f"data.path={other_vocab}", f"checkpointing.init_from={stale_export}"],
         "was pre-trained with another fine_vocab.txt (fingerprint "),
        (CheckpointError, [f"data.path={smaller_vocab}", f"checkpointing.init_from={export}"],
         "was pre-trained with vocabularies of other sizes"),
        (CheckpointError, [f"data.path={english}", f"checkpointing.init_from={export}"],
         f"is a --lang zh model and data.path={english} a --lang en dataset: its vocabularies are for the other "
         f"language. Give a --lang zh dataset (python data_prep/build.py --lang zh --input ... --output ... --vocab-from"),
    ]
    for i, (error, overrides, message) in enumerate(cases):
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            pretrain.main([*common, f"output_dir={tmp_path / f'run{i}'}", *overrides])
        if "another fine_vocab" in message or "other sizes" in message:
            assert "--vocab-from" in str(info.value)
        if "fingerprint" in message:
            assert "rebuilt since" in str(info.value)
        assert not (tmp_path / f"run{i}" / "metrics.jsonl").exists()
