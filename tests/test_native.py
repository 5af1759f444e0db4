"""data_prep._native (the C string numbering, sentence split, gather and jieba-c segmenter, compiled by
`pip install -e .`) against the pure-Python path it replaces and against jieba: the same ids for any
strings, the same shard segmentation and count sums, jieba's words, and a Chinese build byte-identical
with and without it (AMBERT_PURE_PYTHON=1)."""

import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_prep import languages
from data_prep.languages import PackedCounter, StringNumbering, sum_count_tables

REPO = Path(__file__).resolve().parents[1]
native = languages.load_native()
needs_native = pytest.mark.skipif(native is None and not os.environ.get("CI"),
                                  reason="data_prep._native is not compiled (run `bash launchers/setup.sh`)")


def test_the_extension_is_built_where_ci_runs():
    """The set-up compiles it (a C compiler is installed for KenLM anyway): on CI it must be there, or
    every speed figure of the Chinese build would silently be the slower path's."""
    import importlib

    try:
        module = importlib.import_module("data_prep._native")
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"data_prep._native is missing ({exc}): launchers/setup.sh should have compiled it")
        pytest.skip(f"data_prep._native is not compiled here ({exc})")
    assert module.VERSION == languages.NATIVE_VERSION, (
        f"data_prep._native is stale (version {module.VERSION}, _native.c says {languages.NATIVE_VERSION}): "
        f"run `pip install -e .` again")
    assert callable(module.WordNumbers)
    if os.environ.get("AMBERT_PURE_PYTHON", "") in ("", "0"):
        assert languages.load_native() is module  # the build uses it


def test_a_module_of_another_version_is_not_used(monkeypatch):
    """A module compiled from an older _native.c (a checkout updated without re-running the set-up)
    is skipped, not called with arguments it does not know: the Python path runs instead."""
    import types

    fake = types.ModuleType("data_prep._native")
    fake.VERSION = languages.NATIVE_VERSION - 1
    fake.WordNumbers = None
    monkeypatch.setitem(sys.modules, "data_prep._native", fake)
    monkeypatch.delenv("AMBERT_PURE_PYTHON", raising=False)
    assert languages.load_native() is None
    fake.VERSION = languages.NATIVE_VERSION
    assert languages.load_native() is fake


def _strings(rng: random.Random, n: int) -> list[str]:
    """Strings of every kind the cache treats differently: 1-4 BMP characters (packed), longer ones,
    ones with a character above U+FFFF or a NUL (dict only), the empty string, Latin-1 only."""
    alphabet = ["中", "国", "人", "a", "b", "1", "\x00", "\U00020000", "é", " ", "\n", "##", "\uffff", "\u0100"]
    out = []
    for _ in range(n):
        k = rng.choice([0, 1, 1, 2, 2, 2, 3, 4, 5, 7])
        out.append("".join(rng.choice(alphabet) for _ in range(k)))
    return out


