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
    assert main([str(sequence_model), "--input", str(single), "--output", str(single)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output ") and "would overwrite the input" in err and "usage:" not in err
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


def test_token_inputs_are_checked_row_by_row(tmp_path, export, capsys, caplog):
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
    # a gold tag the model was not fine-tuned on: every row is predicted, its tokens counted wrong, one warning
    import logging

    unknown = _write(tmp_path / "unknown.jsonl", [rows[0], {"tokens": ["很", "好"], "tags": ["B", "X"]}])
    with caplog.at_level(logging.WARNING, logger="predict"):
        assert main([model, "--input", str(unknown), "--output", str(tmp_path / "p.jsonl")]) == 0
    predictions = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [len(p["tags"]) for p in predictions] == [len(rows[0]["tokens"]), 2]
    assert "1 of the 4 scored tokens of" in caplog.text and "['X']" in caplog.text
    metrics = json.loads((tmp_path / "p.jsonl.metrics.json").read_text())
    gold = rows[0]["tags"] + ["B", "X"]
    tags = predictions[0]["tags"] + predictions[1]["tags"]
    assert metrics["unknown_gold"] == 1 and metrics["examples"] == 4
    assert metrics["accuracy"] == pytest.approx(sum(p == g for p, g in zip(tags, gold)) / 4)


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
    # an unanswerable gold question for a model fine-tuned without them: predicted, warned about, counted wrong
    unanswerable = _write(tmp_path / "unanswerable.jsonl", rows[:3] + [{**rows[3], "answers": {"text": [], "answer_start": []}}])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="predict"):
        predictions = _predict(tmp_path / "out" / "models" / "seed1", unanswerable, tmp_path / "p.jsonl")
    assert len(predictions) == 4 and predictions[3]["answer"] != ""
    assert "1 of the 4 scored questions of" in caplog.text and rows[3]["id"] in caplog.text
    metrics = json.loads((tmp_path / "p.jsonl.metrics.json").read_text())
    assert metrics["examples"] == 4 and metrics["unanswerable"] == 1


def test_an_existing_file_that_is_not_predictions_is_refused_before_any_work(tmp_path, export, sequence_model, capsys,
                                                                             monkeypatch):
    """A data file, a model's weights, a foreign .metrics.json: refused with the fix, left byte-identical, and
    refused before the model is loaded; as is any --output inside an export, checkpoint or dataset directory."""
    import pipeline.predict as predict

    data = _write(tmp_path / "data.jsonl", [{"text": "很好", "label": "pos"}])
    dev = _write(tmp_path / "dev.jsonl", [{"text": "很差", "label": "neg"}, {"text": "很好", "label": "pos"}])
    weights = tmp_path / "weights.bin"
    weights.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    span_like = _write(tmp_path / "questions.jsonl", [{"id": "q1", "question": "很好？", "context": "很好。"}])

    def not_loaded(*_args, **_kwargs):
        raise AssertionError("the model was loaded before --output was checked")

    with monkeypatch.context() as patch:
        patch.setattr(predict, "FineTuned", not_loaded)
        for existing in (dev, weights, empty, span_like):
            before = existing.read_bytes()
            assert predict.main([str(sequence_model), "--input", str(data), "--output", str(existing)]) == 2
            err = capsys.readouterr().err
            assert f"--output {existing} already exists and is not a prediction file" in err, err
            assert "give a new path, or pass --overwrite" in err
            assert existing.read_bytes() == before
        # inside a model export (its weights too), a saved fine-tuned model, a checkpoint, a dataset
        from tests.test_finetune import make_tiny_zh_dataset

        checkpoint = tmp_path / "run" / "checkpoints" / "step_00000010"
        checkpoint.mkdir(parents=True)
        (checkpoint / "COMPLETE").write_text(json.dumps({"step": 10}), encoding="utf-8")
        dataset = make_tiny_zh_dataset(tmp_path / "dataset")
        weights_before = (export / "model.safetensors").read_bytes()
        for output, what in ((export / "model.safetensors", f"model directory {export}"),
                             (export / "sub" / "pred.jsonl", f"model directory {export}"),
                             (sequence_model / "pred.jsonl", f"model directory {sequence_model}"),
                             (checkpoint / "pred.jsonl", f"training checkpoint {checkpoint}"),
                             (dataset / "pred.jsonl", f"pre-training dataset {dataset}")):
            for extra in ([], ["--overwrite"]):
                assert predict.main([str(sequence_model), "--input", str(data), "--output", str(output), *extra]) == 2
                err = capsys.readouterr().err
                assert f"--output {output} is inside {what}" in err and "give a path outside it" in err, err
        assert (export / "model.safetensors").read_bytes() == weights_before
        assert not (export / "sub").exists() and not (sequence_model / "pred.jsonl").exists()
        assert not (checkpoint / "pred.jsonl").exists() and not (dataset / "pred.jsonl").exists()
        # a .metrics.json next to a new --output that predict did not write
        foreign = tmp_path / "new.jsonl.metrics.json"
        foreign.write_text('{"note": "mine"}', encoding="utf-8")
        assert predict.main([str(sequence_model), "--input", str(data), "--output", str(tmp_path / "new.jsonl")]) == 2
        assert "new.jsonl.metrics.json, where the metrics of --output" in capsys.readouterr().err
        assert foreign.read_text(encoding="utf-8") == '{"note": "mine"}'
    # --overwrite replaces a file that is not a prediction file (and a foreign metrics file)
    predictions = _predict(sequence_model, data, tmp_path / "ignored.jsonl")
    from pipeline.predict import main

    assert main([str(sequence_model), "--input", str(data), "--output", str(dev), "--overwrite"]) == 0
    assert [json.loads(line) for line in dev.read_text(encoding="utf-8").splitlines()] == predictions
    assert main([str(sequence_model), "--input", str(data), "--output", str(tmp_path / "new.jsonl"), "--overwrite"]) == 0
    assert json.loads(foreign.read_text(encoding="utf-8"))["examples"] == 1


def test_predict_replaces_its_own_earlier_predictions(tmp_path, sequence_model):
    first = _write(tmp_path / "first.jsonl", [{"text": "很好", "label": "pos"}])
    second = _write(tmp_path / "second.jsonl", [{"text": "很差"}, {"text": "喜欢"}, {"text": "很好"}])
    output = tmp_path / "p.jsonl"
    assert len(_predict(sequence_model, first, output)) == 1
    assert (tmp_path / "p.jsonl.metrics.json").exists()
    assert len(_predict(sequence_model, second, output)) == 3  # its own earlier output (and metrics): replaced
    assert not (tmp_path / "p.jsonl.metrics.json").exists()
    assert len(_predict(sequence_model, first, output)) == 1
    from pipeline.predict import _is_prediction_file

    # the records of the other tasks are recognised too; a data file with one of their keys is not
    for records, expected in (([{"tags": ["B", None]}], True), ([{"id": "q1", "answer": ""}], True),
                              ([{"id": 3, "answer": 1, "option": "甲", "probabilities": [0.1, 0.9]}], True),
                              ([{"tokens": ["很"], "tags": ["S"]}], False), ([{"label": "pos"}], False),
                              ([{"label": "pos", "probabilities": {"pos": 1.0}}, {"text": "很好"}], False)):
        assert _is_prediction_file(_write(tmp_path / "x.jsonl", records)) is expected, records


def test_gold_labels_the_model_never_saw_are_predicted_and_counted_wrong(tmp_path, sequence_model, caplog):
    """Fine-tuning refuses them; predict writes every row's prediction, warns once, and counts those rows wrong."""
    import logging

    rows = [{"text": "很好。", "label": "pos"}, {"text": "很差。", "label": "neg"}, {"text": "喜欢。", "label": "neutral"},
            {"text": "讨厌。", "label": "mixed"}, {"text": "很好。", "label": "neutral"}, {"text": "很差。", "label": None}]
    data = _write(tmp_path / "data.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="predict"):
        predictions = _predict(sequence_model, data, tmp_path / "p.jsonl")
    assert len(predictions) == 6 and all(p["label"] in ("pos", "neg") for p in predictions)
    warnings = [r.getMessage() for r in caplog.records if "not fine-tuned on" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "3 of the 5 scored rows of" in warnings[0] and "['mixed', 'neutral']" in warnings[0]
    assert "counted wrong" in warnings[0]
    metrics = json.loads((tmp_path / "p.jsonl.metrics.json").read_text())
    right = sum(p["label"] == r["label"] for p, r in zip(predictions, rows))
    assert metrics["examples"] == 5 and metrics["unknown_gold"] == 3
    assert metrics["accuracy"] == pytest.approx(right / 5)  # the unknown rows count, as wrong
    assert metrics["per_class"]["neutral"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
