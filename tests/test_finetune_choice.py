"""Multiple choice (RACE / C3 style): file layouts and labels, option sequences, the per-question
softmax and loss, bad input, and a run end to end through a saved model and pipeline.predict.

Data is generated here (the tiny Chinese tokenizer directory of test_finetune.py), nothing third-party
is copied."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.format import CLS_ID, SEP_ID
from pipeline import choice
from tests import test_finetune_span as span
from tests.test_finetune import FILLER, NEGATIVE, POSITIVE

zh_dataset, encoder, export = span.zh_dataset, span.encoder, span.export  # the same tiny tokenizers and model (fixtures)


def make_choice_files(directory: Path, sizes=(200, 100, 100), seed: int = 0) -> dict[str, Path]:
    """A context with one positive and one negative word among fillers; the question (很好？ / 很差？) asks
    for one of them; three options: both words and a filler, in random order. Answers alternate
    between an index and a letter."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in zip(("train", "dev", "test"), sizes):
        path = directory / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for i in range(n):
                words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
                positive, negative = rng.choice(POSITIVE), rng.choice(NEGATIVE)
                words.insert(rng.randint(0, len(words)), positive)
                words.insert(rng.randint(0, len(words)), negative)
                good = rng.random() < 0.5
                right = positive if good else negative
                options = [positive, negative, rng.choice(FILLER[:12])]
                rng.shuffle(options)
                answer = options.index(right) if i % 2 else "ABC"[options.index(right)]
                f.write(json.dumps({"id": f"{split}{i}", "context": "".join(words) + "。", "question": "很好？" if good else "很差？",
                                    "choices": options, "label": answer}, ensure_ascii=False) + "\n")
        paths[split] = path
    return paths


# ---------------------------------------------------------------------------------------------
# Files and labels
# ---------------------------------------------------------------------------------------------
def test_index_letter_and_text_labels_and_c3_nested_json_give_the_same_examples(tmp_path):
    turns = ["我们觉得很好。", "朋友觉得很差。"]
    questions = [("谁觉得很好？", ["我们", "朋友"], 0), ("朋友觉得？", ["很好", "很差", "真的"], 1)]
    layouts = {
        "index.jsonl": [{"id": f"d1-{k}", "context": turns, "question": q, "choices": o, "label": a}
                        for k, (q, o, a) in enumerate(questions)],
        "letter.jsonl": [{"id": f"d1-{k}", "context": "\n".join(turns), "question": q, "choices": o, "label": "AB"[a].lower()}
                         for k, (q, o, a) in enumerate(questions)],
        "text.jsonl": [{"id": f"d1-{k}", "context": turns, "question": q, "choices": o, "label": o[a]}
                       for k, (q, o, a) in enumerate(questions)],
    }
    read = {}
    for name, rows in layouts.items():
        (tmp_path / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        read[name] = choice.read_choice_file(str(tmp_path / name), "context", "question", "choices", "label")
    c3 = [[turns, [{"question": q, "choice": o, "answer": o[a]} for q, o, a in questions], "d1"]]
    (tmp_path / "c3.json").write_text(json.dumps(c3, ensure_ascii=False), encoding="utf-8")
    read["c3.json"] = choice.read_choice_file(str(tmp_path / "c3.json"), "context", "question", "choices", "label")
    for name, examples in read.items():
        got = [(e.id, e.context, e.question, e.options, e.label) for e in examples]
        assert got == [(f"d1-{k}", "我们觉得很好。\n朋友觉得很差。", q, o, a) for k, (q, o, a) in enumerate(questions)], name
    # without a context column, and without gold answers (prediction)
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"question": "很好？", "choices": ["喜欢", "讨厌"]}, ensure_ascii=False) + "\n", encoding="utf-8")
    example, = choice.read_choice_file(str(bare), "", "question", "choices", "label", require_labels=False)
    assert (example.context, example.options, example.label) == ("", ["喜欢", "讨厌"], None)
    # an option whose text is a letter is taken as that option, not as the letter's position
    assert choice.label_index("B", ["B", "A"], "x") == 0 and choice.label_index("b", ["A", "B"], "x") == 1
    # an index as a string or as a float (an int column with nulls); hidden test sets' "no answer" forms
    assert [choice.label_index(v, ["x", "y", "z"], "x") for v in ("2", 2.0, np.int64(1))] == [2, 2, 1]
    assert [choice.label_index(v, ["x", "y"], "x") for v in ("", " ", -1, "-1", float("nan"), np.float32("nan"), None)] \
        == [None] * 7


