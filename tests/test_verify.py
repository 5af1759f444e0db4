"""``--verify``: the array-based checks against a sentence-at-a-time reference, on real builds and
on datasets damaged in every way the checks name (ids beyond the vocabulary, empty sentences,
alignments that do not add up, coarse tokens that do not match their fine tokens, specials, [UNK]),
in one process and in two, over one chunk and over many.

The reference is the checker the project had first: each sentence's token strings in Python lists,
joined and decoded with ``format.detokenize``. Both must give the same report, defect for defect.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from data_prep import core, english
from data_prep import format as fmt
from data_prep.verify import MAX_REPORTED, VerifyReport, verify_dataset
from tests.kenlm_marks import needs_lmplz
from tests.test_data_prep_zh import MIXED, small_config, write_corpus


def _strip(token: str) -> str:
    return token[2:] if token.startswith(fmt.CONTINUATION) and len(token) > 2 else token


def reference_check(split: str, documents, fine_tokens: list[str], coarse_tokens: list[str], language: str | None,
                    report: VerifyReport) -> dict:
    """Every check of ``documents`` (lists of (fine, coarse, align) sentence arrays), one sentence at a
    time: the first implementation of ``verify_dataset``. Defects go to ``report``; returns the counts."""
    nf, nc = len(fine_tokens), len(coarse_tokens)
    special = set(range(fmt.NUM_SPECIAL))
    counts = {"fine_tokens": 0, "coarse_tokens": 0, "coarse_checked": 0, "decoded_equal": 0, "decode_skipped": 0}
    for d, sentences in enumerate(documents):
        all_fine = [int(i) for sentence in sentences for i in sentence[0]]
        all_coarse = [int(i) for sentence in sentences for i in sentence[1]]
        counts["fine_tokens"] += len(all_fine)
        counts["coarse_tokens"] += len(all_coarse)
        if all_fine and (max(all_fine) >= nf or max(all_coarse, default=0) >= nc):
            files = [f"{split}_fine.bin"] * (max(all_fine) >= nf) + [f"{split}_coarse.bin"] * (max(all_coarse, default=0) >= nc)
            report.defect(f"{split} document {d}: id beyond the vocabulary in {' and '.join(files)}")
            continue
        for s, (fine, coarse, align) in enumerate(sentences):
            fine, coarse, align = [int(i) for i in fine], [int(i) for i in coarse], np.asarray(align, dtype=np.int64)
            where = f"{split} document {d} sentence {s}"
            if not fine or not coarse:
                report.defect(f"{where}: empty sentence")
                continue
            if align.min() < 1 or int(align.sum()) != len(fine):
                report.defect(f"{where}: alignment covers {int(align.sum())} fine tokens, the sentence has {len(fine)}")
                continue
            fine_str = [fine_tokens[i] for i in fine]
            coarse_str = [coarse_tokens[i] for i in coarse]
            pos = 0
            for k, n in enumerate(align.tolist()):
                span = fine[pos:pos + n]
                if coarse[k] not in special and not any(i in special for i in span):
                    pieces = fine_str[pos:pos + n]
                    joined = pieces[0] + "".join(_strip(p) for p in pieces[1:])
                    expected = coarse_str[k]
                    if language == "en" and len(expected) > 1:
                        expected = expected.replace(fmt.PHRASE_JOINER, "")
                        joined = joined.replace(fmt.PHRASE_JOINER, "")
                    if joined != expected:
                        report.defect(f"{where}: coarse token {coarse_str[k]!r} covers fine tokens {pieces}")
                    counts["coarse_checked"] += 1
                pos += n
            if fmt.UNK_ID in fine or fmt.UNK_ID in coarse:
                counts["decode_skipped"] += 1
                continue
            a, b = fmt.detokenize(fine_str, language), fmt.detokenize(coarse_str, language)
            if a != b:
                report.defect(f"{where}: fine decodes to {a[:80]!r}, coarse to {b[:80]!r}")
            else:
                counts["decoded_equal"] += 1
    return counts


def reference_verify(directory: str) -> VerifyReport:
    """``reference_check`` over every split of a dataset, and its counts against meta.json."""
    report = VerifyReport(str(directory))
    ds = fmt.PairedDataset(directory)
    for split in fmt.SPLITS:
        data = ds.split(split)
        if len(data) == 0:
            report.defect(f"{split}: 0 documents (every split needs at least one)")
        documents = []
        for d in range(len(data)):
            doc = data.document(d)
            documents.append([(doc.fine[doc.fine_offsets[s]:doc.fine_offsets[s + 1]],
                               doc.coarse[doc.coarse_offsets[s]:doc.coarse_offsets[s + 1]],
                               doc.align[doc.coarse_offsets[s]:doc.coarse_offsets[s + 1]])
                              for s in range(doc.num_sentences)])
        counts = reference_check(split, documents, ds.fine_vocab.tokens, ds.coarse_vocab.tokens, ds.language, report)
        counts = {"documents": len(data), "sentences": data.num_sentences, **counts}
        report.counts[split] = counts
        recorded = ds.meta.get("splits", {}).get(split)
        for key in ("documents", "sentences", "fine_tokens", "coarse_tokens"):
            if recorded is not None and key in recorded and recorded[key] != counts[key]:
                report.defect(f"{split}: meta.json says {key}={recorded[key]}, the files have {counts[key]}")
    return report


def assert_same_as_reference(directory: Path) -> VerifyReport:
    expected = reference_verify(str(directory))
    for workers, chunk_tokens in ((1, 1 << 19), (1, 700), (2, 700)):
        got = verify_dataset(str(directory), progress=False, workers=workers, chunk_tokens=chunk_tokens)
        assert (got.ok, got.counts, got.num_defects, got.defects) == \
            (expected.ok, expected.counts, expected.num_defects, expected.defects), (workers, chunk_tokens)
    return expected


def rewrite_train(source: Path, target: Path, damage) -> None:
    """A copy of dataset ``source`` whose train split is rewritten after ``damage(documents)``
    (documents: lists of [fine, coarse, align] sentence arrays, changed in place). Written with
    megatron-core's builder directly: the format's writer would refuse the damage."""
    shutil.copytree(source, target)
    ds = fmt.PairedDataset(target)
    split = ds.split("train")
    documents = []
    for d in range(len(split)):
        doc = split.document(d)
        documents.append([[doc.fine[doc.fine_offsets[s]:doc.fine_offsets[s + 1]].astype(np.int64),
                           doc.coarse[doc.coarse_offsets[s]:doc.coarse_offsets[s + 1]].astype(np.int64),
                           doc.align[doc.coarse_offsets[s]:doc.coarse_offsets[s + 1]].astype(np.int64)]
                          for s in range(doc.num_sentences)])
    damage(documents)
    dtypes = {"fine": fmt.id_dtype(len(ds.fine_vocab)), "coarse": fmt.id_dtype(len(ds.coarse_vocab)),
              "align": fmt.ALIGN_DTYPE}
    del split, ds
    for i, stream in enumerate(fmt.STREAMS):
        path = fmt.prefix(target, "train", stream)
        builder = fmt._builder(path + ".tmp", dtypes[stream])
        for sentences in documents:
            for sentence in sentences:
                builder.add_item(fmt._tensor(np.asarray(sentence[i], dtype=np.int64), dtypes[stream]))
            builder.end_document()
        builder.finalize(path + ".tmp.idx")
        for ext in (".bin", ".idx"):
            Path(path + ".tmp" + ext).replace(path + ext)


def sentences_with(documents, min_coarse: int = 3):
    """(document, sentence) of every sentence with at least ``min_coarse`` coarse tokens."""
    return [(d, s) for d, doc in enumerate(documents) for s, sentence in enumerate(doc) if len(sentence[1]) >= min_coarse]


def damage_every_way(fine_vocab_size: int, coarse_vocab_size: int):
    def damage(documents):
        places = sentences_with(documents)
        (d0, s0), (d1, s1), (d2, s2), (d3, s3), (d4, s4), (d5, s5), (d6, s6) = places[1:200:28][:7]
        documents[d0][s0][0][0] = fine_vocab_size + 3  # beyond the fine vocabulary: the document is skipped
        documents[d1][s1][1][1] = coarse_vocab_size  # beyond the coarse vocabulary
        documents[d2][s2][:] = [np.zeros(0, np.int64)] * 3  # an empty sentence
        documents[d3][s3][2][0] += 1  # the alignment covers one fine token too many
        align = documents[d4][s4][2]  # a zero in the alignment, the total kept
        align[0], align[1] = 0, align[0] + align[1]
        coarse = documents[d5][s5][1]  # two coarse tokens swapped: token defects, then the decode's
        coarse[0], coarse[2] = coarse[2], coarse[0]
        if coarse[0] == coarse[2]:
            coarse[0] = fmt.NUM_SPECIAL + (coarse[0] - fmt.NUM_SPECIAL + 1) % (coarse_vocab_size - fmt.NUM_SPECIAL)
        documents[d6][s6][0][0] = fmt.UNK_ID  # [UNK]: this token's check and the decode are skipped
        more = places[220:260]
        for d, s in more[:10]:  # specials inside: the token check skips them, the decode sees them
            documents[d][s][1][-1] = fmt.CLS_ID
        for d, s in more[10:]:  # every coarse token of the sentence replaced: many defects (beyond MAX_REPORTED)
            documents[d][s][1][:] = fmt.NUM_SPECIAL + (documents[d][s][1] * 7 + 1) % (coarse_vocab_size - fmt.NUM_SPECIAL)
    return damage


def check_damage(built: Path, tmp_path: Path) -> None:
    assert_same_as_reference(built)
    ds = fmt.PairedDataset(built)
    damaged = tmp_path / "damaged"
    rewrite_train(built, damaged, damage_every_way(len(ds.fine_vocab), len(ds.coarse_vocab)))
    report = assert_same_as_reference(damaged)
    assert not report.ok and report.num_defects > MAX_REPORTED and len(report.defects) == MAX_REPORTED
    # each kind of defect appears among the first reported, in the order of the documents
    text = "\n".join(report.defects)
    for message in ("id beyond the vocabulary", "empty sentence", "alignment covers", "covers fine tokens",
                    "fine decodes to"):
        assert message in text, (message, report.summary())
    # which file holds the bad id
    assert "id beyond the vocabulary in train_fine.bin\n" in text + "\n"
    assert "id beyond the vocabulary in train_coarse.bin\n" in text + "\n"
    counts = report.counts["train"]
    assert counts["decode_skipped"] >= 1 and counts["decoded_equal"] < counts["sentences"]


def test_verify_matches_the_reference_zh(tmp_path):
    corpus = write_corpus(tmp_path / "pd.txt", lines=500, extra=MIXED * 3)
    # a small fine vocabulary: rare characters become [UNK] (the decode skips those sentences)
    core.build(small_config(corpus, tmp_path / "ds", shard_documents=100, fine_vocab_size=1200))
    assert fmt.PairedDataset(tmp_path / "ds").meta["stats"]["fine_oov_rate"] > 0
    check_damage(tmp_path / "ds", tmp_path)


@needs_lmplz
def test_verify_matches_the_reference_en(tmp_path):
    articles = list(english.bbc_news_articles())[::12]
    corpus = tmp_path / "bbc.jsonl"
    corpus.write_text("".join(json.dumps({"text": a}) + "\n" for a in articles), encoding="utf-8")
    core.build(core.BuildConfig(language="en", output=str(tmp_path / "ds"), inputs=[str(corpus)], progress=False,
                                fine_vocab_size=3000, shard_documents=60,
                                language_options={"ngram_order": 3, "phrase_min_count": 3}))
    meta = fmt.PairedDataset(tmp_path / "ds").meta
    assert meta["stats"]["multiword_phrase_tokens"] > 0  # phrases with "_", and "##" pieces, are checked
    check_damage(tmp_path / "ds", tmp_path)


def test_verify_workers_from_the_command_line(tmp_path, capsys):
    from data_prep.build import main

    corpus = write_corpus(tmp_path / "pd.txt", lines=200)
    core.build(small_config(corpus, tmp_path / "ds"))
    assert main(["--verify", str(tmp_path / "ds"), "--workers", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"verify {tmp_path / 'ds'}: OK" in out
    assert main(["--verify", str(tmp_path / "nothing"), "--workers", "2", "--no-progress"]) == 1
    assert "it does not exist" in capsys.readouterr().out


def test_chunks_cover_every_document_once():
    from data_prep.verify import _chunks

    class Split:
        def __init__(self, lengths):
            self.lengths = np.asarray(lengths, dtype=np.int64)

        def __len__(self):
            return len(self.lengths)

        def document_lengths(self):
            return self.lengths, self.lengths

    for lengths, size in (([5, 5, 5], 7), ([100, 1, 1, 1, 100], 3), ([1] * 10, 1000), ([0, 0, 3], 2), ([], 5)):
        ranges = _chunks(Split(lengths), size)
        covered = [d for first, last in ranges for d in range(first, last)]
        assert covered == list(range(len(lengths)))
        assert all(last > first for first, last in ranges)
        # a chunk only exceeds the size when a single document does
        assert all(sum(lengths[first:last]) <= size or last - first == 1 for first, last in ranges)


# Tokens chosen for the rules' corners: "##" continuations (and "##" alone, which is not one), "_"
# alone and inside phrases, Latin/digit pieces next to each other (Chinese puts a space between
# them only when the first ends and the next starts with one), punctuation, CJK.
FINE = ["a", "##a", "b", "##b", "_", "##_", "ab", "1", "##1", "%", "+", "a+", "+b", "中", "##中", "##", "x_y"]


def synthetic_documents(rng: np.random.Generator, fine_tokens: list[str], coarse_index: dict[str, int],
                        language: str, count: int):
    """Random documents over ``fine_tokens`` whose coarse tokens are mostly right (the string of
    their pieces, or its phrase form, when the coarse vocabulary has it) and sometimes not, with
    specials, [UNK], ids beyond the vocabularies, empty sentences and broken alignments."""
    nf, nc = len(fine_tokens), len(coarse_index) + fmt.NUM_SPECIAL
    documents = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.integers(1, 4)):
            fine, coarse, align = [], [], []
            for _ in range(rng.integers(0 if rng.random() < 0.03 else 1, 5)):
                n = int(rng.integers(1, 4))
                pieces = rng.integers(fmt.NUM_SPECIAL, nf, n)
                if rng.random() < 0.04:
                    pieces[rng.integers(n)] = rng.integers(0, fmt.NUM_SPECIAL)  # a special, [UNK] among them
                strings = [fine_tokens[i] for i in pieces]
                joined = strings[0] + "".join(_strip(p) for p in strings[1:])
                candidates = [c for c in (joined, joined.replace(" ", "_"), "_".join(strings)) if c in coarse_index]
                if candidates and rng.random() < 0.8:
                    token = coarse_index[candidates[int(rng.integers(len(candidates)))]]
                else:
                    token = int(rng.integers(0, nc))
                fine += pieces.tolist()
                coarse.append(token)
                align.append(n)
            if align and rng.random() < 0.03:
                align[int(rng.integers(len(align)))] += int(rng.choice([-1, 1]))
            if fine and rng.random() < 0.01:
                fine[int(rng.integers(len(fine)))] = nf + 1
            sentences.append([np.array(fine, dtype=np.int64), np.array(coarse, dtype=np.int64),
                              np.array(align, dtype=np.int64)])
        documents.append(sentences)
    return documents


def test_chunk_checks_match_the_reference_on_random_tokens(monkeypatch):
    from data_prep import verify

    monkeypatch.setattr(verify, "MAX_REPORTED", 10**6)  # every defect, in order
    rng = np.random.default_rng(7)
    fine_tokens = list(fmt.SPECIAL_TOKENS) + FINE
    coarse = sorted({a + _strip(b) for a in FINE for b in FINE} | set(FINE)
                    | {a + "_" + b for a in ("a", "ab", "1", "x_y") for b in ("b", "ab", "1", "a")})
    coarse_tokens = list(fmt.SPECIAL_TOKENS) + coarse
    index = {t: i for i, t in enumerate(coarse_tokens) if i >= fmt.NUM_SPECIAL}
    for language in ("zh", "en"):
        documents = synthetic_documents(rng, fine_tokens, index, language, 1500)
        expected = VerifyReport("x")
        expected_counts = reference_check("train", documents, fine_tokens, coarse_tokens, language, expected)
        sentences = [sentence for doc in documents for sentence in doc]
        result = verify._check_chunk(
            "train", 0, np.array([len(doc) for doc in documents]),
            *(np.concatenate([sentence[i] for sentence in sentences]) for i in range(3)),
            np.array([len(sentence[0]) for sentence in sentences]), np.array([len(sentence[1]) for sentence in sentences]),
            verify._VocabTables(fine_tokens, language), verify._VocabTables(coarse_tokens, language), language)
        assert result.counts == expected_counts
        assert [record[-1] for record in result.records] == expected.defects
        assert result.num_defects == expected.num_defects
        # the corners were there: right and wrong tokens, decodes equal and not, skips
        kinds = " ".join(expected.defects)
        for message in ("covers fine tokens", "fine decodes to", "alignment covers", "id beyond", "empty sentence"):
            assert message in kinds, (language, message)
        assert expected_counts["decoded_equal"] > 200 and expected_counts["decode_skipped"] > 5


def test_verify_workers_stop_under_a_callers_sigterm_handler(tmp_path):
    """A program that handles or blocks SIGTERM (a trainer's graceful stop) calls verify with 2
    workers, which inherit that by fork. Verify once stopped its pool with Pool.terminate(): it takes
    the task queue's lock, then SIGTERMs the workers, one of which could be waiting for that lock:
    with SIGTERM blocked it waited forever (the CI run hung; this test hung every time). Now the
    workers finish the queue and exit, and on an error they are SIGKILLed (``core.kill_pool``)."""
    import subprocess
    import sys

    corpus = write_corpus(tmp_path / "pd.txt", lines=300)
    core.build(small_config(corpus, tmp_path / "ds"))
    program = (
        "import signal, sys\n"
        "signal.signal(signal.SIGTERM, lambda *a: None)\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
        "from data_prep.verify import verify_dataset\n"
        "for _ in range(20):\n"
        f"    report = verify_dataset({str(tmp_path / 'ds')!r}, progress=False, workers=2, chunk_tokens=2000)\n"
        "    assert report.ok, report.summary()\n"
        "print('verified')\n"
    )
    done = subprocess.run([sys.executable, "-c", program], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0 and "verified" in done.stdout, done.stderr[-2000:]


def test_streams_of_other_sentence_lengths_are_named(tmp_path):
    """An align stream whose sentences are not as long as the coarse ones (both files consistent
    with their own index, so the dataset opens): the chunk is named as unreadable, not misread."""
    corpus = write_corpus(tmp_path / "pd.txt", lines=200)
    core.build(small_config(corpus, tmp_path / "ds"))

    def damage(documents):
        sentence = documents[5][0]
        sentence[2] = np.append(sentence[2], 1)

    rewrite_train(tmp_path / "ds", tmp_path / "damaged", damage)
    report = verify_dataset(str(tmp_path / "damaged"), progress=False, chunk_tokens=1000)
    assert not report.ok
    assert any(d.endswith("train_align.idx and " + str(tmp_path / "damaged" / "train_coarse.idx") + " give sentence "
                          f"{fmt.PairedDataset(tmp_path / 'ds').split('train').document_indices[5]:,} other lengths (one "
                          "align count per coarse token): one of them is damaged; rebuild the dataset")
               for d in report.defects), report.summary()
    # the split is not checked further: no tokens counted; the valid split is checked and fine
    assert "train" not in report.counts and report.counts["valid"]["decoded_equal"] > 0


def test_a_damaged_index_pointer_or_length_is_named(tmp_path):
    """A flipped byte inside an .idx (a sentence's pointer, or its length) kept the file's size and its
    last pointer, so the dataset opened and --verify passed, while the reader returned other tokens."""
    corpus = write_corpus(tmp_path / "pd.txt", lines=300)
    core.build(small_config(corpus, tmp_path / "ds"))
    n = fmt.PairedDataset(tmp_path / "ds").split("train").num_sentences
    header = 34  # magic 9 + version 8 + dtype 1 + sentence count 8 + document count 8; then int32 lengths, int64 pointers
    for stream, offset, message in (
            ("align", header + 4 * n + 8 * 200 + 1, "sentence 200 starts at byte "),
            ("coarse", header + 4 * 150, "sentence 151 starts at byte "),  # sentence 150's length: 151 moves
            ("fine", header + 4 * n + 8 * n + 8 * 3, "have other document boundaries")):  # named at open
        damaged = tmp_path / f"damaged_{stream}"
        shutil.copytree(tmp_path / "ds", damaged)
        path = damaged / f"train_{stream}.idx"
        data = bytearray(path.read_bytes())
        data[offset] ^= 4
        path.write_bytes(bytes(data))
        report = verify_dataset(str(damaged), progress=False)
        assert not report.ok and any(str(path) in d and message in d for d in report.defects), report.summary()
    assert verify_dataset(str(tmp_path / "ds"), progress=False).ok
