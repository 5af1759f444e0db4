"""The on-disk format: write -> read round trip, invariants, atomic directories."""

import re
import shutil

import numpy as np
import pytest

from data_prep import format as fmt


def _write(tmp_path, docs, fine_vocab=300, coarse_vocab=70000):
    with (atomic := fmt.AtomicDirectory(tmp_path / "ds")) as work:
        w = fmt.SplitWriter(work, "train", fine_vocab, coarse_vocab)
        for d in docs:
            w.add_document(d)
        stats = w.finalize()
        for split in ("valid",):
            fmt.SplitWriter(work, split, fine_vocab, coarse_vocab).finalize()
        fmt.Vocab.from_tokens(f"f{i}" for i in range(fine_vocab - fmt.NUM_SPECIAL)).save(work / fmt.FINE_VOCAB_FILE)
        fmt.Vocab.from_tokens(f"c{i}" for i in range(coarse_vocab - fmt.NUM_SPECIAL)).save(work / fmt.COARSE_VOCAB_FILE)
        fmt.write_meta(work, {"language": "zh", "fine_vocab_size": fine_vocab, "coarse_vocab_size": coarse_vocab})
        atomic.commit()
    return stats


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(20):
        sents = []
        for _ in range(rng.integers(1, 5)):
            align = rng.integers(1, 4, size=rng.integers(1, 9))
            fine = rng.integers(0, 300, size=int(align.sum()))
            coarse = rng.integers(0, 70000, size=len(align))
            sents.append((fine, coarse, align))
        docs.append(sents)
    stats = _write(tmp_path, docs)
    assert stats["documents"] == 20
    ds = fmt.PairedDataset(tmp_path / "ds")
    split = ds.split("train")
    assert len(split) == 20
    assert split.coarse.index.dtype == np.int32 and split.fine.index.dtype == np.uint16
    fine_lens, coarse_lens = split.document_lengths()
    for i, sents in enumerate(docs):
        doc = split.document(i)
        np.testing.assert_array_equal(doc.fine, np.concatenate([s[0] for s in sents]))
        np.testing.assert_array_equal(doc.coarse, np.concatenate([s[1] for s in sents]))
        np.testing.assert_array_equal(doc.align, np.concatenate([s[2] for s in sents]))
        assert doc.num_sentences == len(sents)
        assert fine_lens[i] == len(doc.fine) and coarse_lens[i] == len(doc.coarse)
        spans = doc.coarse_to_fine_spans()
        assert spans[-1, 1] == len(doc.fine) and np.all(spans[:, 1] - spans[:, 0] == doc.align)
    assert len(ds.split("valid")) == 0


@pytest.mark.parametrize(
    "sentence, message",
    [
        (([5, 6, 7], [9, 10], [1, 1]), "covers 2 fine tokens"),
        (([5, 6], [9], [1, 1]), "2 alignment counts for 1 coarse"),
        (([5, 6], [9, 10], [2, 0]), "between 1 and 65535"),
        (([5, 600], [9], [2]), "fine id out of range"),
        (([], [], []), "empty sentence"),
    ],
)
def test_bad_sentence_rejected_before_write(tmp_path, sentence, message):
    w = fmt.SplitWriter(tmp_path, "train", 300, 300)
    w.add_document([([1, 2], [3], [2])])
    with pytest.raises(fmt.FormatError, match=message):
        w.add_document([([1, 2], [3], [2]), sentence])
    w.finalize()
    split = fmt.PairedSplit(tmp_path, "train")
    assert len(split) == 1 and split.num_sentences == 1  # the bad document wrote nothing


def test_interrupted_build_leaves_no_dataset(tmp_path):
    with pytest.raises(RuntimeError):
        with fmt.AtomicDirectory(tmp_path / "ds") as work:
            (work / "train_fine.bin").write_bytes(b"x")
            raise RuntimeError("killed")
    assert not (tmp_path / "ds").exists()
    assert not list(tmp_path.iterdir())
    with pytest.raises(fmt.FormatError, match="is not a paired dataset: it does not exist"):
        fmt.PairedDataset(tmp_path / "ds")
    (tmp_path / "ds").mkdir()
    with pytest.raises(fmt.FormatError, match="is not a paired dataset: meta.json is missing"):
        fmt.PairedDataset(tmp_path / "ds")


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "ds").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        fmt.AtomicDirectory(tmp_path / "ds")
    atomic = fmt.AtomicDirectory(tmp_path / "ds", overwrite=True)
    with atomic as work:
        (work / "marker").write_text("new")
        atomic.commit()
    assert (tmp_path / "ds" / "marker").read_text() == "new"