@needs_native
def test_numbering_equals_the_dict_path_for_any_strings():
    rng = random.Random(0)
    batches = [_strings(rng, n) for n in (0, 1, 50, 3000, 20000, 7)]
    fast, slow = StringNumbering(native), StringNumbering(False)
    assert fast._c is not None and slow._c is None
    for batch in batches:
        # fresh string objects each time (equal, not identical), as a segmenter returns them
        a, b = fast([s.encode().decode() for s in batch]), slow(batch)
        assert a.dtype == b.dtype == np.int64
        assert a.tolist() == b.tolist()
    assert dict(fast.index) == dict(slow.index) and len(fast) == len(slow)
    assert sorted(fast.index.values()) == list(range(len(fast)))  # first-seen order, no gaps
    # the table grows past its first capacity (65,536 slots, half full) and keeps every id
    many = [chr(0x4E00 + i // 300) + chr(0x4E00 + i % 300) for i in range(80_000)]
    ids = fast(many)
    assert fast(list(reversed(many))).tolist() == ids[::-1].tolist()
    assert [fast.index[w] for w in many[:1000]] == ids[:1000].tolist()


def test_joined_numbering_equals_the_numbering_of_the_split_strings():
    """StringNumbering.joined(text, sep) == numbering text.split(sep), with the strings numbered anew
    listed in id order (the encoding's word memo without the extension; TokenIndex.number_joined is
    held to it below)."""
    rng = random.Random(4)
    numbering, reference = StringNumbering(native), StringNumbering(False)
    for n in (1, 40, 3000, 2, 500):
        strings = [s.replace("\x1f", "") for s in _strings(rng, n)] + [""]
        text = "\x1f".join(strings)
        seen = len(reference)
        expected = reference(text.split("\x1f")).tolist()
        new_expected = [w for w in dict.fromkeys(text.split("\x1f")) if reference.index[w] >= seen]
        ids, new = numbering.joined(text, "\x1f")
        assert ids.tolist() == expected and new == new_expected
    assert dict(numbering.index) == dict(reference.index)


@needs_native
def test_numbering_sees_words_added_to_the_dict_by_python():
    """The dict stays the truth: a word the Python side added (``index[word]`` of the defaultdict) is
    found by the C table with its id, and the next new word gets the next id."""
    fast = StringNumbering(native)
    fast(["中国", "人"])
    assert fast.index["abc"] == 2 and fast.index["人民"] == 3  # added through the defaultdict
    assert fast(["人民", "abc", "中国", "新"]).tolist() == [3, 2, 0, 4]


@needs_native
def test_numbering_refuses_bad_arguments():
    table = native.WordNumbers({})
    with pytest.raises(TypeError, match="str"):
        table.number(["a", 1], np.empty(2, dtype=np.int64))
    with pytest.raises(ValueError, match="room for every word"):
        table.number(["a", "b"], np.empty(1, dtype=np.int64))
    with pytest.raises(TypeError):
        native.WordNumbers([])  # not a dict
    with pytest.raises(RuntimeError, match="not initialised"):
        native.WordNumbers.__new__(native.WordNumbers).number(["a"], np.empty(1, dtype=np.int64))


@needs_native
def test_count_sums_and_shard_segmentation_equal_the_pure_path(monkeypatch):
    from data_prep import chinese
    from data_prep.chinese import make_segmenter, segment_shard
    from data_prep.demo import peoples_daily_gold
    from data_prep.normalize import normalize_text, split_sentences

    rng = random.Random(1)
    tables = [PackedCounter.pack(Counter({s: rng.randint(1, 9) for s in _strings(rng, 500) if "\x00" not in s}))
              for _ in range(5)]
    results = []
    for mod in (native, None):
        monkeypatch.setattr(languages, "_native", mod)
        total = sum_count_tables([*tables, PackedCounter.pack(Counter()), PackedCounter.pack(Counter({"": 4}))])
        results.append((total.keys, total.values.tolist()))
    assert results[0] == results[1] and len(results[0][1]) > 500
    with pytest.raises(ValueError, match="table 0: its keys and its 2 values do not pair up"):
        native.sum_tables(["a\0b\0c"], [np.array([1, 2])])
    with pytest.raises(TypeError, match="values must be a contiguous array of signed 8-byte integers"):
        native.sum_tables(["a"], [np.array([1.0])])

    docs = ["".join(words) for words in peoples_daily_gold(600)] + ["Windows 98和iPhone6s", "C##x 和 ##b", "ab12.5%cd abc中文"]
    sentences = [s for d in docs for s in split_sentences(normalize_text(d))]
    outs = []
    for mod, name in ((native, "jieba-c"), (native, "rjieba"), (None, "rjieba")):  # jieba-c: words numbered in C
        seg = make_segmenter(name)
        monkeypatch.setattr(languages, "_native", mod)
        table = chinese.WordIds()  # one table over two shards, as a worker keeps it
        outs.append([(w, i.tolist(), n.tolist()) for w, i, n in
                     (segment_shard(seg, part, table=table) for part in (sentences[:900], sentences[900:]))])
    assert outs[0] == outs[1] == outs[2]


@needs_native
@pytest.mark.parametrize("id_type", [np.int32, np.int64])
def test_gather_words_equals_the_per_stream_gathers(id_type):
    """gather_words (a shard's tokens from the memo's per-word blocks: fine ids, coarse ids,
    alignments) writes what three concat_ranges gathers give, and each sentence's token counts; bad
    ids, slots, blocks, sentence sizes and short outputs are refused with a message instead of
    reading or writing outside the arrays."""
    from data_prep.languages import concat_ranges

    rng = np.random.default_rng(5)
    words = 400
    nf = rng.integers(1, 6, words).astype(np.int64)
    nc = np.minimum(nf, rng.integers(1, 4, words)).astype(np.int64)
    fine = rng.integers(0, 2**31, int(nf.sum())).astype(np.int32)
    coarse = rng.integers(0, 2**31, int(nc.sum())).astype(np.int32)
    align = rng.integers(1, 5, int(nc.sum())).astype(np.int32)
    fs, cs = np.cumsum(nf) - nf, np.cumsum(nc) - nc
    blocks = [np.concatenate([fine[fs[k]:fs[k] + nf[k]], coarse[cs[k]:cs[k] + nc[k]], align[cs[k]:cs[k] + nc[k]]])
              for k in range(words)]
    order = rng.permutation(words)  # blocks stored in another order than the words
    data = np.concatenate([blocks[k] for k in order])
    start = np.empty(words, dtype=np.int64)
    start[order] = np.cumsum([len(blocks[k]) for k in order]) - [len(blocks[k]) for k in order]
    heads = np.column_stack([start, nf | (nc << 32)]).ravel()
    slots = rng.permutation(words).astype(np.int64)  # shard-local id -> memo word
    ids = rng.integers(0, words, 6000).astype(id_type)
    sentence_words = np.array([0, 1, 2999, 0, 3000, 0], dtype=np.int64)
    k = slots[ids.astype(np.int64)]
    f_src, c_src = concat_ranges(fs[k], nf[k]), concat_ranges(cs[k], nc[k])
    out = [np.empty(len(f_src), np.int32), np.empty(len(c_src), np.int32), np.empty(len(c_src), np.int32),
           np.empty(6, np.int64), np.empty(6, np.int64)]
    assert native.gather_words(heads, data, slots, ids, sentence_words, *out) is None
    assert out[0].tolist() == fine[f_src].tolist()
    assert out[1].tolist() == coarse[c_src].tolist() and out[2].tolist() == align[c_src].tolist()
    bounds = np.concatenate([[0], np.cumsum(sentence_words)])
    assert out[3].tolist() == [int(nf[k[a:b]].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
    assert out[4].tolist() == [int(nc[k[a:b]].sum()) for a, b in zip(bounds[:-1], bounds[1:])]

    def call(**change):
        args = dict(heads=heads, data=data, slots=slots, ids=ids, sentence_words=sentence_words, fine=out[0],
                    coarse=out[1], align=out[2], fine_lengths=out[3], coarse_lengths=out[4])
        native.gather_words(*{**args, **change}.values())

    with pytest.raises(IndexError, match="word id 400 is outside slots"):
        call(ids=np.where(np.arange(len(ids)) == 77, 400, ids).astype(id_type))
    with pytest.raises(IndexError, match="word id -1 is outside slots"):
        call(ids=np.where(np.arange(len(ids)) == 5000, -1, ids).astype(id_type))
    with pytest.raises(IndexError, match="slot 400 is outside heads"):
        call(slots=np.where(slots == slots[ids[0]], 400, slots))
    beyond = heads.copy()
    beyond[2 * k[100]] = len(data) - 1  # a block that would end past the data
    with pytest.raises(IndexError, match=f"the block of word {k[100]} .* is outside data"):
        call(heads=beyond)
    with pytest.raises(ValueError, match="more than the"):
        call(sentence_words=sentence_words + 1)
    with pytest.raises(ValueError, match="gathered 5999 of 6000 ids"):
        call(sentence_words=np.array([0, 1, 2999, 0, 2999, 0], dtype=np.int64))
    with pytest.raises(ValueError, match="no room"):
        call(fine=out[0][:-1])
    with pytest.raises(ValueError, match="same length"):
        call(align=out[2][:-1])
    with pytest.raises(ValueError, match="one entry per sentence"):
        call(fine_lengths=out[3][:-1])
    with pytest.raises(TypeError, match="data must be a contiguous array of signed 4-byte"):
        call(data=data.astype(np.int64))


@needs_native
@pytest.mark.parametrize("value_type,count_type", [(np.int32, np.int32), (np.int64, np.int32), (np.int32, np.int64)])
def test_gather_ranges_equals_the_numpy_gather(value_type, count_type):
    """gather_ranges (the encoding's per-word token copy) writes what concat_ranges + take gives, for
    either integer width; bad indices, a short out, mixed widths and non-integer arrays are refused
    with a message instead of reading or writing outside the arrays."""
    from data_prep.languages import concat_ranges

    rng = np.random.default_rng(4)
    counts = rng.integers(0, 5, 300).astype(count_type)
    starts = np.cumsum(counts, dtype=np.int64) - counts
    values = rng.integers(-2**31, 2**31, int(counts.sum())).astype(value_type)
    tokens = rng.integers(0, 300, 5000).astype(np.int64)
    expected = values[concat_ranges(starts[tokens], counts[tokens].astype(np.int64))]
    out = np.full(len(expected) + 3, 7, dtype=value_type)
    assert native.gather_ranges(values, starts, counts, tokens, out) == len(expected)
    assert out[:len(expected)].tolist() == expected.tolist() and out[len(expected):].tolist() == [7, 7, 7]
    assert native.gather_ranges(values, starts, counts, tokens[:0], out[:0]) == 0
    with pytest.raises(IndexError, match="token 300 is outside starts"):
        native.gather_ranges(values, starts, counts, np.array([0, 300]), out)
    with pytest.raises(IndexError, match="token -1 is outside starts"):
        native.gather_ranges(values, starts, counts, np.array([-1]), out)
    bad = starts.copy()
    bad[5] = len(values)
    with pytest.raises(IndexError, match="outside values"):
        native.gather_ranges(values, bad, np.ones_like(counts), np.array([5]), out)
    with pytest.raises(ValueError, match="no room"):
        native.gather_ranges(values, starts, counts, tokens, out[: len(expected) - 1])
    with pytest.raises(TypeError, match="same width"):
        native.gather_ranges(values, starts, counts, tokens, out.astype(np.int64 if value_type == np.int32 else np.int32))
    with pytest.raises(TypeError, match="out must be a contiguous array of signed 4- or 8-byte integers"):
        native.gather_ranges(values, starts, counts, tokens, out.astype(np.int16))
    with pytest.raises(TypeError, match="starts must be a contiguous array of signed 8-byte integers"):
        native.gather_ranges(values, starts.astype(np.float64), counts, tokens, out)
    with pytest.raises(ValueError, match="same length"):
        native.gather_ranges(values, starts, counts[:-1], tokens, out)
    with pytest.raises((TypeError, ValueError, BufferError)):
        native.gather_ranges(values, starts, counts, tokens[::2], out)  # not contiguous


@needs_native
def test_token_index_lookups_and_back_offs_equal_the_dict_path():
    """TokenIndex (the encoding's coarse-vocabulary lookups in C) gives dict.get's id of every word and
    ChineseLanguage._backoff_plain's tokens for every word (forward longest match of at most max_chars
    characters, else the single character or [UNK]), for words over BMP and astral characters, the
    empty word, and tokens that share prefixes; bad arguments are refused with a message."""
    from types import SimpleNamespace

    from data_prep import format as fmt
    from data_prep.chinese import Chinese

    rng = random.Random(5)
    alphabet = ["中", "国", "人", "民", "的", "\uffff", "\u0100", "\U0002000b", "\U0010ffff", "a"]
    tokens = list(fmt.SPECIAL_TOKENS) + sorted({"".join(rng.choices(alphabet, k=rng.randint(1, 6))) for _ in range(400)})
    tokens = [t for t in tokens if t != "的"]  # a character that is no token: [UNK]
    index = native.TokenIndex(tokens)
    assert index.size == len(tokens)
    ids = {t: i for i, t in enumerate(tokens)}
    words = ["".join(rng.choices(alphabet, k=rng.randint(0, 12))) for _ in range(3000)] + tokens[:50] + [""]
    cps = np.frombuffer("".join(words).encode("utf-32-le"), dtype=np.uint32)
    lens = np.array([len(w) for w in words], dtype=np.int64)
    out = np.empty(len(words), dtype=np.int64)
    index.lookup(cps, lens, out, -7)
    assert out.tolist() == [ids.get(w, -7) for w in words]
    assert (out >= 0).sum() > 100 and (out < 0).sum() > 100
    for max_chars in (1, 3, 6):
        python = SimpleNamespace(coarse_vocab=SimpleNamespace(index=ids), max_coarse_chars=max_chars)
        expected = [Chinese._backoff_plain(python, w) for w in words]
        got_ids, got_align = np.full(len(cps), -9, dtype=np.int64), np.full(len(cps), -9, dtype=np.int64)
        counts = np.empty(len(words), dtype=np.int64)
        n = index.backoff(cps, lens, max_chars, fmt.UNK_ID, got_ids, got_align, counts)
        assert n == sum(len(i) for i, _ in expected) and (got_ids[n:] == -9).all()
        assert got_ids[:n].tolist() == [t for i, _ in expected for t in i]
        assert got_align[:n].tolist() == [a for _, al in expected for a in al]
        assert counts.tolist() == [len(i) for i, _ in expected]
    assert fmt.UNK_ID in got_ids[:n] and (got_align[:n] > 1).sum() > 100
    with pytest.raises(TypeError, match="cps must be a contiguous array of uint32"):
        index.lookup(cps.astype(np.int64), lens, out, -1)
    with pytest.raises(ValueError, match="runs past the .* code points"):
        index.lookup(cps[:-1], lens, out, -1)
    with pytest.raises(ValueError, match="room for every word"):
        index.lookup(cps, lens, out[:-1], -1)
    with pytest.raises(ValueError, match="room for every code point"):
        index.backoff(cps, lens, 3, 1, got_ids[:-1], got_align, counts)
    with pytest.raises(ValueError, match="max_chars"):
        index.backoff(cps, lens, 0, 1, got_ids, got_align, counts)
    with pytest.raises(TypeError, match="tokens must be str"):
        native.TokenIndex(["a", 1])


@needs_native
def test_token_index_numbers_joined_words_as_string_numbering_does():
    """TokenIndex.number_joined (the encoding's per-worker word memo in C) gives every word of each
    joined batch StringNumbering.joined's id (new words numbered in order of first appearance, across
    batches and through many table growths), and returns the new words' code points and lengths;
    the empty word, astral characters and a one-word batch included; bad arguments refused."""
    rng = random.Random(11)
    alphabet = ["中", "国", "人", "\uffff", "\u0100", "\U0002000b", "\U0010ffff", "a", "#"]
    index, python = native.TokenIndex([]), StringNumbering()
    vocab = ["".join(rng.choices(alphabet, k=rng.randint(0, 7))) for _ in range(20000)]
    total_new = 0
    for batch in range(60):
        words = rng.sample(vocab, rng.randint(1, 600)) if batch else [""]
        text = "\x1f".join(words)
        expected, expected_new = python.joined(text, "\x1f")
        out = np.full(len(words) + 3, -9, dtype=np.int64)
        n, first, cps, lens = index.number_joined(text, "\x1f", out)
        assert (n, first) == (len(words), total_new) and (out[n:] == -9).all()
        assert out[:n].tolist() == expected.tolist()
        lens = np.frombuffer(lens, dtype=np.int64)
        assert lens.tolist() == [len(w) for w in expected_new]
        assert cps == "".join(expected_new).encode("utf-32-le")
        total_new += len(expected_new)
        assert index.size == len(python) == total_new
    assert total_new > 5000  # (the table grew from 16 slots to 16384)
    with pytest.raises(ValueError, match="room for every word"):
        index.number_joined("a\x1fb", "\x1f", np.empty(1, dtype=np.int64))
    with pytest.raises(ValueError, match="sep must be one character"):
        index.number_joined("a", "", np.empty(1, dtype=np.int64))
    assert index.size == total_new  # nothing added by a refused call


@pytest.mark.slow
@needs_native
def test_chinese_build_is_byte_identical_without_the_extension(tmp_path):
    """The demo build (People's Daily, 2 workers) with the extension (its default segmenter: jieba-c)
    and with AMBERT_PURE_PYTHON=1 (rjieba): every file but meta.json is byte-identical."""
    text = tmp_path / "pd.txt"
    from data_prep.demo import peoples_daily_gold

    text.write_text("".join("".join(w) + "\n" for w in peoples_daily_gold(4000)), encoding="utf-8")
    outs = {}
    for name, pure in (("native", "0"), ("pure", "1")):
        out = tmp_path / name
        env = {**os.environ, "AMBERT_PURE_PYTHON": pure}
        subprocess.run([sys.executable, str(REPO / "data_prep" / "build.py"), "--lang", "zh", "--input", str(text),
                        "--text-mode", "line", "--output", str(out), "--workers", "2", "--shard-documents", "700"],
                       check=True, env=env, capture_output=True, timeout=300)
        outs[name] = out
    files = sorted(p.name for p in outs["native"].iterdir())
    assert files == sorted(p.name for p in outs["pure"].iterdir()) and "train_fine.bin" in files
    for name in files:
        if name != "meta.json":
            assert (outs["native"] / name).read_bytes() == (outs["pure"] / name).read_bytes(), name


@needs_native
def test_sentence_split_equals_the_regular_expression_split(monkeypatch):
    """split_sentences_batch through the C scan and through the pure path (one substitution over the
    batch) == the per-document regular-expression split, with every sentence end, closer, whitespace
    (stripped with str.strip's Unicode set), line breaks, NULs, characters of all three string kinds
    and sentences over the limit (cut at commas, else hard)."""
    from data_prep.normalize import split_sentences, split_sentences_batch

    pool = list("。！？!?…. \n”’」』）)]】\"'》，,、；;：:ab中文字x\u2028\x1c\u3000\xa0é\U00020000\x00") + ["  ", "Mr. X", "..."]
    rng = random.Random(5)
    docs = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 60))) for _ in range(4000)] + ["", "。", "a" * 40]
    for limit in (4, 9, 512):
        expected = [split_sentences(d, limit) for d in docs]
        assert split_sentences_batch(docs, limit) == expected  # C
        monkeypatch.setattr(languages, "_native", None)
        assert split_sentences_batch(docs, limit) == expected  # pure
        monkeypatch.setattr(languages, "_native", native)
    with pytest.raises(TypeError, match="str"):
        native.split_sentences(["a", None], 10)


