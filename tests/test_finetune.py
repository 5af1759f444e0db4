"""Fine-tuning: the paper's three-classifier loss, token alignment, bad input, a tiny end-to-end run.

Data is generated here (a tiny Chinese dataset directory whose tokenizers are the real Chinese plugin:
rjieba segmentation + our vocabularies), nothing third-party is copied."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import format as fmt
from data_prep.encode import EncodedText, EncodeError, TextEncoder

POSITIVE = ["很好", "喜欢", "满意", "推荐", "漂亮"]
NEGATIVE = ["很差", "讨厌", "失望", "退货", "难用"]
FILLER = ["这个", "东西", "我们", "今天", "手机", "服务", "质量", "价格", "朋友", "快递", "觉得", "真的", "的", "了", "，"]


def make_tiny_zh_dataset(directory: Path, extra_chars: str = "") -> Path:
    """A dataset directory with only what the tokenizers need (meta.json + both vocabularies)."""
    directory.mkdir(parents=True, exist_ok=True)
    words = POSITIVE + NEGATIVE + FILLER + ["北京", "大学", "北京大学"]
    chars = sorted({c for w in words for c in w} | set("。！？") | set(extra_chars))
    alnum = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)] + list("0123456789")
    fine = fmt.Vocab.from_tokens(alnum + ["##" + a for a in alnum] + chars)
    coarse = fmt.Vocab(fine.tokens + [w for w in words if len(w) > 1 and w not in fine.index])
    fine.save(directory / fmt.FINE_VOCAB_FILE)
    coarse.save(directory / fmt.COARSE_VOCAB_FILE)
    options = {"segmenter": "rjieba", "user_dict": None, "latin_min_count": 5, "max_sentence_chars": 510,
               "min_cjk_fraction": 0.25, "fine_vocab_size": len(fine), "coarse_vocab_size": len(coarse),
               "fine_min_count": 1, "coarse_min_count": 2}
    fmt.write_meta(directory, {"language": "zh", "fine_vocab_size": len(fine), "coarse_vocab_size": len(coarse),
                               "build": {"language": "zh", "language_options": options}})
    return directory


def make_sentiment_files(directory: Path, sizes=(240, 80, 80), seed: int = 0) -> dict[str, Path]:
    """Reviews whose label is decided by one sentiment word among fillers (learnable, not trivial)."""
    rng = random.Random(seed)
    paths = {}
    for split, n in zip(("train", "dev", "test"), sizes):
        path = directory / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for _ in range(n):
                label = rng.choice(["pos", "neg"])
                words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
                words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
                f.write(json.dumps({"text": "".join(words) + "。", "label": label}, ensure_ascii=False) + "\n")
        paths[split] = path
    return paths


@pytest.fixture(scope="module")
def zh_dataset(tmp_path_factory) -> Path:
    return make_tiny_zh_dataset(tmp_path_factory.mktemp("zh") / "dataset")


@pytest.fixture(scope="module")
def encoder(zh_dataset) -> TextEncoder:
    return TextEncoder(zh_dataset)


@pytest.fixture(scope="module")
def tiny_model(zh_dataset, encoder):
    from pipeline.inference import build_backbone
    from pipeline.model import model_recipe

    config = model_recipe("tiny", fine_vocab_size=len(encoder.fine_vocab), coarse_vocab_size=len(encoder.coarse_vocab),
                          hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    return build_backbone(config)


# ---------------------------------------------------------------------------------------------
def test_three_classifier_loss_matches_hand_computation():
    from pipeline.finetuning import three_classifier_loss

    fine = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    coarse = torch.tensor([[1.0, 1.0], [0.5, 0.0]])
    joint = torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1])
    lam = 0.7

    def softmax(row):
        e = [math.exp(x) for x in row]
        return [x / sum(e) for x in e]

    def ce(rows):
        return sum(-math.log(softmax(r)[y]) for r, y in zip(rows, [0, 1])) / 2

    agreement = sum(math.sqrt(sum((a - b) ** 2 for a, b in zip(softmax(f), softmax(c))))
                    for f, c in zip(fine.tolist(), coarse.tolist())) / 2
    expected = ce(fine.tolist()) + ce(coarse.tolist()) + ce(joint.tolist()) + lam * agreement
    out = three_classifier_loss(fine, coarse, joint, labels, lam)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["agreement"].item() == pytest.approx(agreement, rel=1e-6)
    assert agreement > 0.1  # the term matters in this case


def test_classifier_uses_three_heads_for_ambert_and_one_for_bert(tiny_model):
    from pipeline.finetuning import AmbertForClassification, three_classifier_loss
    from pipeline.inference import build_backbone
    from pipeline.model.synthetic import synthetic_batch

    config = tiny_model.config
    batch = synthetic_batch(config.fine_vocab_size, config.coarse_vocab_size, batch_size=3, fine_len=10, coarse_len=7)
    batch["labels"] = torch.tensor([0, 2, 1])
    model = AmbertForClassification(tiny_model, 3, "sequence", dropout=0.0, agreement_weight=0.5).eval()
    out = model(batch)
    assert set(model.heads) == {"fine", "coarse", "joint"}
    hidden = tiny_model.encode(batch)
    joint = model.heads["joint"](torch.cat([hidden["fine_hidden"][:, 0], hidden["coarse_hidden"][:, 0]], -1))
    torch.testing.assert_close(out["logits"], joint)  # predictions come from the concatenation head
    expected = three_classifier_loss(out["fine_logits"], out["coarse_logits"], joint, batch["labels"], 0.5)["loss"]
    torch.testing.assert_close(out["loss"], expected)

    bert = build_backbone(type(config).from_dict({**config.to_dict(), "variant": "bert-fine"}))
    single = AmbertForClassification(bert, 3, "sequence", dropout=0.0).eval()
    out = single(batch)
    assert list(single.heads) == ["fine"]
    logits = single.heads["fine"](bert.encode(batch)["fine_hidden"][:, 0])
    torch.testing.assert_close(out["loss"], torch.nn.functional.cross_entropy(logits, batch["labels"]))


def test_pair_input_has_separators_segments_and_exact_alignment(encoder):
    from pipeline.finetuning import encode_example

    ex = encode_example(encoder, "北京大学很差。", "我们喜欢", 64, 64)
    fine = [encoder.fine_vocab.token(i) for i in ex["fine_ids"]]
    coarse = [encoder.coarse_vocab.token(i) for i in ex["coarse_ids"]]
    assert fine == ["[CLS]", "北", "京", "大", "学", "很", "差", "。", "[SEP]", "我", "们", "喜", "欢", "[SEP]"]
    assert coarse == ["[CLS]", "北京大学", "很差", "。", "[SEP]", "我们", "喜欢", "[SEP]"]
    assert ex["fine_token_types"].tolist() == [0] * 9 + [1] * 5
    assert ex["coarse_token_types"].tolist() == [0] * 5 + [1] * 3
    # every fine token points at the coarse token that covers it; specials at specials
    assert [coarse[c] for c in ex["fine_to_coarse"]] == [
        "[CLS]", "北京大学", "北京大学", "北京大学", "北京大学", "很差", "很差", "。", "[SEP]",
        "我们", "我们", "喜欢", "喜欢", "[SEP]"]


def test_truncation_cuts_at_coarse_boundaries_longest_first(encoder):
    from pipeline.finetuning import build_example

    a = EncodedText(np.arange(10, 20), np.array([30, 31, 32, 33]), np.array([4, 2, 3, 1]))
    b = EncodedText(np.arange(40, 43), np.array([50, 51]), np.array([1, 2]))
    ex = build_example([a, b], max_fine=12, max_coarse=12)  # 9 fine tokens of budget for 13
    f2c = ex["fine_to_coarse"]
    assert len(ex["fine_ids"]) <= 12
    # the long segment lost whole coarse tokens (33 then 32), the short one is intact
    assert ex["coarse_ids"].tolist() == [fmt.CLS_ID, 30, 31, fmt.SEP_ID, 50, 51, fmt.SEP_ID]
    assert ex["fine_ids"].tolist() == [fmt.CLS_ID, *range(10, 16), fmt.SEP_ID, 40, 41, 42, fmt.SEP_ID]
    assert np.bincount(f2c, minlength=len(ex["coarse_ids"])).tolist() == [1, 4, 2, 1, 1, 2, 1]
    single = build_example([a], max_fine=6, max_coarse=6)  # 4 fine: only coarse 30 fits
    assert single["coarse_ids"].tolist() == [fmt.CLS_ID, 30, fmt.SEP_ID]


def test_token_classification_concatenates_each_fine_token_with_its_coarse_token(encoder, tiny_model):
    from pipeline.finetuning import AmbertForClassification, collate, encode_token_example

    # BIES word-segmentation tags per character, as People's Daily gold segmentation gives them.
    words = ["北京大学", "很差", "。"]
    chars = [c for w in words for c in w]
    tags = [t for w in words for t in (["S"] if len(w) == 1 else ["B"] + ["I"] * (len(w) - 2) + ["E"])]
    tag_ids = ["BIES".index(t) for t in tags]
    ex = encode_token_example(encoder, chars, tag_ids, 64, 64)
    assert ex["token_labels"].tolist() == [-100] + tag_ids + [-100]
    ex2 = encode_token_example(encoder, ["我们", "喜欢"], [0, 3], 64, 64)  # word-level tags spread to characters
    assert ex2["token_labels"].tolist() == [-100, 0, 0, 3, 3, -100]
    batch = collate([ex, ex2])
    assert batch["fine_to_coarse"][1].tolist()[-3:] == [-1, -1, -1]  # padding
    model = AmbertForClassification(tiny_model, 4, "token", dropout=0.0).eval()
    out = model(batch)
    hidden = tiny_model.encode(batch)
    i, t = 0, 3  # "大", covered by coarse token 1 ("北京大学")
    assert batch["fine_to_coarse"][i, t].item() == 1
    features = torch.cat([hidden["fine_hidden"][i, t], hidden["coarse_hidden"][i, 1]])
    torch.testing.assert_close(out["logits"][i, t], model.heads["token"](features))
    assert out["logits"].shape == (2, batch["fine_ids"].shape[1], 4)
    assert torch.isfinite(out["loss"])


def test_encode_units_maps_latin_runs_and_english_pieces(encoder):
    enc, owner = encoder.encode_units(["我们", "Abc", "很好"])
    tokens = [encoder.fine_vocab.token(i) for i in enc.fine]
    assert len(tokens) == len(owner) and owner[0] == 0 and owner[-1] == 2
    assert {int(o) for o in owner} == {0, 1, 2}
    with pytest.raises(EncodeError, match="no tokens"):
        encoder.encode_units(["", "  "])


def make_tiny_en_dataset(directory: Path) -> Path:
    """An English dataset directory: WordPiece fine tokenizer + a phrase dictionary (no KenLM run)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece

    directory.mkdir(parents=True, exist_ok=True)
    words = ["the", "new", "york", "times", "is", "big", "city", "prime", "minister", "said", ".", ","]
    pieces = ["bl", "##air", "##s", "##ism", "t", "##o", "##n", "##y"]
    fine = fmt.Vocab.from_tokens(words + pieces)
    coarse = fmt.Vocab.from_tokens(words + ["new_york", "prime_minister"])
    fine.save(directory / fmt.FINE_VOCAB_FILE)
    coarse.save(directory / fmt.COARSE_VOCAB_FILE)
    Tokenizer(WordPiece(dict(fine.index), unk_token=fmt.UNK, continuing_subword_prefix="##")).save(
        str(directory / fmt.FINE_TOKENIZER_FILE))
    (directory / fmt.PHRASES_FILE).write_text("new york\t10\t5.0\nprime minister\t8\t4.0\n", encoding="utf-8")
    options = {"fine_tokenizer": None, "cased": False, "phrases": None, "coarse_min_count": 2,
               "fine_vocab_size": 30522, "coarse_vocab_size": 108167, "fine_min_count": 2}  # requested at build time
    fmt.write_meta(directory, {"language": "en", "fine_vocab_size": len(fine), "coarse_vocab_size": len(coarse),
                               "build": {"language": "en", "language_options": options}})
    return directory