def test_vocab_rules(tmp_path):
    with pytest.raises(fmt.FormatError, match=r"a vocabulary must start with the special tokens \('\[PAD\]', "
                                              r"'\[UNK\]', '\[CLS\]', '\[SEP\]', '\[MASK\]'\), got \['a', 'b'\]"):
        fmt.Vocab(["a", "b"])
    with pytest.raises(fmt.FormatError, match="duplicate vocabulary entry 'a'"):
        fmt.Vocab(list(fmt.SPECIAL_TOKENS) + ["a", "a"])
    v = fmt.Vocab.from_tokens(["中", "国", "[MASK]"])
    assert len(v) == fmt.NUM_SPECIAL + 2 and v.id("中") == 5 and v.id("x") == fmt.UNK_ID
    v.save(tmp_path / "v.txt")
    assert fmt.Vocab.load(tmp_path / "v.txt").tokens == v.tokens
    assert (tmp_path / "v.txt").read_bytes() == "".join(t + "\n" for t in v.tokens).encode("utf-8")
    fmt.Vocab.save_tokens(tmp_path / "w.txt", v.tokens)  # (no Vocab made): the same bytes
    assert (tmp_path / "w.txt").read_bytes() == (tmp_path / "v.txt").read_bytes()
    assert fmt.Vocab.size_of(tmp_path / "v.txt") == len(v)
    (tmp_path / "w.txt").write_text("\n".join(v.tokens), encoding="utf-8")  # no final line break
    assert fmt.Vocab.size_of(tmp_path / "w.txt") == len(fmt.Vocab.load(tmp_path / "w.txt")) == len(v)
    with pytest.raises(fmt.FormatError, match="missing.txt is missing: restore it, or rebuild the dataset"):
        fmt.Vocab.size_of(tmp_path / "missing.txt")
    (tmp_path / "w.txt").write_bytes(b"\xff\n")
    with pytest.raises(fmt.FormatError, match="w.txt: 'utf-8' codec can't decode"):
        fmt.Vocab.size_of(tmp_path / "w.txt")
    for bad in ("a\nb", "x\r", "\n"):  # one token a line: a line break inside one is refused, nothing written
        with pytest.raises(fmt.FormatError, match=f"vocabulary entry {re.escape(repr(bad))} contains a line break"):
            fmt.Vocab.from_tokens(["中", bad, "国"]).save(tmp_path / "bad.txt")
        with pytest.raises(fmt.FormatError, match="contains a line break"):
            fmt.Vocab.save_tokens(tmp_path / "bad.txt", [*fmt.SPECIAL_TOKENS, bad])
        assert not (tmp_path / "bad.txt").exists()


def test_detokenize_conventions():
    assert fmt.detokenize(["中", "国", "GDP", "增", "长", "2", "##0", "%"], "zh") == "中国GDP增长20%"
    assert fmt.detokenize(["Linux", "kernel", "文", "档"], "zh") == "Linux kernel文档"
    assert fmt.detokenize(["a_new", "chapel", "in", "york", "##shire"], "en") == "a new chapel in yorkshire"


def _random_docs(rng, n, fine_vocab=300, coarse_vocab=70000):
    docs = []
    for _ in range(n):
        sents = []
        for _ in range(rng.integers(1, 5)):
            align = rng.integers(1, 4, size=rng.integers(1, 9))
            sents.append((rng.integers(0, fine_vocab, size=int(align.sum())),
                          rng.integers(0, coarse_vocab, size=len(align)), align))
        docs.append(sents)
    return docs