@needs_native
def test_join_items_equals_str_join():
    """join_items(items, indices, sep) == sep.join(items[i] for i in indices): strings of every kind
    (ASCII, BMP, beyond it, empty), repeats, no index and one; a bad index or item is refused."""
    rng = random.Random(3)
    items = ["", "a", "中国", "\U00020000x", "é", "\x01", "word"] + [chr(rng.randrange(32, 0x30000)) * 3 for _ in range(50)]
    for _ in range(500):
        idx = [rng.randrange(len(items)) for _ in range(rng.randint(0, 20))]
        for sep in ("\x01", "--", "中"):
            assert native.join_items(items, np.array(idx, dtype=np.int64), sep) == sep.join(items[i] for i in idx)
    with pytest.raises(IndexError):
        native.join_items(items, np.array([len(items)], dtype=np.int64), "-")
    with pytest.raises(IndexError):
        native.join_items(items, np.array([-1], dtype=np.int64), "-")
    with pytest.raises(TypeError):
        native.join_items(["a", 1], np.array([1], dtype=np.int64), "-")
    with pytest.raises(TypeError):
        native.join_items(items, np.array([1], dtype=np.int32), "-")


@needs_native
def test_normalisation_in_one_pass_equals_normalize_text():
    """normalize_fast (one C pass through a table per code point) == normalize_text, document by
    document: every BMP code point alone, between letters and doubled; random text over every kind
    (full-width forms, compatibility characters, combining marks and what they compose with, Hangul
    syllables and jamo, controls, line breaks, spaces, surrogates, beyond the BMP); the documents it
    cannot do are handed back and get normalize_text's result through normalize_documents."""
    from data_prep import normalize

    kinds, starts, data = normalize._fast_tables()
    counts = np.bincount(np.frombuffer(kinds, dtype=np.uint8), minlength=6)
    assert counts[normalize._NK_KEEP] > 50_000 and counts[normalize._NK_MAP] > 2_000 and counts[normalize._NK_UNSAFE] > 2_000
    chars = [chr(c) for c in range(0x10000)] + [chr(c) for c in range(0x10000, normalize._PLANES_0_TO_3, 5)]
    docs = chars + [f"a{c}b" for c in chars] + [c + c for c in chars]
    pool = list("中国ａＺ０９。，…①ﬁ¨ｶﾞ\u3099\u0301eé\u1100\u1161\u11a8가각ㄱㅏ\u00a0\u3000\u2028\r\n\t \x85\x0b\x1c\u200b\ufeff"
                "\u00ad\ud800\U00020000\U0002f800\U0001d400\U0001f600\U000e0100\U0010fffd.Aa1\u0b47\u0b3e\u1680\u2002\u202f\ue000\ufffd")
    rng = random.Random(11)
    docs += ["".join(rng.choice(pool) for _ in range(rng.randint(0, 12))) for _ in range(20_000)]
    for size in (0x10000, normalize._PLANES_0_TO_3):
        tables = normalize._fast_tables(size)
        for wordlike, keep in ((True, "wordlike"), (False, "all")):
            texts, rest = native.normalize_fast(docs, *tables, wordlike)
            handed_back = set(rest)
            assert 0 < len(handed_back) < len(docs) // 2
            assert (size > 0x10000) == ("\U00020000" not in {docs[i] for i in rest})
            for i, (doc, text) in enumerate(zip(docs, texts)):
                if i in handed_back:
                    assert text is doc
                else:
                    assert text == normalize.normalize_text(doc, keep), (doc, text)
    for keep in ("wordlike", "all"):
        assert normalize.normalize_documents(docs, keep) == [normalize.normalize_text(d, keep) for d in docs]
    for bad, message in (((b"x",) + (starts, data), "0x10000"), ((kinds, starts[:-1], data), "len.kinds. . 1"),
                         ((kinds, starts, np.array(data, dtype=np.float32)), "integers")):
        with pytest.raises((ValueError, TypeError), match=message):
            native.normalize_fast(["a"], *bad, True)


