"""Saved fine-tuned models (--save-models) and pipeline.predict: the saved model predicts what the
fine-tuning run scored, for the three tasks; bad model directories are clear errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from pipeline.finetuning import FinetuneConfig, run
from tests.test_finetune import FILLER, NEGATIVE, POSITIVE, make_tiny_zh_dataset


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from data_prep.encode import TextEncoder
    from pipeline.inference import build_backbone, save_exported
    from pipeline.model import model_recipe

    dataset = make_tiny_zh_dataset(tmp_path_factory.mktemp("zh") / "dataset")
    encoder = TextEncoder(dataset)
    config = model_recipe("tiny", fine_vocab_size=len(encoder.fine_vocab), coarse_vocab_size=len(encoder.coarse_vocab),
                          hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    return save_exported(build_backbone(config), dataset, tmp_path_factory.mktemp("export") / "model")


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _predict(model_dir: Path, input_path: Path, output: Path) -> list[dict]:
    from pipeline.predict import main

    assert main([str(model_dir), "--input", str(input_path), "--output", str(output)]) == 0
    return [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]


def test_a_saved_sequence_model_predicts_what_fine_tuning_scored(tmp_path, export):
    """Numeric labels 2 and 10 (ids in numeric order, not string order): the saved label order is kept."""
    rng = random.Random(0)
    rows = {}
    for split, n in (("train", 320), ("dev", 32), ("test", 40)):
        rows[split] = []
        for _ in range(n):
            label = rng.choice([2, 10])
            words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))] + [rng.choice(POSITIVE if label == 2 else NEGATIVE)]
            rng.shuffle(words)
            rows[split].append({"text": "".join(words), "label": label})
        _write(tmp_path / f"{split}.jsonl", rows[split])
    config = FinetuneConfig(model=str(export), train=str(tmp_path / "train.jsonl"), dev=str(tmp_path / "dev.jsonl"),
                            test=str(tmp_path / "test.jsonl"), output=str(tmp_path / "out"), seeds=[1, 2], epochs=3.0,
                            lr=2e-3, batch_size=16, max_length=32, save_models=True)
    results = run(config)
    for seed in results["seeds"]:
        saved = tmp_path / "out" / "models" / f"seed{seed['seed']}"
        assert seed["saved_model"] == str(saved) and not saved.with_name(saved.name + ".partial").exists()
        task = json.loads((saved / "task.json").read_text())
        assert task["task"] == "sequence" and task["labels"] == ["2", "10"] and task["variant"] == "ambert"
        predictions = _predict(saved, tmp_path / "test.jsonl", tmp_path / f"pred{seed['seed']}.jsonl")
        assert len(predictions) == 40 and set(predictions[0]["probabilities"]) == {"2", "10"}
        right = sum(p["label"] == str(r["label"]) for p, r in zip(predictions, rows["test"]))
        assert right / 40 == pytest.approx(seed["test"]["accuracy"])
        metrics = json.loads((tmp_path / f"pred{seed['seed']}.jsonl.metrics.json").read_text())
        assert metrics["accuracy"] == pytest.approx(seed["test"]["accuracy"])
        assert metrics["macro_f1"] == pytest.approx(seed["test"]["macro_f1"])
    assert results["test"]["accuracy"]["mean"] > 0.75  # learnt (chance ~0.5): the comparison is not between two random models
    # The saved backbone is an export: it fine-tunes again as --model (and is not the starting model).
    from pipeline.finetuning import resolve_pretrained
    from pipeline.inference import load_state_dict

    again = resolve_pretrained(str(tmp_path / "out" / "models" / "seed1"))
    start = load_state_dict(export)
    assert again.state_dict.keys() == start.keys()
    assert any(not torch.equal(again.state_dict[k], start[k]) for k in start)


def test_a_saved_tagging_model_predicts_one_tag_per_input_token(tmp_path, export):
    rng = random.Random(1)
    words = FILLER[:-3] + POSITIVE + NEGATIVE  # multi-character words: B ... E, one-character: S

    def sentence():
        chosen = [rng.choice(words) for _ in range(rng.randint(2, 6))]
        chars = [c for w in chosen for c in w]
        tags = [t for w in chosen for t in (["S"] if len(w) == 1 else ["B"] + ["I"] * (len(w) - 2) + ["E"])]
        return {"tokens": chars, "tags": tags}

    for split, n in (("train", 120), ("dev", 30), ("test", 30)):
        _write(tmp_path / f"{split}.jsonl", [sentence() for _ in range(n)])
    results = run(FinetuneConfig(model=str(export), train=str(tmp_path / "train.jsonl"), dev=str(tmp_path / "dev.jsonl"),
                                 test=str(tmp_path / "test.jsonl"), output=str(tmp_path / "out"), task="token", seeds=[1],
                                 epochs=3.0, lr=2e-3, batch_size=16, max_length=40, save_models=True))
    predictions = _predict(tmp_path / "out" / "models" / "seed1", tmp_path / "test.jsonl", tmp_path / "pred.jsonl")
    gold = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [len(p["tags"]) for p in predictions] == [len(g["tokens"]) for g in gold]
    # each character is one fine token here: per-token accuracy == fine-tuning's per-fine-token accuracy
    pairs = [(p, t) for record, g in zip(predictions, gold) for p, t in zip(record["tags"], g["tags"])]
    assert sum(p == t for p, t in pairs) / len(pairs) == pytest.approx(results["seeds"][0]["test"]["accuracy"])


def test_a_saved_span_model_predicts_the_answers_fine_tuning_scored(tmp_path, export):
    from tests.test_finetune_span import make_span_files

    files = make_span_files(tmp_path, sizes=(64, 16, 24))
    results = run(FinetuneConfig(model=str(export), train=str(files["train"]), dev=str(files["dev"]), test=str(files["test"]),
                                 output=str(tmp_path / "out"), task="span", seeds=[1], epochs=2.0, lr=2e-3, batch_size=16,
                                 max_length=40, max_query_length=8, doc_stride=16, save_models=True))
    # questions only (no answers column): answers are predicted, no metrics
    rows = [json.loads(line) for line in files["test"].read_text(encoding="utf-8").splitlines()]
    questions = _write(tmp_path / "questions.jsonl", [{k: r[k] for k in ("id", "question", "context")} for r in rows])
    predictions = _predict(tmp_path / "out" / "models" / "seed1", questions, tmp_path / "pred.jsonl")
    assert {p["id"]: p["answer"] for p in predictions} == results["seeds"][0]["test_predictions"]
    assert not (tmp_path / "pred.jsonl.metrics.json").exists()
    _predict(tmp_path / "out" / "models" / "seed1", files["test"], tmp_path / "pred2.jsonl")
    metrics = json.loads((tmp_path / "pred2.jsonl.metrics.json").read_text())
    assert metrics["f1"] == pytest.approx(results["seeds"][0]["test"]["f1"])


def test_a_directory_that_is_not_a_fine_tuned_model_is_one_clear_error(tmp_path, export, capsys):
    from pipeline.predict import main

    data = _write(tmp_path / "x.jsonl", [{"text": "很好"}])
    assert main([str(export), "--input", str(data), "--output", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "has no task.json: it is not a fine-tuned model" in err and "--save-models" in err
    # a damaged heads file
    import shutil

    model = tmp_path / "model"
    shutil.copytree(export, model)
    (model / "task.json").write_text(json.dumps({"task": "sequence", "labels": ["a", "b"], "max_length": 32,
                                                 "max_coarse_length": 0}), encoding="utf-8")
    (model / "heads.safetensors").write_bytes(b"not a safetensors file")
    assert main([str(model), "--input", str(data), "--output", str(tmp_path / "p.jsonl")]) == 2
    assert "heads.safetensors cannot be loaded" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


@pytest.fixture(scope="module")
def sequence_model(tmp_path_factory, export) -> Path:
    directory = tmp_path_factory.mktemp("seq")
    rows = [{"text": w + "。", "label": "pos" if w in POSITIVE else "neg"} for w in POSITIVE + NEGATIVE] * 2
    for split in ("train", "dev"):
        _write(directory / f"{split}.jsonl", rows)
    run(FinetuneConfig(model=str(export), train=str(directory / "train.jsonl"), dev=str(directory / "dev.jsonl"),
                       output=str(directory / "out"), seeds=[1], epochs=1.0, batch_size=8, max_length=16, save_models=True))
    return directory / "out" / "models" / "seed1"


def test_predict_refuses_inputs_unlike_the_training_ones_and_keeps_files_apart(tmp_path, sequence_model, capsys):
    from pipeline.predict import main

    pairs = _write(tmp_path / "pairs.jsonl", [{"text": "很好", "text_pair": "喜欢", "label": "pos"}])
    assert main([str(sequence_model), "--input", str(pairs), "--output", str(tmp_path / "p.jsonl")]) == 2
    assert "has column 'text_pair' but the model was fine-tuned on single texts" in capsys.readouterr().err
    single = _write(tmp_path / "single.jsonl", [{"text": "很好", "label": "pos"}, {"text": "很差", "label": None}])
    with pytest.raises(SystemExit):
        main([str(sequence_model), "--input", str(single), "--output", str(single)])
    assert "would overwrite the input" in capsys.readouterr().err
    assert json.loads(single.read_text(encoding="utf-8").splitlines()[0])["label"] == "pos"  # untouched
    assert main([str(sequence_model), "--input", str(single), "--output", str(tmp_path / "p.jsonl")]) == 0
    metrics = json.loads((tmp_path / "p.jsonl.metrics.json").read_text())
    assert metrics["examples"] == 1  # the row without a gold label is predicted, not scored
    # predictions of a file without gold do not sit next to the metrics of an earlier one
    bare = _write(tmp_path / "bare.jsonl", [{"text": "很好"}])
    assert main([str(sequence_model), "--input", str(bare), "--output", str(tmp_path / "p.jsonl")]) == 0
    assert not (tmp_path / "p.jsonl.metrics.json").exists()
    missing = tmp_path / "nowhere"
    assert main([str(missing), "--input", str(bare), "--output", str(tmp_path / "p.jsonl")]) == 2
    assert f"model directory {missing} does not exist" in capsys.readouterr().err


def test_token_inputs_are_checked_row_by_row(tmp_path, export, capsys):
    from pipeline.predict import main

    rows = [{"tokens": list(w), "tags": ["B"] + ["E"] * (len(w) - 1)} for w in POSITIVE + NEGATIVE] * 2
    for split in ("train", "dev"):
        _write(tmp_path / f"{split}.jsonl", rows)
    run(FinetuneConfig(model=str(export), train=str(tmp_path / "train.jsonl"), dev=str(tmp_path / "dev.jsonl"),
                       output=str(tmp_path / "out"), task="token", seeds=[1], epochs=1.0, batch_size=8, max_length=16,
                       save_models=True))
    model = str(tmp_path / "out" / "models" / "seed1")
    for row, message in (({"tokens": "很好"}, "'tokens' holds '很好' (of type str); give a list of tokens"),
                         ({"tokens": ["很", 3]}, "'tokens' holds '3' (of type int)"),
                         ({"tokens": ["很", "好"], "tags": ["B"]}, "2 tokens but 1 tags; give one tag per token")):
        bad = _write(tmp_path / "bad.jsonl", [rows[0], row])
        assert main([model, "--input", str(bad), "--output", str(tmp_path / "p.jsonl")]) == 2
        err = capsys.readouterr().err
        assert f"{bad} record 2: " in err and message in err, err
    assert not (tmp_path / "p.jsonl").exists()


def test_span_metrics_leave_out_questions_without_answers(tmp_path, export, caplog):
    from tests.test_finetune_span import make_span_files

    files = make_span_files(tmp_path, sizes=(32, 8, 8))
    run(FinetuneConfig(model=str(export), train=str(files["train"]), dev=str(files["dev"]), output=str(tmp_path / "out"),
                       task="span", seeds=[1], epochs=1.0, batch_size=8, max_length=40, max_query_length=8,
                       doc_stride=16, save_models=True))
    rows = [json.loads(line) for line in files["test"].read_text(encoding="utf-8").splitlines()]
    half = _write(tmp_path / "half.jsonl", [r if i % 2 else {k: r[k] for k in ("id", "question", "context")}
                                            for i, r in enumerate(rows)])
    import logging

    with caplog.at_level(logging.WARNING, logger="predict"):
        predictions = _predict(tmp_path / "out" / "models" / "seed1", half, tmp_path / "p.jsonl")
    assert len(predictions) == 8
    assert "4 of the 8 rows of" in caplog.text and "the metrics are over the other 4" in caplog.text
    metrics = json.loads((tmp_path / "p.jsonl.metrics.json").read_text())
    assert metrics["examples"] == 4 and "unanswerable" not in metrics
