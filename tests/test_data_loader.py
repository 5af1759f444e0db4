"""Pre-training data: packing, span-consistent masking statistics, sampler sharding and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import format as fmt
from pipeline import data as D
from pipeline.batch import IGNORE_INDEX, check_batch


def write_synthetic_dataset(directory, num_docs=60, fine_vocab=64, coarse_vocab=200, seed=0, max_sentence_words=14):
    """A learnable toy language in the paired format (a demo-like stand-in for tests).

    Coarse "words" follow a sparse bigram chain; each word is spelled by a fixed string of 1-3 fine
    "characters", so the fine side is exactly the same text at a finer grain.
    """
    rng = np.random.default_rng(seed)
    words = np.arange(fmt.NUM_SPECIAL, coarse_vocab)
    # Zipf-like frequencies on both sides, as in real text: a model learns the unigram part in a few steps.
    word_p = 1.0 / np.arange(1, len(words) + 1)
    word_p /= word_p.sum()
    chars = np.arange(fmt.NUM_SPECIAL, fine_vocab)
    char_p = 1.0 / np.arange(1, len(chars) + 1) ** 1.2
    char_p /= char_p.sum()
    spelling = {int(w): rng.choice(chars, size=int(rng.integers(1, 4)), p=char_p) for w in words}
    successors = {int(w): rng.choice(words, size=3, p=word_p) for w in words}

    def document(n_sentences):
        sents = []
        for _ in range(n_sentences):
            w = int(rng.choice(words, p=word_p))
            coarse = []
            for _ in range(int(rng.integers(3, max_sentence_words + 1))):
                coarse.append(w)
                w = int(rng.choice(successors[w]))
            align = [len(spelling[c]) for c in coarse]
            fine = np.concatenate([spelling[c] for c in coarse])
            sents.append((fine, coarse, align))
        return sents

    with (atomic := fmt.AtomicDirectory(directory, overwrite=True)) as work:
        for split, n in (("train", num_docs), ("valid", max(2, num_docs // 10))):
            w = fmt.SplitWriter(work, split, fine_vocab, coarse_vocab)
            for _ in range(n):
                w.add_document(document(int(rng.integers(1, 8))))
            w.finalize()
        fmt.Vocab.from_tokens(f"f{i}" for i in range(fine_vocab - fmt.NUM_SPECIAL)).save(work / fmt.FINE_VOCAB_FILE)
        fmt.Vocab.from_tokens(f"c{i}" for i in range(coarse_vocab - fmt.NUM_SPECIAL)).save(work / fmt.COARSE_VOCAB_FILE)
        fmt.write_meta(
            work,
            {"language": "zh", "fine_vocab_size": fine_vocab, "coarse_vocab_size": coarse_vocab, "splits": {"seed": seed, "docs": num_docs}},
        )
        atomic.commit()
    return directory


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "ds", num_docs=80)


def _all_rows_text(split, index):
    return [D.read_sample(split, row) for row in index]


def test_packing_keeps_documents_budget_and_alignment(dataset_dir):
    ds = fmt.PairedDataset(dataset_dir)
    split = ds.split("train")
    index = D.build_sample_index(split, max_fine_tokens=30)
    assert len(index) > len(split)  # documents longer than 30 fine tokens were split into several samples
    covered = set()
    doc_of_sentence = np.searchsorted(split.document_indices, np.arange(split.num_sentences), side="right") - 1
    for row in index:
        first, end, cb, ce = row
        assert len(set(doc_of_sentence[first:end])) == 1, "a sample crosses a document boundary"
        raw = D.read_sample(split, row)
        assert 0 < len(raw.fine) <= 30 and len(raw.coarse) == ce - cb
        assert raw.align.sum() == len(raw.fine)  # same text on both sides
        covered.update(range(first, end))
    assert covered == set(range(split.num_sentences))  # nothing dropped


def test_long_sentence_is_cut_at_coarse_boundaries(tmp_path):
    d = write_synthetic_dataset(tmp_path / "long", num_docs=10, max_sentence_words=40)
    split = fmt.PairedSplit(d, "train")
    index = D.build_sample_index(split, max_fine_tokens=8)
    pieces = index[(index[:, D.END_SENTENCE] - index[:, D.FIRST_SENTENCE] == 1)]
    total_coarse = 0
    for s in range(split.num_sentences):
        rows = pieces[pieces[:, 0] == s]
        if int(split.fine.sequence_lengths[s]) > 8:
            # pieces of an over-long sentence tile its coarse tokens exactly, in order
            assert rows[0, D.COARSE_BEGIN] == 0 and rows[-1, D.COARSE_END] == len(split.coarse[s])
            assert np.array_equal(rows[1:, D.COARSE_BEGIN], rows[:-1, D.COARSE_END])
    for row in index:
        raw = D.read_sample(split, row)
        assert len(raw.fine) <= 8 and raw.align.sum() == len(raw.fine)
        total_coarse += len(raw.coarse)
    assert total_coarse == int(split.coarse.sequence_lengths.sum())


def test_masking_rates_and_80_10_10_within_tolerance():
    """Statistics over 4000 samples: coarse rate, fine ~ span union, 80/10/10 split, vocab ranges."""
    rng = np.random.default_rng(1)
    masking = D.MaskingConfig(mask_rate=0.15)
    n_coarse_total = n_coarse_masked = n_fine_total = n_fine_masked = expected_fine = 0
    actions = np.zeros(3)
    fine_vocab, coarse_vocab = 50, 5000
    for i in range(4000):
        align = rng.integers(1, 4, size=int(rng.integers(20, 60)))
        raw = D.RawSample(
            fine=rng.integers(fmt.NUM_SPECIAL, fine_vocab, size=int(align.sum())),
            coarse=rng.integers(fmt.NUM_SPECIAL, coarse_vocab, size=len(align)),
            align=align,
        )
        m = D.mask_sample(raw, D.mask_rng(0, 0, i), masking, fine_vocab, coarse_vocab)
        chosen = m.coarse_labels != IGNORE_INDEX
        fine_chosen = m.fine_labels != IGNORE_INDEX
        # span consistency: a fine token is predicted iff the coarse token covering it is
        assert np.array_equal(fine_chosen, chosen[m.fine_to_coarse])
        assert np.array_equal(m.coarse_labels[chosen], raw.coarse[chosen])
        assert np.array_equal(m.fine_labels[fine_chosen], raw.fine[fine_chosen])
        assert np.array_equal(m.coarse_ids[~chosen], raw.coarse[~chosen])  # nothing else touched
        assert np.array_equal(m.fine_ids[~fine_chosen], raw.fine[~fine_chosen])
        # the same action on both sides of a span: [MASK] in coarse <=> all its fine tokens [MASK]
        coarse_is_mask = m.coarse_ids == fmt.MASK_ID
        assert np.array_equal(coarse_is_mask[m.fine_to_coarse], m.fine_ids == fmt.MASK_ID)
        # random replacements stay inside each side's own vocabulary, never a special token
        assert m.coarse_ids[~coarse_is_mask].min() >= fmt.NUM_SPECIAL
        assert m.fine_ids[m.fine_ids != fmt.MASK_ID].min() >= fmt.NUM_SPECIAL
        assert m.coarse_ids.max() < coarse_vocab and m.fine_ids.max() < fine_vocab
        n_coarse_total += len(raw.coarse)
        n_coarse_masked += chosen.sum()
        n_fine_total += len(raw.fine)
        n_fine_masked += fine_chosen.sum()
        expected_fine += align[chosen].sum()
        kept = m.coarse_ids[chosen] == raw.coarse[chosen]
        actions += [coarse_is_mask[chosen].sum(), (~kept & ~coarse_is_mask[chosen]).sum(), kept.sum()]
    assert abs(n_coarse_masked / n_coarse_total - 0.15) < 0.005
    # fine masking ~ coarse masking spans: average span width 2 -> the same 15% of fine tokens
    assert n_fine_masked == expected_fine
    assert abs(n_fine_masked / n_fine_total - 0.15) < 0.01
    shares = actions / actions.sum()
    # a random replacement equal to the original (1 in 4996) counts as "kept": negligible
    assert abs(shares[0] - 0.8) < 0.015 and abs(shares[1] - 0.1) < 0.01 and abs(shares[2] - 0.1) < 0.01, shares


def test_masking_rate_is_configurable_and_fine_rate_follows_span_width():
    rng = np.random.default_rng(2)
    masking = D.MaskingConfig(mask_rate=0.3)
    coarse_masked = coarse_total = fine_masked = fine_total = 0
    for i in range(1500):
        align = np.where(rng.random(40) < 0.5, 1, 3)  # Chinese-like: many multi-character words
        raw = D.RawSample(np.full(int(align.sum()), 9), np.full(40, 9), align)
        m = D.mask_sample(raw, D.mask_rng(5, 0, i), masking, 30, 30)
        coarse_masked += (m.coarse_labels != IGNORE_INDEX).sum()
        coarse_total += 40
        fine_masked += (m.fine_labels != IGNORE_INDEX).sum()
        fine_total += len(raw.fine)
    assert abs(coarse_masked / coarse_total - 0.3) < 0.005
    # fine share = 0.3 * E[width of a chosen word] / E[width] = 0.3 exactly in expectation here,
    # but per sample it varies: check it lands near 0.3 and not near the coarse count ratio
    assert abs(fine_masked / fine_total - 0.3) < 0.01


def test_masks_are_deterministic_per_sample(dataset_dir):
    ds = fmt.PairedDataset(dataset_dir)
    a = D.PretrainingSamples(ds, "train", 32, None, D.MaskingConfig(), seed=3)
    b = D.PretrainingSamples(ds, "train", 32, None, D.MaskingConfig(), seed=3)
    c = D.PretrainingSamples(ds, "train", 32, None, D.MaskingConfig(), seed=4)
    for pos in (0, 5, len(a) + 5):  # reading order and cached permutations do not matter
        x, y = a[pos], b[pos]
        assert np.array_equal(x.fine_ids, y.fine_ids) and np.array_equal(x.coarse_labels, y.coarse_labels)
    assert any(not np.array_equal(a[p].coarse_ids, c[p].coarse_ids) for p in range(10))
    # a new epoch reorders and re-masks the same samples
    n = len(a)
    assert [a.sample_of_position(p)[1] for p in range(n)] != [a.sample_of_position(n + p)[1] for p in range(n)]
    first_epoch = {a.sample_of_position(p)[1]: p for p in range(n)}
    differ = 0
    for p in range(n, n + 20):
        again = first_epoch[a.sample_of_position(p)[1]]
        differ += not np.array_equal(a[p].coarse_labels, a[again].coarse_labels)
    assert differ >= 10


def test_sampler_shards_disjointly_and_matches_across_layouts():
    # dp=2, accum=1 and dp=1, accum=2 read the same micro-batches in the same order per step
    s2 = [iter(D.ConsumedSamplesSampler(0, 3, 1, r, 2)) for r in range(2)]
    s1 = iter(D.ConsumedSamplesSampler(0, 3, 2, 0, 1))
    seen = set()
    for _ in range(5):
        micro = [next(s) for s in s2]
        assert micro == [next(s1), next(s1)]
        for m in micro:
            assert not seen & set(m)
            seen |= set(m)
    assert seen == set(range(30))
    # resume: starting from consumed samples continues exactly where the step left off
    full = D.ConsumedSamplesSampler(0, 2, 2, 1, 2)
    it = iter(full)
    batches = [next(it) for _ in range(8)]
    resumed = iter(D.ConsumedSamplesSampler(2 * full.global_batch_size, 2, 2, 1, 2))
    assert [next(resumed) for _ in range(4)] == batches[4:]


def test_loader_batches_are_identical_after_resume_with_workers(dataset_dir):
    data = D.PretrainingData.open(str(dataset_dir), 32, D.MaskingConfig(), seed=11)
    assert data.coarse_length % 8 == 0 and data.coarse_length <= 32
    reference = data.loader("train", 0, 4, 2, dp_rank=1, dp_size=2, num_workers=0)
    it = iter(reference)
    ref = [next(it) for _ in range(6)]
    for b in ref:
        check_batch(b)
        assert b["fine_ids"].shape == (4, 32) and b["coarse_ids"].shape == (4, data.coarse_length)
        assert (b["fine_ids"][:, 0] == fmt.CLS_ID).all() and (b["coarse_ids"][:, 0] == fmt.CLS_ID).all()
        lens = b["fine_attention_mask"].sum(1)
        assert (b["fine_ids"][torch.arange(4), lens - 1] == fmt.SEP_ID).all()
        assert (b["fine_labels"][b["fine_attention_mask"] == 0] == IGNORE_INDEX).all()
    # resume after 1 step (global batch 16) with 2 workers: the same batches 2.. bit for bit
    resumed = data.loader("train", 16, 4, 2, dp_rank=1, dp_size=2, num_workers=2)
    it = iter(resumed)
    for expected in ref[2:]:
        got = next(it)
        for k in expected:
            assert torch.equal(got[k], expected[k]), k


def test_empty_split_is_refused(tmp_path):
    d = tmp_path / "ds"
    write_synthetic_dataset(d, num_docs=4)
    w = fmt.SplitWriter(d, "train", 64, 200)
    w.finalize()  # an empty train split
    with pytest.raises(ValueError, match=r"split 'train' of .*ds yields no samples \(no documents\); rebuild the "
                                         r"dataset with a non-empty train split"):
        D.PretrainingData.open(str(d), 32, D.MaskingConfig(), seed=0)


def test_damaged_ids_and_alignment_are_named_not_trained_on(tmp_path):
    """Bytes overwritten inside a .bin (size unchanged, so opening succeeds): the first sample that
    reads them names the dataset, the sentences and the fix. At TP > 1 megatron's vocab-parallel
    embedding would zero such ids and train on silently."""
    d = tmp_path / "ds"
    write_synthetic_dataset(d, num_docs=20)
    clean = D.PretrainingData.open(str(d), 32, D.MaskingConfig(), seed=0)
    for position in range(len(clean.train)):
        clean.train[position]  # a healthy dataset passes the check
    path = Path(fmt.prefix(d, "train", "fine") + ".bin")
    data = bytearray(path.read_bytes())
    data[64:96] = b"\xff" * 32
    path.write_bytes(bytes(data))
    damaged = D.PretrainingData.open(str(d), 32, D.MaskingConfig(), seed=0)
    with pytest.raises(fmt.FormatError, match=r"train split, sentences \d+\.\.\d+ \(sample \d+\): fine token id \d+ >= "
                                              r"the 64 entries of fine_vocab.txt.*--verify"):
        for position in range(len(damaged.train)):
            damaged.train[position]

    write_synthetic_dataset(d, num_docs=20)
    path = Path(fmt.prefix(d, "train", "align") + ".bin")
    data = bytearray(path.read_bytes())
    data[:8] = b"\x00" * 8
    path.write_bytes(bytes(data))
    damaged = D.PretrainingData.open(str(d), 32, D.MaskingConfig(), seed=0)
    with pytest.raises(fmt.FormatError, match="its alignment does not cover its fine tokens") as error:
        for position in range(len(damaged.train)):
            damaged.train[position]
    assert "token id" not in str(error.value)  # the ids themselves are intact this time


def test_dataset_without_vocabulary_files_is_named(tmp_path):
    d = tmp_path / "ds"
    write_synthetic_dataset(d, num_docs=4)
    (d / fmt.COARSE_VOCAB_FILE).unlink()
    with pytest.raises(fmt.FormatError, match=r"coarse_vocab.txt is missing: .* is not a complete paired dataset"):
        fmt.PairedDataset(d)


def test_fixed_coarse_length_packs_samples_to_fit_and_drops_no_text(dataset_dir):
    """data.coarse_seq_length below the packing's longest coarse side used to cut the tail of every
    longer sample off (both sides), silently: 4% of the zh demo text at seq_length 128 / coarse 64."""
    data = D.PretrainingData.open(str(dataset_dir), 32, D.MaskingConfig(), seed=0, coarse_length=10)
    unbounded = D.PretrainingData.open(str(dataset_dir), 32, D.MaskingConfig(), seed=0)
    assert data.coarse_length == 10 and unbounded.coarse_length > 10  # the budget binds
    for samples in (data.train, data.valid):
        split = samples.split
        total_fine = total_coarse = 0
        for position in range(len(samples)):
            m = samples[position]
            assert len(m.coarse_ids) <= 8 and len(m.fine_ids) <= 30
            assert len(m.fine_to_coarse) == len(m.fine_ids)
            total_fine += len(m.fine_ids)
            total_coarse += len(m.coarse_ids)
        assert total_fine == int(split.fine.sequence_lengths.sum())
        assert total_coarse == int(split.coarse.sequence_lengths.sum())
        batch = D.collate([samples[p] for p in range(4)], data.fine_length, data.coarse_length)
        assert batch["coarse_ids"].shape == (4, 10)