def test_shared_passage_ids_are_numbered_and_c3_question_ids_are_kept(tmp_path):
    """HF race's example_id and clue/c3's id name the passage: its questions got the same id, so their
    predictions could not be told apart. CLUE's C3 release numbers its questions: those ids are kept."""
    rows = [{"example_id": "high1.txt", "article": "我们。", "question": q, "options": ["喜欢", "讨厌"], "answer": "A"}
            for q in ("很好？", "很差？")] + [{"example_id": "high2.txt", "article": "朋友。", "question": "很好？",
                                              "options": ["喜欢", "讨厌"], "answer": "B"}]
    path = tmp_path / "race.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    examples = choice.read_choice_file(str(path), "article", "question", "options", "answer")
    assert [e.id for e in examples] == ["high1.txt-0", "high1.txt-1", "high2.txt"]
    rows = [{"id": i, "question": "很好？", "choices": ["喜欢", "讨厌"], "label": 0} for i in ("a", "a", "a-0")]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    ids = [e.id for e in choice.read_choice_file(str(path), "", "question", "choices", "label")]
    assert ids == ["a-1", "a-2", "a-0"]  # numbered around the file's own "a-0": every id stays distinct
    c3 = [[["我们觉得很好。"], [{"question": "谁？", "choice": ["我们", "朋友"], "answer": "我们", "id": "17"},
                            {"question": "觉得？", "choice": ["很好", "很差"], "answer": ""}], "m1-1"]]
    import gzip

    with gzip.open(tmp_path / "c3.json.gz", "wt", encoding="utf-8-sig") as f:  # compressed, with a BOM
        json.dump(c3, f, ensure_ascii=False)
    examples = choice.read_choice_file(str(tmp_path / "c3.json.gz"), "context", "question", "choices", "label",
                                       require_labels=False)
    assert [(e.id, e.label) for e in examples] == [("17", 0), ("m1-1-1", None)]
    c3[0][1][0]["choice"] = "我们"
    (tmp_path / "bad.json").write_text(json.dumps(c3, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(choice.ChoiceDataError, match="'choice' holds '我们'"):  # C3's own key names
        choice.read_choice_file(str(tmp_path / "bad.json"), "context", "question", "choices", "label")


@pytest.mark.parametrize("row,message", [
    ({"question": "很好？", "choices": "喜欢 讨厌", "label": 0}, "'choices' holds '喜欢 讨厌'; give a list of options"),
    ({"question": "很好？", "choices": ["喜欢"], "label": 0}, "1 option(s); a multiple-choice question needs at least 2"),
    ({"question": "很好？", "choices": ["喜欢", "讨厌"], "label": 2}, "names none of its 2 options"),
    ({"question": "很好？", "choices": ["喜欢", "讨厌"], "label": "E"}, "a letter (A-B) or the option's text"),
    ({"question": "很好？", "choices": ["喜欢", "喜欢"], "label": "喜欢"}, "is the text of options [0, 1]"),
    ({"question": "很好？", "choices": ["喜欢", "讨厌"], "label": None}, "no answer ('label' is null or missing)"),
    ({"question": ["很好？", 3], "choices": ["喜欢", "讨厌"], "label": 0}, "'question' holds"),
])
def test_malformed_rows_are_named_with_the_fix(tmp_path, row, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"id": "a", "context": "我们觉得。", **row}, ensure_ascii=False) + "\n" +
                    json.dumps({"id": "b", "context": "我们", **row}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(choice.ChoiceDataError, match="record 1") as info:
        choice.read_choice_file(str(path), "context", "question", "choices", "label")
    assert message in str(info.value), str(info.value)


def test_a_missing_column_names_the_flag_and_the_no_context_form(tmp_path, export, capsys):
    from pipeline.finetune import main

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"article": "我们。", "question": "很好？", "options": ["喜欢", "讨厌"], "answer": "A"},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    flags = ["--model", str(export), "--train", str(path), "--dev", str(path), "--task", "choice",
             "--output", str(tmp_path / "out")]
    assert main(flags) == 2
    error = capsys.readouterr().err
    assert "has no column 'context' (context_field)" in error and "--context-field ''" in error, error
    assert not (tmp_path / "out" / "results.json").exists()
    assert main([*flags, "--context-field", "article", "--choices-field", "options", "--label-field", "answer",
                 "--seeds", "1", "--epochs", "1", "--no-tensorboard"]) == 0  # RACE's column names
    assert json.loads((tmp_path / "out" / "results.json").read_text())["dev"]["accuracy"]["values"][0] in (0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Option sequences
# ---------------------------------------------------------------------------------------------
def test_each_option_is_context_then_question_and_option_and_long_contexts_are_cut_first(encoder, caplog):
    example = choice.ChoiceExample("1", "我们今天觉得这个手机很好。朋友觉得服务很差。", "哪个词_？", ["很好", "很差"], 1, "ex")
    item, = choice.encode_choice_split(encoder, [example], "dev", 64, 64)
    assert item["label"] == 1 and len(item["options"]) == 2
    context = encoder.encode(example.context)
    for option, built in zip(example.options, item["options"]):
        second = encoder.encode(f"哪个词 {option} ？")  # the option in the question's blank
        assert built["fine_ids"].tolist() == [CLS_ID, *context.fine.tolist(), SEP_ID, *second.fine.tolist(), SEP_ID]
        assert built["coarse_ids"].tolist() == [CLS_ID, *context.coarse.tolist(), SEP_ID, *second.coarse.tolist(), SEP_ID]
        assert built["fine_token_types"].tolist() == [0] * (len(context.fine) + 2) + [1] * (len(second.fine) + 1)
    # a short limit: the context (the longer segment) loses its end; question and option stay whole
    with caplog.at_level(logging.WARNING, logger="finetune"):
        item, = choice.encode_choice_split(encoder, [example], "dev", 16, 16)
    for option, built in zip(example.options, item["options"]):
        second = encoder.encode(f"哪个词 {option} ？")
        kept_context, kept_second = built["kept_fine"].tolist()
        assert kept_second == len(second.fine) and kept_context < len(context.fine)
        assert built["fine_ids"][1:1 + kept_context].tolist() == context.fine[:kept_context].tolist()
        assert len(built["fine_ids"]) <= 16
    assert "2 of the 2 option sequences of dev are longer than --max-length 16" in caplog.text
    assert choice.option_text("我们", "很好") == ("我们 很好", 3, 5) and choice.option_text("", "很好") == ("很好", 0, 2)
    assert choice.option_text("The word ____ means __.", "big") == ("The word  big  means __.", 10, 13)
    # a long question: it loses its beginning, never the option, and the context keeps half the budget
    caplog.clear()
    long = choice.ChoiceExample("2", example.context, "这个手机的质量真的觉得" * 3 + "？", ["很好很好", "很差很差"], 0, "ex")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        item, = choice.encode_choice_split(encoder, [long], "dev", 24, 24)
    sequences = []
    for option, built in zip(long.options, item["options"]):
        kept_context, kept_second = built["kept_fine"].tolist()
        option_ids = encoder.encode(option).fine.tolist()
        second = built["fine_ids"][2 + kept_context:-1].tolist()
        assert second[-len(option_ids):] == option_ids  # the option ends the sequence, whole
        assert kept_context == (24 - 3) // 2 and len(built["fine_ids"]) <= 24
        sequences.append(built["fine_ids"].tolist())
    assert sequences[0] != sequences[1]
    assert "in 2 of them the question (or cloze passage) loses the tokens farthest from the option" in caplog.text
    # the option in a blank at the start of a long question: kept, with what follows it
    blank = choice.ChoiceExample("3", example.context, "_" + "这个手机的质量真的觉得" * 3 + "？", ["很好很好", "很差很差"], 0, "ex")
    item, = choice.encode_choice_split(encoder, [blank], "dev", 24, 24)
    for option, built in zip(blank.options, item["options"]):
        kept_context, _ = built["kept_fine"].tolist()
        option_ids = encoder.encode(option).fine.tolist()
        assert built["fine_ids"][2 + kept_context:2 + kept_context + len(option_ids)].tolist() == option_ids
    assert item["options"][0]["fine_ids"].tolist() != item["options"][1]["fine_ids"].tolist()


# ---------------------------------------------------------------------------------------------
# Scores, softmax over options, loss
# ---------------------------------------------------------------------------------------------
def test_options_are_scored_alone_and_missing_options_get_no_probability(encoder, export):
    from pipeline.finetuning import AmbertForClassification, collate, three_classifier_loss
    from pipeline.inference import build_backbone, load_state_dict, read_model_config

    torch.manual_seed(0)
    model = AmbertForClassification(build_backbone(read_model_config(export), load_state_dict(export)), 7, "choice",
                                    dropout=0.0).eval()
    hidden = model.backbone.config.hidden_size
    assert {k: tuple(v.weight.shape) for k, v in model.heads.items()} == \
        {"fine": (1, hidden), "coarse": (1, hidden), "joint": (1, 2 * hidden)}  # a score per option, whatever num_labels
    questions = [choice.ChoiceExample("a", "我们觉得很好。", "很好？", ["很好", "很差"], 0, "a"),
                 choice.ChoiceExample("b", "朋友觉得很差。", "很差？", ["喜欢", "很差", "真的"], 1, "b")]
    encoded = choice.encode_choice_split(encoder, questions, "dev", 32, 32)
    with torch.no_grad():
        out = model(collate(encoded))
        # each option's score alone: the option as a one-row question
        alone = [[float(model(collate([{"options": [o, o]}]))["logits"][0, 0]) for o in e["options"]] for e in encoded]
        # the options of a question in another order: the same scores in that order
        reversed_out = model(collate([{"options": e["options"][::-1], "label": 0} for e in encoded]))
    assert out["logits"].shape == (2, 3)
    np.testing.assert_allclose(out["logits"][0, :2].numpy(), alone[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["logits"][1].numpy(), alone[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reversed_out["logits"][1].numpy(), alone[1][::-1], rtol=1e-5, atol=1e-6)
    probabilities = out["logits"].softmax(-1)
    assert probabilities[0, 2] == 0 and torch.allclose(probabilities.sum(-1), torch.ones(2))
    # the paper's loss over the real options: the padded one changes nothing
    expected = (three_classifier_loss(out["fine_logits"][0:1, :2], out["coarse_logits"][0:1, :2], out["logits"][0:1, :2],
                                      torch.tensor([0]), 1.0)["loss"] +
                three_classifier_loss(out["fine_logits"][1:], out["coarse_logits"][1:], out["logits"][1:],
                                      torch.tensor([1]), 1.0)["loss"]) / 2
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
def test_choice_finetuning_learns_and_the_saved_model_predicts_the_same(tmp_path, export):
    from pipeline.finetuning import FinetuneConfig, run
    from pipeline.predict import main as predict

    files = make_choice_files(tmp_path)
    config = FinetuneConfig(model=str(export), train=str(files["train"]), dev=str(files["dev"]), test=str(files["test"]),
                            output=str(tmp_path / "out"), task="choice", seeds=[1], epochs=6.0, lr=4e-3, batch_size=16,
                            max_length=40, patience=3, save_models=True)
    results = run(config)
    seed = json.loads((tmp_path / "out" / "results.json").read_text())["seeds"][0]
    assert seed["dev_curve_columns"] == ["step", "loss", "accuracy"]
    assert results["test"]["accuracy"]["mean"] > 0.9, results["test"]  # chance: 1/3
    assert seed["test"]["examples"] == 100
    task = json.loads((tmp_path / "out" / "models" / "seed1" / "task.json").read_text())
    assert task["task"] == "choice" and task["choices_field"] == "choices" and task["labels"] == []
    output = tmp_path / "pred.jsonl"
    assert predict([str(tmp_path / "out" / "models" / "seed1"), "--input", str(files["test"]), "--output", str(output)]) == 0
    rows = [json.loads(line) for line in output.open(encoding="utf-8")]
    gold = [json.loads(line) for line in files["test"].open(encoding="utf-8")]
    assert [r["id"] for r in rows] == [g["id"] for g in gold]
    assert all(r["option"] == g["choices"][r["answer"]] and abs(sum(r["probabilities"]) - 1) < 1e-4 for r, g in zip(rows, gold))
    right = [choice.label_index(g["label"], g["choices"], "") for g in gold]
    accuracy = np.mean([r["answer"] == k for r, k in zip(rows, right)])
    assert accuracy == pytest.approx(seed["test"]["accuracy"])
    assert seed["test_predictions"] == {r["id"]: r["answer"] for r in rows} and len(seed["dev_predictions"]) == 100
    assert json.loads(output.with_name("pred.jsonl.metrics.json").read_text())["accuracy"] == pytest.approx(accuracy)


# ---------------------------------------------------------------------------------------------
# Cloze (ChID)
# ---------------------------------------------------------------------------------------------
def _chid_rows() -> list[dict]:
    """HF clue/chid rows: passages with #idiom# blanks, shared candidates, answers in the blanks' order."""
    return [{"idx": 0, "candidates": ["很好", "很差", "喜欢"],
             "content": ["我们觉得#idiom000001#，朋友#idiom000002#。", "东西#idiom000003#。"],
             "answers": [{"candidate_id": 0, "text": "很好"}, {"candidate_id": 2, "text": "喜欢"},
                         {"candidate_id": 1, "text": "很差"}]},
            {"idx": 1, "candidates": ["很好", "很差"], "content": ["这个" * 200 + "手机#idiom000004#" + "真的" * 200],
             "answers": [{"candidate_id": 1, "text": "很差"}]}]


def test_chid_rows_give_one_question_per_blank_filled_by_each_candidate(tmp_path, encoder):
    path = tmp_path / "chid.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _chid_rows()), encoding="utf-8")
    examples = choice.read_choice_file(str(path), "context", "question", "choices", "label")
    assert [(e.id, e.label, e.options) for e in examples] == [
        ("#idiom000001#", 0, ["很好", "很差", "喜欢"]), ("#idiom000002#", 2, ["很好", "很差", "喜欢"]),
        ("#idiom000003#", 1, ["很好", "很差", "喜欢"]), ("#idiom000004#", 1, ["很好", "很差"])]
    assert examples[1].question == "我们觉得……，朋友#idiom000002#。"  # the other blank reads as "……"
    assert choice.option_text(examples[1].question, "喜欢", examples[1].blank)[0] == "我们觉得……，朋友喜欢。"
    # CLUE's answer file merged into the rows: {tag: index}
    merged = [{**r, "answer": {a: x["candidate_id"] for a, x in zip(["#idiom000001#", "#idiom000002#", "#idiom000003#"],
                                                                      r["answers"])}} for r in _chid_rows()[:1]]
    for r in merged:
        r.pop("answers")
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged), encoding="utf-8")
    assert [e.label for e in choice.read_choice_file(str(path), "context", "question", "choices", "label")] == [0, 2, 1]
    # a long passage: the window around the filled blank, whatever the limit
    item = choice.encode_choice_split(encoder, examples[3:], "dev", 32, 32)[0]
    for option, built in zip(examples[3].options, item["options"]):
        tokens = built["fine_ids"].tolist()
        assert len(tokens) <= 32 and tokens[0] == CLS_ID and tokens[-1] == SEP_ID
        option_ids = encoder.encode("手机" + option).fine.tolist()
        assert any(tokens[k:k + len(option_ids)] == option_ids for k in range(len(tokens)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**_chid_rows()[0], "answers": [{"candidate_id": 0}]}, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    with pytest.raises(choice.ChoiceDataError, match="3 blanks but 1 answers"):
        choice.read_choice_file(str(bad), "context", "question", "choices", "label")
    bad.write_text(json.dumps({**_chid_rows()[0], "answers": 1}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(choice.ChoiceDataError, match="the answers are '1'; give a list of"):
        choice.read_choice_file(str(bad), "context", "question", "choices", "label")


def test_a_chid_blank_is_filled_where_it_is_and_kept_in_a_passage_of_many_blanks(tmp_path, encoder):
    """Other blanks read as "……" (6 fine tokens for 2 characters): a window of characters lost the filled
    idiom of a blank near the start of such a passage; untagged blanks all filled the first one."""
    filler = "我们今天觉得这个手机"
    rows = [{"candidates": ["很好", "很差", "喜欢"], "content": ["东西#idiom000001#" + filler * 4 + "#idiom000002#" + filler * 4 +
                                                           "#idiom000003#" + filler * 20],
             "answers": [{"candidate_id": 0}, {"candidate_id": 1}, {"candidate_id": 2}]},
            {"candidates": ["很好", "很差", "喜欢"], "content": "我们#idiom#，朋友#idiom#。", "answer": [0, 2]}]
    path = tmp_path / "chid.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    examples = choice.read_choice_file(str(path), "context", "question", "choices", "label")
    assert [choice.option_text(e.question, "喜欢", e.blank)[0] for e in examples[3:]] == \
        ["我们喜欢，朋友……。", "我们……，朋友喜欢。"]
    assert [(e.id, e.label) for e in examples[3:]] == [("1-0", 0), ("1-1", 2)]
    for limit in (32, 128):
        item = choice.encode_choice_split(encoder, examples[:1], "dev", limit, limit)[0]
        sequences = [built["fine_ids"].tolist() for built in item["options"]]
        assert len({tuple(x) for x in sequences}) == 3 and all(len(x) <= limit for x in sequences)
        for option, tokens in zip(examples[0].options, sequences):
            filled = encoder.encode("东西" + option).fine.tolist()
            assert any(tokens[k:k + len(filled)] == filled for k in range(len(tokens))), (limit, option)


def test_chid_fine_tuning_and_prediction_key_the_blanks_by_their_tags(tmp_path, export):
    from pipeline.finetuning import FinetuneConfig, run
    from pipeline.predict import main as predict

    path = tmp_path / "chid.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _chid_rows() * 4), encoding="utf-8")
    results = run(FinetuneConfig(model=str(export), train=str(path), dev=str(path), output=str(tmp_path / "out"),
                                 task="choice", seeds=[1], epochs=1.0, batch_size=8, max_length=32, save_models=True,
                                 tensorboard=False))
    seed = results["seeds"][0]
    tags = ["#idiom000001#", "#idiom000002#", "#idiom000003#", "#idiom000004#"]
    assert sorted(seed["dev_predictions"]) == sorted(f"{t}-{k}" for t in tags for k in range(4))  # repeated rows
    assert predict([str(tmp_path / "out" / "models" / "seed1"), "--input", str(path), "--output",
                    str(tmp_path / "pred.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").open(encoding="utf-8")]
    assert {r["id"]: r["answer"] for r in rows} == seed["dev_predictions"]


def test_a_question_much_longer_than_the_budget_is_encoded_around_the_option(encoder, monkeypatch):
    """Only a window of a long passage is encoded (a ChID row re-encoded its whole passage for every candidate
    of every blank); the sequence is the same as with the whole text encoded."""
    from pipeline import reading

    passage = "我们今天觉得这个手机" * 60 + "#idiom000001#" + "朋友觉得服务很差" * 60
    example = choice.ChoiceExample("1", "", passage, ["很好", "喜欢"], 0, "ex", blank=(600, 613))
    lengths = []
    original = reading.encode_context
    monkeypatch.setattr(reading, "encode_context", lambda enc, text, where: lengths.append(len(text)) or
                        original(enc, text, where))
    windowed = choice.encode_choice_split(encoder, [example], "dev", 24, 24)[0]
    assert lengths and max(lengths) < 6 * 24 * 2 + 200 < len(passage)
    whole = choice.fit_option(None, *_whole(encoder, passage, example, 0), 24, 24)[1]
    assert windowed["options"][0]["fine_ids"][1:-1].tolist() == whole.fine.tolist()


def _whole(encoder, passage, example, k):
    from pipeline import reading

    text, start, end = choice.option_text(passage, example.options[k], example.blank)
    encoded = reading.encode_context(encoder, text, "whole")
    first, last = encoded.token_span(start, end)
    return encoded.enc, first, last