def test_english_text_and_units_use_the_dataset_tokenizers(tmp_path):
    from pipeline.finetuning import encode_example

    en = TextEncoder(make_tiny_en_dataset(tmp_path / "en"))
    enc = en.encode("The New York Times said. Prime Minister Tony Blair is big!")
    fine = [en.fine_vocab.token(i) for i in enc.fine]
    coarse = [en.coarse_vocab.token(i) for i in enc.coarse]
    assert fine == ["the", "new", "york", "times", "said", ".", "prime", "minister", "t", "##o", "##n", "##y",
                    "bl", "##air", "is", "big", "[UNK]"]
    assert coarse == ["the", "new_york", "times", "said", ".", "prime_minister", "[UNK]", "[UNK]", "is", "big", "[UNK]"]
    assert enc.align.tolist() == [1, 2, 1, 1, 1, 2, 4, 2, 1, 1, 1]
    units, owner = en.encode_units(["The", "New", "York", "Blairism"])
    assert [en.fine_vocab.token(i) for i in units.fine] == ["the", "new", "york", "bl", "##air", "##ism"]
    assert owner.tolist() == [0, 1, 2, 3, 3, 3]
    assert [en.coarse_vocab.token(i) for i in units.coarse] == ["the", "new_york", "[UNK]"]
    ex = encode_example(en, "new york", "the city", 16, 16)
    assert [en.coarse_vocab.token(i) for i in ex["coarse_ids"]] == ["[CLS]", "new_york", "[SEP]", "the", "city", "[SEP]"]
    assert ex["fine_to_coarse"].tolist() == [0, 1, 1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def _export(tiny_model, zh_dataset, tmp_path) -> Path:
    from pipeline.inference import save_exported

    return save_exported(tiny_model, zh_dataset, tmp_path / "export")


def _config(model, files, tmp_path, **kw):
    from pipeline.finetuning import FinetuneConfig

    values = dict(model=str(model), train=str(files["train"]), dev=str(files["dev"]), test=str(files["test"]),
                  output=str(tmp_path / "out"), seeds=[1], epochs=1.0, batch_size=16, max_length=32)
    values.update(kw)
    return FinetuneConfig(**values)


def test_progress_lines_between_evaluations_with_the_eta_of_every_seed(tmp_path, zh_dataset, tiny_model, monkeypatch,
                                                                       caplog):
    """Nothing was logged between dev evaluations (once an epoch by default: a whole epoch in silence on
    a real set), and the ETA covered the running seed only."""
    import logging
    import re

    from pipeline import finetuning

    monkeypatch.setattr(finetuning, "PROGRESS_SECONDS", 0.0)  # a line every step
    files = make_sentiment_files(tmp_path, sizes=(64, 8, 8))
    with caplog.at_level(logging.INFO, logger=finetuning.log.name):
        result = finetuning.run(_config(_export(tiny_model, zh_dataset, tmp_path), files, tmp_path, seeds=[1, 2],
                                        batch_size=16))
    lines = [r.getMessage() for r in caplog.records]
    progress = [line for line in lines if " train loss " in line]
    assert [re.match(r"seed (\d) step (\d)/4 ", line).groups() for line in progress] == [
        ("1", "1"), ("1", "2"), ("1", "3"), ("2", "1"), ("2", "2"), ("2", "3")], progress  # step 4 evaluates
    curve = result["seeds"][0]["train_curve"]
    assert f"train loss {curve[1][1]:.4f} (mean of the last 1 steps;" in progress[1], progress[1]
    assert all("with the 1 seed(s) after it" in line for line in progress[:3])
    assert not any("seed(s) after it" in line for line in progress[3:])
    evaluations = [line for line in lines if " dev loss " in line]
    assert len(evaluations) == 2 and "with the 1 seed(s) after it" in evaluations[0], evaluations
    assert "seed(s) after it" not in evaluations[1]


def test_unseen_label_in_dev_is_a_clear_error(tmp_path, zh_dataset, tiny_model):
    from pipeline.finetuning import FinetuneError, run

    files = make_sentiment_files(tmp_path, sizes=(20, 10, 10))
    with files["dev"].open("a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "质量一般", "label": "neutral"}, ensure_ascii=False) + "\n")
    with pytest.raises(FinetuneError, match=r"label\(s\) \['neutral'\] that never occur in the training set"):
        run(_config(_export(tiny_model, zh_dataset, tmp_path), files, tmp_path))
    assert not (tmp_path / "out" / "results.json").exists()


def test_empty_text_and_missing_column_are_clear_errors(tmp_path, zh_dataset, tiny_model):
    from pipeline.finetuning import FinetuneError, run

    files = make_sentiment_files(tmp_path, sizes=(20, 10, 10))
    export = _export(tiny_model, zh_dataset, tmp_path)
    with files["train"].open("a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "   ", "label": "pos"}) + "\n")
    with pytest.raises(FinetuneError, match=r"train.jsonl record 21 is empty"):  # counted from 1, as users count
        run(_config(export, files, tmp_path))
    table = tmp_path / "train.csv"
    table.write_text("text,label\n很好,pos\n ,neg\n", encoding="utf-8")
    with pytest.raises(FinetuneError, match=r"train.csv row 2 is empty"):  # data rows, after the header
        run(_config(export, {**files, "train": table}, tmp_path))
    with pytest.raises(FinetuneError, match=r"has no column 'sentence'.*--text-field"):
        run(_config(export, files, tmp_path, text_field="sentence"))
    with pytest.raises(FinetuneError, match=r"--train: .* does not exist"):
        run(_config(export, {**files, "train": tmp_path / "nope.jsonl"}, tmp_path))


def test_compressed_data_files_read_as_the_plain_ones(tmp_path):
    """The shared labeled sets ship as .jsonl.xz: fine-tuning refused them ("unknown file type '.xz'")."""
    import bz2
    import gzip
    import lzma

    from pipeline.finetuning import FinetuneError, load_table

    files = make_sentiment_files(tmp_path, sizes=(20, 4, 4))
    plain = load_table(str(files["train"]))
    data = files["train"].read_bytes()
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in plain), encoding="utf-8")
    for suffix, compress in ((".xz", lzma.compress), (".gz", gzip.compress), (".bz2", bz2.compress)):
        path = tmp_path / f"train.jsonl{suffix}"
        path.write_bytes(compress(data))
        table = load_table(str(path))
        assert table.to_list() == plain.to_list()
        path = tmp_path / f"t.csv{suffix}"
        path.write_bytes(compress(csv.read_bytes()))
        assert load_table(str(path)).to_list() == plain.to_list()
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(data + b"[1, 2]\n"))
    with pytest.raises(FinetuneError, match=r"bad.jsonl.gz cannot be read as jsonl \(line 21 holds a JSON list"):
        load_table(str(bad))
    (tmp_path / "e.jsonl.xz").write_bytes(lzma.compress(b"\n"))
    with pytest.raises(FinetuneError, match=r"e.jsonl.xz is empty"):
        load_table(str(tmp_path / "e.jsonl.xz"))
    (tmp_path / "cut.jsonl.xz").write_bytes(lzma.compress(data)[:40])
    with pytest.raises(FinetuneError, match=r"cut.jsonl.xz cannot be read \((EOFError|LZMAError)"):
        load_table(str(tmp_path / "cut.jsonl.xz"))
    with pytest.raises(FinetuneError, match=r"unknown file type '.xz'.*e.g. train.jsonl.xz"):
        load_table(str(tmp_path / "data.parquet.xz"))