def test_unicode_tables_come_from_the_disk_cache_and_a_bad_cache_costs_only_time(monkeypatch, tmp_path):
    """The code-point tables derived from unicodedata (the normalisation's, for the BMP and planes 0-3;
    English's invisible characters) are kept in languages.cache_dir(): a new process reads the same
    tables back (no derivation); a damaged or truncated file is derived again and rewritten;
    AMBERT_CACHE_DIR="" derives them each time without an error."""
    from data_prep import english, languages, normalize

    derived = []
    for mod, name in ((normalize, "_derive_fast_tables"), (english, "_find_invisible_ranges")):
        monkeypatch.setattr(mod, name, (lambda f: lambda *a: derived.append(f.__name__) or f(*a))(getattr(mod, name)))

    def tables() -> list:
        normalize._fast_tables.cache_clear()  # a new process
        english._invisible_ranges.cache_clear()
        kinds, starts, data = normalize._fast_tables()
        astral = normalize._fast_tables(normalize._PLANES_0_TO_3)
        return [kinds, starts.tolist(), data.tolist(), astral[0], astral[1].tolist(), astral[2].tolist(),
                english._invisible_ranges()]

    cache = tmp_path / "cache"
    monkeypatch.setenv("AMBERT_CACHE_DIR", str(cache))
    reference = tables()
    assert len(derived) == 3 and len(list(cache.glob("*.bin"))) == 3
    assert reference[6] == english._find_invisible_ranges() and (0xD800, 0xF8FF) in reference[6]
    assert (len(reference[0]), len(reference[3])) == (0x10000, normalize._PLANES_0_TO_3)
    assert tables() == reference and len(derived) == 4  # read back (the one call above derived)
    for path in sorted(cache.glob("*.bin")):
        blob = path.read_bytes()
        for bad in (blob[: len(blob) // 2], blob[:-5] + bytes([blob[-5] ^ 1]) + blob[-4:]):
            path.write_bytes(bad)
            derived.clear()
            assert tables() == reference and len(derived) == 1
            assert path.read_bytes() == blob  # rewritten
    monkeypatch.setenv("AMBERT_CACHE_DIR", "")
    derived.clear()
    assert languages.cache_dir() is None and tables() == reference and len(derived) == 3
    normalize._fast_tables.cache_clear()
    english._invisible_ranges.cache_clear()


@needs_native
def test_space_clean_up_equals_the_regular_expressions(monkeypatch):
    """clean_spaces (one C pass) == the three substitutions it replaces (runs of whitespace but line
    breaks -> one space; Chinese: ". " -> ".\n", a space kept only between ASCII letters/digits), for
    every Unicode space, line breaks, periods, runs, the ends of the text and all three string kinds;
    and the batch and per-document normalisations through it equal the pure path's."""
    from data_prep import normalize

    pool = list(" \t\x0b\x0c\r\x1c\x1f\x85\xa0\u1680\u2000\u2028\u3000\u200b\n.。aZ9_中\ue000é\U00020000") + ["  ", ". ", "a b"]
    rng = random.Random(7)
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(5000)] + ["", " ", ".", "a  1"]
    for text in texts:
        spaced = normalize._SPACES.sub(" ", text)
        assert native.clean_spaces(text, False) == spaced, repr(text)
        assert native.clean_spaces(text, True) == normalize._NON_WORD_SPACE.sub("", normalize._PERIOD_SPACE.sub(".\n", spaced)), repr(text)
    docs = ["".join(rng.choice(pool + ["中国", "ＧＤＰ", "Windows 98", "１９９８"]) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    fast = (normalize.normalize_documents(docs), [normalize.normalize_text(d) for d in docs])
    monkeypatch.setattr(languages, "_native", None)
    assert fast == (normalize.normalize_documents(docs), [normalize.normalize_text(d) for d in docs])
    assert sum(" " in d for d in fast[0]) > 100 and sum("." in d for d in fast[0]) > 100
    with pytest.raises(TypeError):
        native.clean_spaces(b"a b", True)


# ---- jieba-c: jieba 0.42's segmentation in C (data_prep/_native.c, Jieba) -------------------------
def _jieba_tokenizer():
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    tokenizer = jieba.Tokenizer()
    tokenizer.initialize()
    return tokenizer


def _tricky_texts(rng: random.Random, n: int) -> list[str]:
    """Random text over what each branch of jieba's cut treats differently: Chinese characters in and
    out of the dictionary (the HMM), the other characters of its blocks (+#&._%-), letters and digits
    (the HMM's [a-zA-Z0-9]+(?:\\.\\d+)?%? split), spaces, "\\r\\n", tabs, punctuation, characters above
    U+FFFF and outside the Chinese range."""
    han = list("的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会家可下而过天去能对小"
               "多然于心学么之都好看起发当没成只如事把还用第样道想作种开美总从无情己面最女但现前些所同日手又行意动方期它"
               "头经长儿回位分爱老因很给名法间斯知世什两次使身者被高已亲其进此话常与活正感亻乂氵饕餮龘靐齉")
    other = list("abcXYZ0123456789.%+#&_-") + [" ", "\n", "\r\n", "\t", "，", "。", "！", "“", "”", "　", "\U00020000",
                                                "\u3400", "é", "\x00"]
    return ["".join(rng.choice(han if rng.random() < 0.7 else other) for _ in range(rng.randint(0, 80)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def jieba_c():
    if native is None:
        pytest.skip("data_prep._native is not compiled")
    from data_prep.chinese import make_segmenter

    return make_segmenter("jieba-c")


@needs_native
def test_jieba_c_gives_jiebas_words_with_and_without_the_hmm(jieba_c):
    """Word for word jieba's Tokenizer.cut (HMM on, and off: the path user words' frequencies take) on
    People's Daily and on random text over every branch of the algorithm; and rjieba's (after the rule
    that makes its words jieba's) on People's Daily."""
    from data_prep.chinese import make_segmenter
    from data_prep.demo import peoples_daily_gold

    reference = _jieba_tokenizer()
    assert jieba_c.jieba.total == reference.total  # the same dictionary, summed as gen_pfdict sums it
    rng = random.Random(7)
    lines = ["".join(words) for words in peoples_daily_gold()]
    texts = rng.sample(lines, 2500) + _tricky_texts(rng, 2500)
    for text in texts:
        assert jieba_c.cut(text) == reference.lcut(text), text
        assert jieba_c.jieba.cut(text, hmm=False) == reference.lcut(text, HMM=False), text
    # long text in one call (the build joins ~16k characters of sentences with line breaks)
    joined = "\n".join(texts[:400])
    assert jieba_c.cut(joined) == reference.lcut(joined)
    rjieba = make_segmenter("rjieba")
    assert all(jieba_c.cut(line) == rjieba.cut(line) for line in lines[::7])


@needs_native
def test_jieba_c_segments_random_sentences_as_the_general_path_does(jieba_c):
    """segment_sentences on random normalised sentences over every branch of jieba (and characters above
    U+FFFF, Latin runs cut by the segmenter, spaces between them): the words of each sentence are segment_sentence's (the
    general path: cut, "##" continuations, space words dropped), numbered as a StringNumbering numbers
    them (short words through the packed table, long ones and those above U+FFFF through the dict), the
    new words listed in id order, across calls sharing one table."""
    from data_prep.chinese import WordIds, segment_sentence
    from data_prep.normalize import normalize_text, split_sentences

    rng = random.Random(3)  # normalised, as the build's sentences are (no tab, no "\r", single spaces)
    sentences = [s for text in _tricky_texts(rng, 600) for s in split_sentences(normalize_text(text.replace("#", "")))]
    sentences += ["中华人民共和国中央人民政府今天成立了", "\U00020000\U00020000中国", "研究1.3nm工艺和5G",
                  "型号x1.5y和3.5GHz的芯片", "1.3nm 2.5nm"]
    table, reference = WordIds(), StringNumbering(False)
    reference(["\n", " "])  # WordIds' ids 0 and 1
    for a in range(0, len(sentences), 97):  # several calls, one table
        batch = sentences[a:a + 97]
        ids = np.full(sum(map(len, batch)) + 1, -1, dtype=np.int32)
        lengths = np.zeros(len(batch), dtype=np.int64)
        start = pos = 0
        while start < len(batch):
            seen = len(table.words)
            start, pos, new = jieba_c.segment_sentences(batch, start, table.numbering.native, ids, lengths, pos)
            assert new == list(table.index)[seen:]  # the new words, in the order of their ids
            table._extend(new)
            if start < len(batch):  # a sentence without a word (only spaces: none here) goes back to Python
                start += 1
        assert ids[pos] == -1 and pos == lengths.sum()
        expected = [segment_sentence(jieba_c, s) for s in batch]
        assert lengths.tolist() == [len(w) for w in expected]
        assert [table.words[i] for i in ids[:pos]] == [w for words in expected for w in words]
        assert ids[:pos].tolist() == reference([w for words in expected for w in words]).tolist()
    assert dict(table.index) == dict(reference.index)
    assert {"##nm", "##y", "##GHz"} <= set(table.index)  # continuations (not across the space of "1.3nm 2.5nm")


@needs_native
def test_jieba_c_user_words_are_added_as_jiebas_load_userdict_adds_them(tmp_path):
    """--user-dict through jieba-c == jieba's load_userdict: a word with a frequency, one without (jieba's
    suggest_freq), a word that was only a prefix, a dictionary word re-weighted, and a word at frequency 0
    (jieba then splits it where its HMM would give it)."""
    import jieba.finalseg

    from data_prep.chinese import make_segmenter

    user = tmp_path / "user.txt"
    user.write_text("迈向充满 5\n云计算\n石墨烯 n\n中华人 0\n希望 3 v\n江大桥 20000\n南京市长 0\n", encoding="utf-8")
    text = ("迈向充满希望的新世纪，云计算和石墨烯。中华人民共和国，南京市长江大桥。江大桥同志说，"
            "他是南京市长。乂乂饕餮中华人，凇氵龘。")
    reference = _jieba_tokenizer()
    before = set(jieba.finalseg.Force_Split_Words)
    try:
        reference.load_userdict(str(user))
        ours = make_segmenter("jieba-c", str(user))
        assert ours.jieba.total == reference.total
        for word in ("迈向充满", "云计算", "石墨烯", "中华人", "希望", "南京市长", "中华", "不在词典里"):
            assert ours.jieba.get(word) == reference.FREQ.get(word), word
        rng = random.Random(5)
        for piece in [text] + [text[i:i + rng.randint(1, 30)] for i in rng.sample(range(len(text)), 40)]:
            assert ours.cut(piece) == reference.lcut(piece), piece
        assert "云计算" in ours.cut(text) and "江大桥" in ours.cut(text)
    finally:  # jieba keeps force-split words in a module-level set: as it was for the other tests
        jieba.finalseg.Force_Split_Words.clear()
        jieba.finalseg.Force_Split_Words.update(before)


@needs_native
def test_jieba_c_refuses_a_bad_dictionary_and_falls_back_to_rjieba_uncompiled(monkeypatch, caplog):
    from jieba.finalseg import prob_emit, prob_start, prob_trans

    from data_prep import chinese

    with pytest.raises(ValueError, match="line 2"):
        native.Jieba("中国 5 ns\n中华人民\n", prob_start.P, prob_trans.P, prob_emit.P)
    with pytest.raises(ValueError, match="unknown state"):
        native.Jieba("中国 5\n", {"X": 0.0}, prob_trans.P, prob_emit.P)
    with pytest.raises(ValueError, match="line 2"):  # a blank line, as jieba's gen_pfdict
        native.Jieba("中国 5\n\n中国人 2 n\n", prob_start.P, prob_trans.P, prob_emit.P)
    small = native.Jieba("中国 5\n中国人 2 n\n", prob_start.P, prob_trans.P, prob_emit.P)
    assert (small.total, small.get("中国"), small.get("中"), small.get("国")) == (7, 5, 0, None)
    with pytest.raises(RuntimeError, match="once"):
        small.__init__("中国 5\n", prob_start.P, prob_trans.P, prob_emit.P)
    bare = native.Jieba.__new__(native.Jieba)  # __init__ never ran: refused, not a crash
    for call in (lambda: bare.cut("中国"), lambda: bare.get("中国"), lambda: bare.add_word("中国", 3),
                 lambda: bare.segment_sentences(["中国"], 0, StringNumbering().native, np.zeros(2, dtype=np.int32),
                                                np.zeros(1, dtype=np.int64), 0)):
        with pytest.raises(RuntimeError, match="not initialised"):
            call()
    # jieba's dictionary missing or damaged: named, with the fix
    monkeypatch.setattr(chinese, "_JIEBA_C", {})
    monkeypatch.setattr(chinese, "_jieba_folder", lambda: Path("/nonexistent/jieba"))
    with pytest.raises(chinese.LanguageError, match=r"/nonexistent/jieba/dict.txt, which is missing or damaged .*reinstall"):
        chinese.make_segmenter("jieba-c")
    monkeypatch.undo()
    import importlib.util  # (found without importing jieba; not installed at all: named, with the fix)

    monkeypatch.setattr(chinese, "_JIEBA_C", {})
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(chinese.LanguageError, match=r"jieba is not installed: `pip install jieba==0.42.1`"):
        chinese.make_segmenter("jieba-c")
    monkeypatch.undo()
    assert chinese._jieba_folder() == Path(__import__("jieba").__file__).parent
    # without the compiled module a jieba-c dataset is still segmented: by rjieba (the same words), said once
    monkeypatch.setattr(languages, "_native", None)
    monkeypatch.setattr(chinese, "_FALLBACK_WARNED", [])
    with caplog.at_level("WARNING", logger="data_prep"):
        seg = chinese.make_segmenter("jieba-c")
    assert isinstance(seg, chinese.RJiebaSegmenter)
    assert "segmenting with rjieba instead (the same words" in caplog.text


@needs_native
def test_jieba_c_segments_sentences_as_the_chunk_path_and_hands_back_the_general_ones(jieba_c):
    """segment_sentences (jieba-c's whole shard segmentation in C) gives segment_shard's words: Latin runs
    the segmenter cut become "##" continuations (not across a space), space words are dropped; it stops
    at a sentence holding "##" (the general path's), and segment_shard resumes after it."""
    from data_prep.chinese import WordIds, make_segmenter, segment_sentence, segment_shard

    sentences = ["研制1.3nm的芯片", "Windows 98和iPhone6s", "C##x 和 ##b", "ab12.5%cd abc中文", "3.5%的GDP增长",
                 "中华人民共和国", "x"]
    table = WordIds()
    ids = np.full(200, -1, dtype=np.int32)
    lengths = np.zeros(len(sentences), dtype=np.int64)
    stop, pos, new = jieba_c.segment_sentences(sentences, 0, table.numbering.native, ids, lengths, 0)
    table._extend(new)
    assert stop == 2 and pos == lengths[:2].sum() and (ids[pos:] == -1).all()
    assert [table.words[i] for i in ids[:lengths[0]]] == ["研制", "1.3", "##nm", "的", "芯片"]
    assert [table.words[i] for i in ids[lengths[0]:pos]] == ["Windows", "98", "和", "iPhone6s"]
    stop, pos2, new = jieba_c.segment_sentences(sentences, 3, table.numbering.native, ids, lengths, pos)
    table._extend(new)
    assert stop == len(sentences) and pos2 == pos + lengths[3:].sum()
    assert [table.words[i] for i in ids[pos:pos + lengths[3]]] == ["ab12.5%", "cd", "abc", "中文"]  # a space between
    # the whole shard, against the chunk path of rjieba (the same words)
    words_c, ids_c, lengths_c = segment_shard(jieba_c, sentences)
    words_r, ids_r, lengths_r = segment_shard(make_segmenter("rjieba"), sentences)
    assert [words_c[i] for i in ids_c] == [words_r[i] for i in ids_r] and lengths_c.tolist() == lengths_r.tolist()
    assert sorted(words_c) == sorted(words_r)
    general = lengths_c[:2].sum()  # the "##" sentence, through the general path
    assert [words_c[i] for i in ids_c[general:general + lengths_c[2]]] == segment_sentence(jieba_c, sentences[2])
    with pytest.raises(TypeError, match="ids must be"):
        jieba_c.segment_sentences(sentences, 0, table.numbering.native, ids.astype(np.int64), lengths, 0)
    with pytest.raises(ValueError, match="no room"):
        jieba_c.segment_sentences(sentences, 0, table.numbering.native, np.zeros(3, dtype=np.int32), lengths, 0)


def _jieba_c_address(_=None) -> int:
    from data_prep.chinese import make_segmenter

    return id(make_segmenter("jieba-c").jieba)


@needs_native
def test_jieba_c_dictionary_is_built_once_and_shared_with_the_forked_workers(monkeypatch):
    """The build's pool is forked after the main process built jieba-c's dictionary (Chinese.before_fork):
    each worker's segmenter uses that one (the same object, its pages shared), not a copy of its own."""
    import multiprocessing as mp

    from data_prep import chinese, core, normalize

    monkeypatch.setattr(chinese, "_JIEBA_C", {})
    normalize._cleanup_flags.cache_clear()
    executor = core._Executor(2, "zh", {"segmenter": "jieba-c"})
    try:
        assert len(chinese._JIEBA_C) == 1  # built in this process before the fork
        assert normalize._cleanup_flags.cache_info().currsize == 1  # the normalisation's table too
        here = _jieba_c_address()
        assert here == id(next(iter(chinese._JIEBA_C.values())))
    finally:
        executor.terminate()  # (its workers ignore SIGTERM: Pool.terminate would wait for them)
    with mp.get_context("fork").Pool(2) as pool:
        assert pool.map(_jieba_c_address, range(2)) == [here, here]
    assert chinese.make_segmenter("jieba-c").jieba is chinese.make_segmenter("jieba-c").jieba


_STATE_HEADER = 240  # JStateHeader: 10 64-bit fields, then start[4] and trans[4][4] (doubles)


@needs_native
def test_jieba_c_state_gives_the_same_segmenter_and_a_damaged_one_is_refused(jieba_c):
    """Jieba.state() / Jieba.from_state (the disk cache's content): the copy cuts, counts and looks up
    as the original, on People's Daily and random text over every branch, and words added to it stay
    its own; a truncated, foreign or inconsistent state is a ValueError naming what is wrong (from_state
    checks sizes and node ids before it copies anything), never a crash."""
    from data_prep.demo import peoples_daily_gold

    state = jieba_c.jieba.state()
    copy = native.Jieba.from_state(state)
    assert copy.state() == state
    assert copy.total == jieba_c.jieba.total and copy.get("中国") == jieba_c.jieba.get("中国")
    lines = ["".join(words) for words in peoples_daily_gold()[:3000]] + _tricky_texts(random.Random(3), 300)
    for line in lines:
        assert copy.cut(line) == jieba_c.jieba.cut(line)
        assert copy.cut(line, hmm=False) == jieba_c.jieba.cut(line, hmm=False)
    copy.add_word("测试词语", 50)
    assert copy.cut("这是测试词语吗") == ["这是", "测试词语", "吗"]
    assert jieba_c.jieba.cut("这是测试词语吗") == ["这是", "测试", "词语", "吗"]  # the original is untouched
    header = np.frombuffer(state, dtype=np.uint64, count=10)
    mask, nodes = int(header[4]), int(header[8])
    table = np.frombuffer(state, dtype=np.uint64, count=2 * (mask + 1), offset=_STATE_HEADER)[0::2]
    entry = _STATE_HEADER + 16 * int(np.flatnonzero(table)[0])  # the first used table slot's key|node

    def damaged(offset: int, value: int) -> bytearray:
        out = bytearray(state)
        out[offset:offset + 8] = int(value).to_bytes(8, "little")
        return out

    bad_node = (int(table[table != 0][0]) & ~((1 << 21) - 1)) | (nodes + 5)
    for buffer, why in ((state[:100], "shorter than its header"), (state[:-1], "length does not match"),
                        (b"\0" * 8 + state[8:], "not a jieba-c state"), (damaged(8, 99), "another version"),
                        (damaged(32, mask * 2 + 1), "length does not match"), (damaged(32, 6), "out of range"),
                        (damaged(40, int(header[5]) + 1), "does not hold the entries"),
                        (damaged(entry, bad_node), "names no node"), (damaged(64, 0), "out of range")):
        with pytest.raises(ValueError, match=why):
            native.Jieba.from_state(buffer)
    with pytest.raises(TypeError):
        native.Jieba.from_state("not bytes")


@needs_native
def test_jieba_c_dictionary_comes_from_the_disk_cache_and_a_bad_cache_costs_only_time(monkeypatch, tmp_path):
    """jieba-c's built dictionary is kept in languages.cache_dir() (AMBERT_CACHE_DIR): a second process
    reads it instead of building it; a damaged (one byte changed: CRC-32) or truncated file is built
    again and rewritten; a cache folder that cannot be made, or AMBERT_CACHE_DIR="", builds each time
    without an error; only the 4 newest states are kept."""
    import types
    import zlib

    from data_prep import chinese

    builds = []

    def counting_jieba(*args):
        builds.append(1)
        return native.Jieba(*args)

    counting_jieba.from_state = native.Jieba.from_state
    counting = types.ModuleType("counting_native")  # (hashable: the in-process memo's key holds it)
    vars(counting).update({**vars(native), "Jieba": counting_jieba})
    monkeypatch.setattr(languages, "_native", counting)
    text = "我们是中国人民的朋友，１９９８年新年讲话。ABC测试"

    def segmenter_words() -> list[str]:
        monkeypatch.setattr(chinese, "_JIEBA_C", {})  # a new process
        return chinese.make_segmenter("jieba-c").cut(text)

    cache = tmp_path / "cache"
    monkeypatch.setenv("AMBERT_CACHE_DIR", str(cache))
    reference = segmenter_words()
    assert len(builds) == 1
    states = list(cache.glob("jieba-c-*.state"))
    assert len(states) == 1 and not list(cache.glob(".*tmp"))
    blob = states[0].read_bytes()
    assert zlib.crc32(blob[:-4]) == int.from_bytes(blob[-4:], "little")
    assert (segmenter_words(), len(builds)) == (reference, 1)  # read back, not built
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0x40
    states[0].write_bytes(damaged)
    assert (segmenter_words(), len(builds)) == (reference, 2)
    assert states[0].read_bytes() == blob  # rewritten
    states[0].write_bytes(blob[:1000])
    assert (segmenter_words(), len(builds)) == (reference, 3)
    assert segmenter_words() == reference and len(builds) == 3
    # only the newest states stay
    for k in range(5):
        old = cache / f"jieba-c-old{k}.state"
        old.write_bytes(b"x")
        os.utime(old, (1_000_000 + k, 1_000_000 + k))
    states[0].unlink()
    assert segmenter_words() == reference and len(builds) == 4
    assert sorted(p.name for p in cache.glob("jieba-c-*.state")) == sorted(
        [states[0].name] + [f"jieba-c-old{k}.state" for k in (2, 3, 4)])
    # no usable cache folder: built each time, no error, nothing left behind
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("AMBERT_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    assert segmenter_words() == reference and len(builds) == 5
    monkeypatch.setenv("AMBERT_CACHE_DIR", "")
    assert languages.cache_dir() is None
    assert segmenter_words() == reference and len(builds) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "cache"]


def _segmenter_words_in_a_new_process(text: str) -> list[str]:
    from data_prep import chinese

    chinese._JIEBA_C.clear()
    return chinese.make_segmenter("jieba-c").cut(text)


@needs_native
def test_jieba_c_cache_written_by_processes_at_once(monkeypatch, tmp_path):
    """MPI ranks on one node build at the same time: each writes its own temporary file and renames it,
    so every process gets the same words and one whole state is left, no temporary file."""
    import multiprocessing as mp
    import zlib

    monkeypatch.setenv("AMBERT_CACHE_DIR", str(tmp_path))
    text = "我们是中国人民的朋友，１９９８年新年讲话。"
    with mp.get_context("fork").Pool(3) as pool:
        results = pool.map(_segmenter_words_in_a_new_process, [text] * 6)
    assert all(words == results[0] for words in results) and len(results[0]) > 3
    states = list(tmp_path.iterdir())
    assert len(states) == 1 and states[0].name.startswith("jieba-c-")
    blob = states[0].read_bytes()
    assert zlib.crc32(blob[:-4]) == int.from_bytes(blob[-4:], "little")