def test_bulk_writer_and_merge_write_megatron_bytes(tmp_path):
    """write_indexed_dataset / merge_splits (no megatron import) == megatron-core's builder, byte for byte."""
    rng = np.random.default_rng(1)
    parts = [_random_docs(rng, n) for n in (7, 1, 12)]
    # The reference: megatron-core's IndexedDatasetBuilder, one document at a time, all parts in order.
    ref = tmp_path / "ref"
    ref.mkdir()
    w = fmt.SplitWriter(ref, "train", 300, 70000)
    for docs in parts:
        for d in docs:
            w.add_document(d)
    ref_stats = w.finalize()
    # Ours: each part written in bulk, then merged.
    part_dirs = []
    for k, docs in enumerate(parts):
        d = tmp_path / f"part{k}"
        d.mkdir()
        sents = [s for doc in docs for s in doc]
        doc_index = np.concatenate([[0], np.cumsum([len(doc) for doc in docs])])
        for stream, col, dtype in (("fine", 0, fmt.id_dtype(300)), ("coarse", 1, fmt.id_dtype(70000)),
                                   ("align", 2, fmt.ALIGN_DTYPE)):
            values = np.concatenate([s[col] for s in sents])
            lengths = [len(s[col]) for s in sents]
            fmt.write_indexed_dataset(fmt.prefix(d, "train", stream), dtype, values, lengths, doc_index)
        part_dirs.append(d)
    single = tmp_path / "single"
    single.mkdir()
    assert fmt.merge_splits(single, "train", part_dirs[:1], 300, 70000)["documents"] == 7
    ours = tmp_path / "ours"
    ours.mkdir()
    stats = fmt.merge_splits(ours, "train", part_dirs, 300, 70000)
    assert stats == ref_stats
    for stream in fmt.STREAMS:
        for ext in (".bin", ".idx"):
            assert (ours / f"train_{stream}{ext}").read_bytes() == (ref / f"train_{stream}{ext}").read_bytes(), (stream, ext)
            assert (part_dirs[0] / f"train_{stream}{ext}").read_bytes() == (single / f"train_{stream}{ext}").read_bytes()
    split = fmt.PairedSplit(ours, "train")  # and megatron-core reads it
    assert len(split) == 20 and split.num_sentences == stats["sentences"]


def test_bin_concatenation_during_encoding_equals_the_merge(tmp_path):
    """BinConcatenator (the shards' .bin bytes appended in order as they become ready, in any order)
    + merge_splits(bin_written=True) writes the bytes of a plain merge; a concatenation that stopped
    short is refused with a message that says so."""
    rng = np.random.default_rng(2)
    part_dirs = []
    for k, n in enumerate((5, 9, 1, 4)):
        d = tmp_path / f"part{k}"
        d.mkdir()
        for split in fmt.SPLITS:
            docs = _random_docs(rng, n)
            sents = [s for doc in docs for s in doc]
            doc_index = np.concatenate([[0], np.cumsum([len(doc) for doc in docs])])
            for stream, col, dtype in (("fine", 0, fmt.id_dtype(300)), ("coarse", 1, fmt.id_dtype(70000)),
                                       ("align", 2, fmt.ALIGN_DTYPE)):
                fmt.write_indexed_dataset(fmt.prefix(d, split, stream), dtype, np.concatenate([s[col] for s in sents]),
                                          [len(s[col]) for s in sents], doc_index)
        part_dirs.append(d)
    plain = tmp_path / "plain"
    plain.mkdir()
    expected = {split: fmt.merge_splits(plain, split, part_dirs, 300, 70000) for split in fmt.SPLITS}
    concat = fmt.BinConcatenator(tmp_path / "staging", part_dirs)
    ready: set[int] = set()
    for k in (2, 0, 3, 1):  # parts finish out of order; only leading ready parts are copied
        ready.add(k)
        concat.append_ready(ready.__contains__)
        assert concat.done == next(i for i in range(5) if i not in ready)
    concat.append_ready(ready.__contains__)  # nothing left: no double copy
    concat.close()
    assert concat.complete
    ours = tmp_path / "ours"
    ours.mkdir()
    for split in fmt.SPLITS:
        for stream in fmt.STREAMS:
            (tmp_path / "staging" / f"{split}_{stream}.bin").rename(ours / f"{split}_{stream}.bin")
        assert fmt.merge_splits(ours, split, part_dirs, 300, 70000, bin_written=True) == expected[split]
        for stream in fmt.STREAMS:
            for ext in (".bin", ".idx"):
                assert (ours / f"{split}_{stream}{ext}").read_bytes() == (plain / f"{split}_{stream}{ext}").read_bytes()
    # with the vocabularies' sizes it builds the indexes as it goes: write_split gives the same bytes
    concat = fmt.BinConcatenator(tmp_path / "staging2", part_dirs, vocab_sizes=(300, 70000))
    for k in (1, 0, 3, 2):
        ready.discard(k)
    for k in (3, 0, 2, 1):
        ready.add(k)
        concat.append_ready(ready.__contains__)
    with pytest.raises(fmt.FormatError, match="internal"):  # the parts' .bin files are not in place yet
        fmt.BinConcatenator(tmp_path / "staging3", part_dirs, vocab_sizes=(300, 70000)).write_split(tmp_path, "train")
    streamed = tmp_path / "streamed"
    streamed.mkdir()
    for split in fmt.SPLITS:
        for stream in fmt.STREAMS:
            (tmp_path / "staging2" / f"{split}_{stream}.bin").rename(streamed / f"{split}_{stream}.bin")
        assert concat.write_split(streamed, split) == expected[split]
        for stream in fmt.STREAMS:
            for ext in (".bin", ".idx"):
                assert (streamed / f"{split}_{stream}{ext}").read_bytes() == (plain / f"{split}_{stream}{ext}").read_bytes()
    assert concat.extras == [None] * 4  # (plain parts carry no extra)
    assert sorted(p.name for p in (tmp_path / "staging2").iterdir()) == []  # the index pieces are gone
    wrong = fmt.BinConcatenator(tmp_path / "staging4", part_dirs, vocab_sizes=(70000, 70000))
    with pytest.raises(fmt.FormatError, match="different vocabularies; rebuild them with the same ones"):
        wrong.append_ready(lambda k: True)
    wrong.close()
    short = tmp_path / "short"
    short.mkdir()
    concat = fmt.BinConcatenator(short, part_dirs)
    concat.append_ready(lambda k: k < 2)
    concat.close()
    assert not concat.complete
    with pytest.raises(fmt.FormatError, match="interrupted"):
        fmt.merge_splits(short, "train", part_dirs, 300, 70000, bin_written=True)