def test_unreadable_files_bad_numbers_and_wrong_token_fields_are_clear_errors(tmp_path, zh_dataset, tiny_model):
    from pipeline.finetuning import FinetuneError, run

    files = make_sentiment_files(tmp_path, sizes=(20, 10, 10))
    export = _export(tiny_model, zh_dataset, tmp_path)
    empty, broken = tmp_path / "empty.jsonl", tmp_path / "broken.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    broken.write_text(files["train"].read_text(encoding="utf-8") + "{not json\n", encoding="utf-8")
    with pytest.raises(FinetuneError, match=r"empty.jsonl is empty: no examples"):
        run(_config(export, {**files, "train": empty}, tmp_path))
    with pytest.raises(FinetuneError, match=r"broken.jsonl cannot be read as jsonl \(line 21 is not JSON: .*\); fix the file"):
        run(_config(export, {**files, "train": broken}, tmp_path))  # the line an editor shows, not a byte offset
    for field, value, message in (("classifier_dropout", 2.0, r"classifier-dropout: must be in \[0, 1\)"),
                                  ("patience", -1, r"patience: must be >= 0"),
                                  ("max_train_examples", -1, r"max-train-examples: must be >= 0")):
        with pytest.raises(FinetuneError, match=message):
            run(_config(export, files, tmp_path, **{field: value}))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FinetuneError, match=r"afile is an existing file; give a directory"):
        run(_config(export, files, tmp_path, output=str(afile)))
    tagging = {}
    for split in ("train", "dev", "test"):
        tagging[split] = tmp_path / f"tag_{split}.jsonl"
        rows = [{"tokens": ["我们", "喜欢"], "tags": ["B", "E"]}] * 4
        if split == "train":
            rows = rows + [{"tokens": ["我们", "喜欢"], "tags": "BE"}]
        tagging[split].write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    with pytest.raises(FinetuneError, match=r"tag_train.jsonl record 5: 'tags' holds str, not a list"):
        run(_config(export, tagging, tmp_path, task="token"))