def _copy_refused_after(limit: int):
    """A ``copy_file_range`` that copies ``limit`` bytes in all, then fails as across filesystems."""
    import errno
    import os

    left = [limit]

    def copy(src, dst, count, offset_src=None):
        if not left[0]:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        n = os.copy_file_range(src, dst, min(count, left[0], 7), offset_src)
        left[0] -= n
        return n

    return copy


@pytest.mark.parametrize("copy", ["kernel", "plain", "refused", "refused-midway"])
def test_part_files_merge_like_plain_datasets(tmp_path, monkeypatch, copy):
    """A shard's six IndexedDatasets in one part file (write_part, values given whole or in slices)
    merge, plainly or through BinConcatenator, into the bytes the plain .bin/.idx parts merge into
    (themselves checked against megatron-core's builder above); its extra comes back; a part file
    cut short, or not one at all, is refused by name. The values are copied in the kernel
    (``os.copy_file_range``), in Python where it does not exist, and in Python from where the kernel
    refused (another filesystem), from the start or midway: the same bytes every way."""
    if copy != "kernel":
        monkeypatch.setattr(fmt, "_copy_file_range", None if copy == "plain" else _copy_refused_after(0 if copy == "refused" else 50))
    elif fmt._copy_file_range is None:
        pytest.skip("os.copy_file_range is Linux only")
    rng = np.random.default_rng(3)
    dtypes = {"fine": fmt.id_dtype(300), "coarse": fmt.id_dtype(70000), "align": fmt.ALIGN_DTYPE}
    part_dirs, part_files = [], []
    for k, n in enumerate((5, 9, 0, 4)):
        d = tmp_path / f"part{k}"
        d.mkdir()
        sections = {}
        for split in fmt.SPLITS:
            docs = _random_docs(rng, n)
            sents = [s for doc in docs for s in doc]
            doc_index = np.concatenate([[0], np.cumsum([len(doc) for doc in docs])]).astype(np.int64)
            for stream, col in (("fine", 0), ("coarse", 1), ("align", 2)):
                values = np.concatenate([s[col] for s in sents]) if sents else np.zeros(0, dtype=np.int64)
                lengths = [len(s[col]) for s in sents]
                fmt.write_indexed_dataset(fmt.prefix(d, split, stream), dtypes[stream], values, lengths, doc_index)
                chunks = iter([values[i:i + 3] for i in range(0, len(values), 3)]) if k % 2 else values
                sections[(split, stream)] = (dtypes[stream], chunks, lengths, doc_index)
        fmt.write_part(tmp_path / f"part{k}.part", sections, {"documents": 2 * n, "k": k})
        part_dirs.append(d)
        part_files.append(tmp_path / f"part{k}.part")
    assert [fmt.read_part(f)[1] for f in part_files] == [{"documents": 2 * n, "k": k} for k, n in enumerate((5, 9, 0, 4))]
    assert not list(tmp_path.glob("*.tmp-*"))
    plain, ours = tmp_path / "plain", tmp_path / "ours"
    plain.mkdir()
    ours.mkdir()
    concat = fmt.BinConcatenator(tmp_path / "staging", part_files, vocab_sizes=(300, 70000))
    concat.append_ready(lambda k: True)
    concat.close()
    assert concat.extras == [{"documents": 2 * n, "k": k} for k, n in enumerate((5, 9, 0, 4))]
    streamed = tmp_path / "streamed"
    streamed.mkdir()
    for split in fmt.SPLITS:
        expected = fmt.merge_splits(plain, split, part_dirs, 300, 70000)
        assert fmt.merge_splits(ours, split, part_files, 300, 70000) == expected
        for stream in fmt.STREAMS:
            for ext in (".bin", ".idx"):
                assert (ours / f"{split}_{stream}{ext}").read_bytes() == (plain / f"{split}_{stream}{ext}").read_bytes()
            assert (tmp_path / "staging" / f"{split}_{stream}.bin").read_bytes() == (plain / f"{split}_{stream}.bin").read_bytes()
            shutil.copy(tmp_path / "staging" / f"{split}_{stream}.bin", streamed)
        assert concat.write_split(streamed, split) == expected
        for stream in fmt.STREAMS:
            assert (streamed / f"{split}_{stream}.idx").read_bytes() == (plain / f"{split}_{stream}.idx").read_bytes()
    data = part_files[1].read_bytes()
    part_files[1].write_bytes(data[:-5])
    with pytest.raises(fmt.FormatError, match=r"part1.part is not a complete shard part .*truncated"):
        fmt.merge_splits(ours, "train", part_files, 300, 70000)
    part_files[1].write_bytes(data[200:])  # the trailer is intact, the sections it describes are not
    with pytest.raises(fmt.FormatError, match="truncated"):
        fmt.merge_splits(ours, "train", part_files, 300, 70000)