def test_model_and_dataset_with_different_vocabularies_are_refused(tmp_path, zh_dataset, tiny_model):
    from pipeline.finetuning import FinetuneError, resolve_pretrained, run

    files = make_sentiment_files(tmp_path, sizes=(20, 10, 10))
    export = _export(tiny_model, zh_dataset, tmp_path)
    other = make_tiny_zh_dataset(tmp_path / "other", extra_chars="天地")  # two more characters
    with pytest.raises(FinetuneError, match=r"fine_vocab.txt differs from the one model .* was pre-trained with"):
        run(_config(export, files, tmp_path, dataset=str(other)))
    # an export that lost its weights or config was called "a pre-training dataset" (it holds a meta.json)
    import shutil

    for name in ("model.safetensors", "config.json"):
        damaged = tmp_path / f"damaged_{name}"
        shutil.copytree(export, damaged)
        (damaged / name).unlink()
        with pytest.raises(FinetuneError, match=rf"damaged_{name} is an exported model missing its {name}: export it "
                                                rf"again from its checkpoint \(`python -m pipeline.convert export"):
            resolve_pretrained(str(damaged))
    # A training checkpoint records its dataset: another dataset's vocabularies are refused before
    # any weight is read.
    checkpoint = tmp_path / "checkpoints" / "step_00000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text(json.dumps({"step": 10, "dataset_path": str(zh_dataset),
                                                     "model_config": tiny_model.config.to_dict()}))
    with pytest.raises(FinetuneError, match="token ids would mean other tokens"):
        resolve_pretrained(str(checkpoint), str(other))
    # ... and once its dataset has moved away: the vocabularies' fingerprints its marker records (any
    # dataset whose vocabularies had the same sizes was taken without a word)
    from data_prep.format import PairedDataset
    from pipeline.checkpoint import vocab_fingerprints

    moved = tmp_path / "moved" / "step_00000010"
    moved.mkdir(parents=True)
    (moved / "COMPLETE").write_text(json.dumps({"step": 10, "dataset_path": str(tmp_path / "gone"),
                                                "vocab_fingerprints": vocab_fingerprints(PairedDataset(zh_dataset)),
                                                "model_config": tiny_model.config.to_dict()}))
    with pytest.raises(FinetuneError, match=r"--dataset .*other: its fine_vocab.txt \(fingerprint \w+\) is not the one model "
                                            r".* was pre-trained with \(fingerprint \w+, in the dataset .*gone, which is no "
                                            r"longer there\): token ids would mean other tokens"):
        resolve_pretrained(str(moved), str(other))
    # the right vocabularies pass this check, and the next one finds no weights (there are none here)
    with pytest.raises(FinetuneError, match=r"step_00000010 has no \*mp_rank_00_model_states.pt: not a DeepSpeed "
                                            r"checkpoint") as info:
        resolve_pretrained(str(moved), str(zh_dataset))
    assert "token ids would mean other tokens" not in str(info.value)
    # a universal checkpoint (`convert universal`): was "cannot be read ... one of its files is missing or
    # damaged"; converting it again failed the same way
    universal = tmp_path / "universal" / "step_00000010"
    universal.mkdir(parents=True)
    (universal / "COMPLETE").write_text(json.dumps({"step": 10, "dataset_path": str(zh_dataset), "universal": True,
                                                    "converted_from": str(checkpoint),
                                                    "model_config": tiny_model.config.to_dict()}))
    with pytest.raises(FinetuneError, match=r"step_00000010 is a universal checkpoint .*export it first, `python -m "
                                            r"pipeline.convert export .*step_00000010 OUT`, and pass --model OUT"):
        resolve_pretrained(str(universal))
    from pipeline.convert import ConvertError, to_universal

    with pytest.raises(ConvertError, match=r"is already a universal checkpoint \(converted from .*step_00000010\): a run "
                                           r"continues from it at any TP / data-parallel size as it is"):
        to_universal(universal, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    # Same vocabulary files, but a model built for other sizes.
    from pipeline.inference import ExportError, check_vocabularies

    with pytest.raises(ExportError, match="vocabularies of 300 fine / 500 coarse entries"):
        check_vocabularies(type(tiny_model.config)(fine_vocab_size=300, coarse_vocab_size=500), 10, 20, "x")


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
def test_tiny_end_to_end_finetune_beats_chance(tmp_path, zh_dataset, tiny_model):
    from pipeline.finetuning import run

    files = make_sentiment_files(tmp_path, sizes=(320, 80, 120))
    export = _export(tiny_model, zh_dataset, tmp_path)
    results = run(_config(export, files, tmp_path, seeds=[1, 2], epochs=3.0, lr=2e-3, batch_size=16, patience=2))
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["labels"] == ["neg", "pos"] and saved["variant"] == "ambert"
    assert len(saved["seeds"]) == 2
    for seed in saved["seeds"]:
        assert seed["test"]["examples"] == 120
        assert set(seed["test"]["per_class"]) == {"neg", "pos"}
        assert seed["train_curve"] and seed["dev_curve"]
    test = results["test"]["accuracy"]
    assert test["mean"] > 0.8, test  # chance is ~0.5
    assert "std" in test and len(test["values"]) == 2
    # The same curves in TensorBoard, one run per seed.
    for seed in saved["seeds"]:
        board, = (tmp_path / "out" / "tensorboard").glob(f"*-seed{seed['seed']}")
        scalars = _tensorboard_scalars(board)
        assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in seed["train_curve"]]
        np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [v for _, v in seed["train_curve"]], rtol=1e-6)
        assert [s for s, _ in scalars["dev/macro_f1"]] == [row[0] for row in seed["dev_curve"]]
        np.testing.assert_allclose([v for _, v in scalars["dev/macro_f1"]], [row[3] for row in seed["dev_curve"]], rtol=1e-6)
        assert [s for s, _ in scalars["dev/accuracy"]] == [row[0] for row in seed["dev_curve"]]
        assert len(scalars["train/lr"]) == len(seed["train_curve"]) and scalars["train/lr"][0][1] > 0


def _tensorboard_scalars(directory) -> dict[str, list[list[float]]]:
    """tag -> [[step, value], ...] of every event file in ``directory``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [[e.step, e.value] for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# ---------------------------------------------------------------------------------------------
# DeepSpeed (data parallel) == single process
# ---------------------------------------------------------------------------------------------
def _deepspeed_finetune(values: dict) -> list:
    from pipeline.finetuning import FinetuneConfig, run

    results = run(FinetuneConfig(**values))
    return [results["seeds"][0]["train_curve"], results["seeds"][0]["dev"]["accuracy"]]


def test_deepspeed_data_parallel_matches_single_process(tmp_path, zh_dataset, tiny_model):
    from dataclasses import asdict

    from pipeline.finetuning import run
    from pipeline.inference import build_backbone, save_exported
    from tests.distributed import run_distributed

    files = make_sentiment_files(tmp_path, sizes=(64, 16, 16))
    # No dropout anywhere, so both runs compute the same function (dropout streams differ per rank).
    export = save_exported(build_backbone(tiny_model.config), zh_dataset, tmp_path / "export")
    single = _config(export, files, tmp_path, epochs=2.0, lr=1e-3, batch_size=16, classifier_dropout=0.0,
                     eval_every=2, patience=0)
    reference = run(single)["seeds"][0]
    distributed = asdict(single)
    distributed.update(deepspeed=True, output=str(tmp_path / "out-ds"))
    ranks = run_distributed(_deepspeed_finetune, world_size=2, args=(distributed,), init=None, timeout=400)
    for curve, dev_accuracy in ranks:
        assert [s for s, _ in curve] == [s for s, _ in reference["train_curve"]]
        np.testing.assert_allclose([v for _, v in curve], [v for _, v in reference["train_curve"]], rtol=1e-5)
        assert dev_accuracy == reference["dev"]["accuracy"]
    assert json.loads((tmp_path / "out-ds" / "results.json").read_text())["config"]["deepspeed"] is True
    boards = list((tmp_path / "out-ds" / "tensorboard").iterdir())  # rank 0's only
    assert len(boards) == 1 and boards[0].name.endswith("-seed1"), boards
    assert len(list(boards[0].iterdir())) == 1
    assert [s for s, _ in _tensorboard_scalars(boards[0])["train/lr"]] == [s for s, _ in reference["train_curve"]]


def test_study_quick_shrinks_defaults_but_keeps_explicit_values():
    from pipeline.study import parse_args

    quick = parse_args(["--quick"])
    quick.apply_quick()
    assert (quick.pretrain_steps, quick.train_examples, quick.max_length) == (300, 1000, 64)
    explicit = parse_args(["--quick", "--pretrain-steps", "1000", "--train-examples", "4000"])
    explicit.apply_quick()
    assert (explicit.pretrain_steps, explicit.train_examples, explicit.eval_examples) == (1000, 4000, 300)
    same_as_default = parse_args(["--quick", "--pretrain-steps", "2000"])  # explicit, equal to the default
    same_as_default.apply_quick()
    assert (same_as_default.pretrain_steps, same_as_default.train_examples) == (2000, 1000)