def test_merge_refuses_parts_with_other_vocabulary_sizes(tmp_path):
    for name, size in (("a", 300), ("b", 70000)):
        d = tmp_path / name
        d.mkdir()
        for stream in fmt.STREAMS:
            dtype = fmt.ALIGN_DTYPE if stream == "align" else fmt.id_dtype(size)
            fmt.write_indexed_dataset(fmt.prefix(d, "train", stream), dtype, np.ones(3), [3], [0, 1])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(fmt.FormatError, match="different vocabularies; rebuild them with the same ones"):
        fmt.merge_splits(out, "train", [tmp_path / "a", tmp_path / "b"], 300, 300)
    (tmp_path / "a" / "train_fine.idx").write_bytes(b"garbage")
    with pytest.raises(fmt.FormatError, match="not a megatron-core IndexedDataset index"):
        fmt.read_index(fmt.prefix(tmp_path / "a", "train", "fine"))


def test_vocab_token_names_an_id_outside_it():
    """``decode_coarse([-1])`` returned the last entry (negative indexing); a large id raised a bare
    IndexError."""
    vocab = fmt.Vocab.from_tokens(["a", "b"])
    assert vocab.token(6) == "b"
    for bad in (-1, 7, 10**6):
        with pytest.raises(fmt.FormatError, match=rf"token id {bad} is outside the vocabulary \(ids 0..6\)"):
            vocab.token(bad)


def test_a_reader_refuses_a_split_of_a_dataset_rebuilt_after_it_opened(tmp_path):
    """Splits open lazily, the vocabularies at open: a split opened after an in-place rebuild was decoded
    with the old vocabularies (wrong words, no error)."""
    from data_prep import core
    from tests.test_data_prep_zh import small_config, write_corpus

    corpus = write_corpus(tmp_path / "pd.txt", lines=200)
    core.build(small_config(corpus, tmp_path / "ds"))
    ds = fmt.PairedDataset(tmp_path / "ds")
    first = ds.split("train").document(0).fine.copy()
    core.build(small_config(corpus, tmp_path / "ds", overwrite=True, fine_vocab_size=1200))
    with pytest.raises(fmt.FormatError, match=r"ds was rebuilt after this reader opened it: its valid split would be "
                                              r"read with the old vocabularies\. Open the dataset again"):
        ds.split("valid")
    assert np.array_equal(ds.split("train").document(0).fine, first)  # a split already open still reads its files
    assert len(fmt.PairedDataset(tmp_path / "ds").split("valid")) > 0
