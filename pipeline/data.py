"""Pre-training samples from a paired dataset: packing, span-consistent masking, sampler, loader.

The pieces, in the order data flows through them:

1. ``build_sample_index`` packs consecutive sentences of one document up to the fine sequence
   length (minus [CLS]/[SEP]), and up to a fixed coarse length if one is set; a sentence longer than
   that is cut at coarse-token boundaries, so a sample always holds exactly the same text on both
   sides and no text is cut off. The index is a small int64 array built
   from the sentence lengths alone (no token data is read except for over-long sentences), so every
   rank builds it itself, deterministically, in well under a second for the demo: no rank-0 cache,
   no barrier, nothing for another rank to time out on.
2. ``mask_sample`` masks a fraction of the COARSE tokens and exactly the fine tokens they cover
   (span-consistent masking, AMBERT section 3), with BERT's 80/10/10 replacement drawn from each
   side's own vocabulary (special tokens excluded). Its random generator is seeded by
   (seed, epoch, sample index): masks do not depend on worker count, rank count or resuming.
3. ``ConsumedSamplesSampler`` turns "samples consumed so far" into the positions each data-parallel
   rank reads next. Global position g is sample ``permutation(epoch)[g % N]`` with
   ``epoch = g // N``; a global batch is the next ``global_batch_size`` positions, dealt out
   micro-batch by micro-batch (micro-step m, DP rank r reads block ``m * dp + r``). Resuming is just
   starting from the saved count, and the micro-batches of a step are the same sets whatever the
   (TP, DP, accumulation) layout, which is what makes layouts comparable loss for loss.
4. ``collate`` adds [CLS]/[SEP], pads to fixed lengths and returns the batch dict of
   ``pipeline/batch.py``.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from data_prep.format import (
    CLS_ID,
    MASK_ID,
    NUM_SPECIAL,
    PAD_ID,
    SEP_ID,
    FormatError,
    PairedDataset,
    PairedSplit,
)
from pipeline.batch import IGNORE_INDEX

log = logging.getLogger(__name__)

# Columns of a sample index row: sentences [first, end) of one document, then the coarse-token range
# [coarse_begin, coarse_end) inside the concatenation of those sentences (the whole range for a
# packed sample, a slice for a piece of an over-long sentence).
FIRST_SENTENCE, END_SENTENCE, COARSE_BEGIN, COARSE_END = range(4)

# data.blend's i-th dataset (from 1) is shuffled and masked with seed + i * BLEND_SEED_STRIDE.
BLEND_SEED_STRIDE = 7919


@dataclass(frozen=True)
class MaskingConfig:
    """How a sample is masked (see ``DataConfig`` in pipeline/config.py for the documented fields)."""

    mask_rate: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1


# ---------------------------------------------------------------------------------------------
# 1. Packing
# ---------------------------------------------------------------------------------------------
def build_sample_index(split: PairedSplit, max_fine_tokens: int, max_coarse_tokens: int | None = None) -> np.ndarray:
    """[num_samples, 4] int64 rows (first sentence, end sentence, coarse begin, coarse end).

    ``max_fine_tokens`` is the budget for text tokens (sequence length minus [CLS] and [SEP]);
    ``max_coarse_tokens`` the same on the coarse side (a fixed data.coarse_seq_length). None: the fine
    budget alone (a coarse token covers at least one fine token, so the coarse side always fits it).
    """
    if max_coarse_tokens is None:
        max_coarse_tokens = max_fine_tokens
    if max_fine_tokens < 1 or max_coarse_tokens < 1:
        raise ValueError(f"max_fine_tokens and max_coarse_tokens must be >= 1, got {max_fine_tokens}, {max_coarse_tokens}")
    fine_lens = np.asarray(split.fine.sequence_lengths, dtype=np.int64)
    coarse_lens = np.asarray(split.coarse.sequence_lengths, dtype=np.int64)
    coarse_cum = np.concatenate([[0], np.cumsum(coarse_lens)])
    doc_bounds = split.document_indices
    rows: list[tuple[int, int, int, int]] = []
    dropped_tokens = 0
    for d in range(len(doc_bounds) - 1):
        lo, hi = int(doc_bounds[d]), int(doc_bounds[d + 1])
        start, total, count = lo, 0, 0
        for s in range(lo, hi):
            n, c = int(fine_lens[s]), int(coarse_lens[s])
            if n > max_fine_tokens or c > max_coarse_tokens:
                if start < s:
                    rows.append((start, s, 0, int(coarse_cum[s] - coarse_cum[start])))
                pieces, dropped = _split_long_sentence(
                    np.asarray(split.align[s], dtype=np.int64), max_fine_tokens, max_coarse_tokens)
                rows.extend((s, s + 1, b, e) for b, e in pieces)
                dropped_tokens += dropped
                start, total, count = s + 1, 0, 0
                continue
            if total + n > max_fine_tokens or count + c > max_coarse_tokens:
                rows.append((start, s, 0, int(coarse_cum[s] - coarse_cum[start])))
                start, total, count = s, 0, 0
            total += n
            count += c
        if start < hi:
            rows.append((start, hi, 0, int(coarse_cum[hi] - coarse_cum[start])))
    if dropped_tokens:
        log.warning("%d coarse tokens cover more fine tokens than a whole sequence and were dropped", dropped_tokens)
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


def _split_long_sentence(align: np.ndarray, budget: int, coarse_budget: int) -> tuple[list[tuple[int, int]], int]:
    """Cut one sentence into coarse-token ranges of at most ``budget`` fine tokens and
    ``coarse_budget`` coarse tokens each."""
    pieces, begin, total, dropped = [], 0, 0, 0
    for k, width in enumerate(align.tolist()):
        if width > budget:  # one coarse token longer than a sequence: cannot be kept whole
            if begin < k:
                pieces.append((begin, k))
            begin, total, dropped = k + 1, 0, dropped + 1
            continue
        if total + width > budget or k - begin >= coarse_budget:
            pieces.append((begin, k))
            begin, total = k, 0
        total += width
    if begin < len(align):
        pieces.append((begin, len(align)))
    return pieces, dropped


@dataclass
class RawSample:
    """The unmasked text of one sample on both sides, with the alignment between them."""

    fine: np.ndarray
    coarse: np.ndarray
    align: np.ndarray


def read_sample(split: PairedSplit, row: Sequence[int]) -> RawSample:
    first, end, coarse_begin, coarse_end = (int(x) for x in row)
    fine = np.concatenate(split.fine[first:end]).astype(np.int64)
    coarse = np.concatenate(split.coarse[first:end]).astype(np.int64)
    align = np.concatenate(split.align[first:end]).astype(np.int64)
    if coarse_begin != 0 or coarse_end != len(coarse):
        fine_begin = int(align[:coarse_begin].sum())
        fine_end = fine_begin + int(align[coarse_begin:coarse_end].sum())
        fine, coarse, align = fine[fine_begin:fine_end], coarse[coarse_begin:coarse_end], align[coarse_begin:coarse_end]
    return RawSample(fine, coarse, align)


# ---------------------------------------------------------------------------------------------
# 2. Span-consistent masking
# ---------------------------------------------------------------------------------------------
@dataclass
class MaskedSample:
    fine_ids: np.ndarray
    fine_labels: np.ndarray
    coarse_ids: np.ndarray
    coarse_labels: np.ndarray
    fine_to_coarse: np.ndarray  # index of the coarse token covering each fine token


def mask_rng(seed: int, epoch: int, sample_index: int) -> np.random.Generator:
    """The generator for one sample's mask: a pure function of (seed, epoch, sample index)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, sample_index])))


def mask_sample(
    sample: RawSample,
    rng: np.random.Generator,
    masking: MaskingConfig,
    fine_vocab_size: int,
    coarse_vocab_size: int,
) -> MaskedSample:
    """Mask ``mask_rate`` of the coarse tokens and the very same text spans on the fine side.

    Each chosen coarse token draws ONE action shared by its span: [MASK] (mask_token_prob), a
    random token (random_token_prob; every token of the span on the fine side draws its own random
    fine id) or unchanged. Labels hold the original ids at every chosen position.
    """
    num_coarse = len(sample.coarse)
    fine_to_coarse = np.repeat(np.arange(num_coarse), sample.align)
    num_masked = min(num_coarse, max(1, int(round(masking.mask_rate * num_coarse))))
    chosen = rng.choice(num_coarse, size=num_masked, replace=False)
    draw = rng.random(num_masked)
    action = np.zeros(num_coarse, dtype=np.int8)  # 0 untouched, 1 [MASK], 2 random, 3 kept
    action[chosen] = np.where(
        draw < masking.mask_token_prob, 1, np.where(draw < masking.mask_token_prob + masking.random_token_prob, 2, 3)
    )
    fine_action = action[fine_to_coarse]

    coarse_ids, fine_ids = sample.coarse.copy(), sample.fine.copy()
    coarse_labels = np.where(action > 0, sample.coarse, IGNORE_INDEX)
    fine_labels = np.where(fine_action > 0, sample.fine, IGNORE_INDEX)
    coarse_ids[action == 1] = MASK_ID
    fine_ids[fine_action == 1] = MASK_ID
    coarse_random = action == 2
    coarse_ids[coarse_random] = rng.integers(NUM_SPECIAL, coarse_vocab_size, size=int(coarse_random.sum()))
    fine_random = fine_action == 2
    fine_ids[fine_random] = rng.integers(NUM_SPECIAL, fine_vocab_size, size=int(fine_random.sum()))
    return MaskedSample(fine_ids, fine_labels, coarse_ids, coarse_labels, fine_to_coarse)


# ---------------------------------------------------------------------------------------------
# Dataset: global position -> masked sample
# ---------------------------------------------------------------------------------------------
class PretrainingSamples(torch.utils.data.Dataset):
    """Maps a global sample position (any non-negative integer) to a masked sample.

    Position g is epoch ``g // N``, sample ``permutation(seed, epoch)[g % N]`` (no shuffling for the
    valid split). Everything is a pure function of g, so any worker on any rank builds the same
    sample for the same position.
    """

    def __init__(
        self,
        dataset: PairedDataset,
        split: str,
        fine_length: int,
        coarse_length: int | None,
        masking: MaskingConfig,
        seed: int,
        shuffle: bool = True,
    ):
        self.split_name = split
        self.split = dataset.split(split)
        self.fine_length = fine_length
        self.index = build_sample_index(self.split, fine_length - 2, coarse_length - 2 if coarse_length else None)
        if len(self.index) == 0:
            raise ValueError(
                f"split {split!r} of {dataset.directory} yields no samples (no documents); "
                f"rebuild the dataset with a non-empty {split} split"
            )
        self.max_coarse_tokens = int((self.index[:, COARSE_END] - self.index[:, COARSE_BEGIN]).max())
        self.coarse_length = coarse_length if coarse_length else self.max_coarse_tokens + 2
        self.masking = masking
        self.seed = seed
        self.shuffle = shuffle
        self.fine_vocab_size = len(dataset.fine_vocab)
        self.coarse_vocab_size = len(dataset.coarse_vocab)
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.index)

    def sample_of_position(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(int(position), len(self.index))
        if not self.shuffle:
            return epoch, offset
        perm = self._permutations.get(epoch)
        if perm is None:
            perm = np.random.Generator(np.random.PCG64([self.seed, epoch, 7])).permutation(len(self.index))
            self._permutations = {epoch: perm}  # one epoch at a time is all a sequential reader needs
        return epoch, int(perm[offset])

    def _check(self, raw: RawSample, sample_index: int) -> None:
        """Ids inside the vocabularies and an alignment that covers the fine tokens (a few us per
        sample). Megatron's vocab-parallel embedding zeroes an out-of-range id at TP > 1, so damaged
        data would otherwise train silently."""
        problems = []
        if raw.fine.size and int(raw.fine.max()) >= self.fine_vocab_size:
            problems.append(f"fine token id {int(raw.fine.max())} >= the {self.fine_vocab_size} entries of fine_vocab.txt")
        if raw.coarse.size and int(raw.coarse.max()) >= self.coarse_vocab_size:
            problems.append(f"coarse token id {int(raw.coarse.max())} >= the {self.coarse_vocab_size} entries of coarse_vocab.txt")
        if int(raw.align.sum()) != raw.fine.size or (raw.align.size and int(raw.align.min()) < 1):
            problems.append("its alignment does not cover its fine tokens")
        if problems:
            first, end = (int(x) for x in self.index[sample_index][:2])
            raise FormatError(
                f"{self.split.directory} {self.split.split} split, sentences {first}..{end - 1} (sample {sample_index}): "
                f"{'; '.join(problems)}. The dataset is damaged or its vocabulary files were replaced: "
                f"check it with `python data_prep/build.py --verify DIR` and rebuild it")

    def __getitem__(self, position: int) -> MaskedSample:
        epoch, sample_index = self.sample_of_position(position)
        raw = read_sample(self.split, self.index[sample_index])
        self._check(raw, sample_index)
        rng = mask_rng(self.seed, epoch, sample_index)
        return mask_sample(raw, rng, self.masking, self.fine_vocab_size, self.coarse_vocab_size)


class BlendedSamples(torch.utils.data.Dataset):
    """Several datasets' samples in proportion to weights (``data.blend``), as Megatron's
    ``BlendedDataset`` but with O(1) random access and no index file.

    Global positions come in blocks of ``BLOCK``; each block gives dataset i exactly ``counts[i]``
    positions (the weights' largest-remainder rounding, so every dataset's realised share is within
    1 / BLOCK of its weight at every block boundary), spread evenly through the block. Position g is
    dataset ``pattern[g % BLOCK]``'s position ``(g // BLOCK) * counts[i] + within[g % BLOCK]``; each
    dataset maps its own positions to its samples as ``PretrainingSamples`` does (its own shuffled
    epochs: a small dataset with a large weight is repeated, a large one with a small weight is not
    seen whole). Like them, a pure function of g: resuming, layouts and workers see the same samples.
    """

    BLOCK = 10_000

    def __init__(self, parts: Sequence[PretrainingSamples], weights: Sequence[float]):
        shares = np.asarray(weights, dtype=np.float64)
        if len(parts) != len(shares) or len(parts) < 1 or not np.all(np.isfinite(shares)) or not np.all(shares > 0):
            raise ValueError(f"one positive weight per dataset expected, got {list(weights)} for {len(parts)} datasets")
        shares = shares / shares.sum()
        ideal = shares * self.BLOCK
        counts = np.floor(ideal).astype(np.int64)
        order = np.argsort(-(ideal - counts), kind="stable")  # largest remainders first, then the lower index
        counts[order[: self.BLOCK - int(counts.sum())]] += 1
        if np.any(counts == 0):
            raise ValueError(f"a weight below 1/{self.BLOCK} of the total would never be sampled: {list(weights)}")
        # Dataset i's j-th position of the block sits at (j + 0.5) / counts[i] of the block.
        owner = np.repeat(np.arange(len(parts)), counts)
        within = np.concatenate([np.arange(c) for c in counts])
        at = (within + 0.5) / counts[owner]
        order = np.lexsort((owner, at))
        self.pattern, self.within = owner[order], within[order]
        self.counts = counts
        self.parts = list(parts)
        self.shares = shares
        self.seed = parts[0].seed  # the loader's generator, as for the first dataset alone

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def max_coarse_tokens(self) -> int:
        return max(p.max_coarse_tokens for p in self.parts)

    @property
    def coarse_length(self) -> int:
        return self.parts[0].coarse_length

    @coarse_length.setter
    def coarse_length(self, value: int) -> None:
        for part in self.parts:
            part.coarse_length = value

    def part_of_position(self, position: int) -> tuple[int, int]:
        """(dataset index, that dataset's own position) of a global position."""
        block, offset = divmod(int(position), self.BLOCK)
        part = int(self.pattern[offset])
        return part, block * int(self.counts[part]) + int(self.within[offset])

    def __getitem__(self, position: int) -> MaskedSample:
        part, own = self.part_of_position(position)
        return self.parts[part][own]


# ---------------------------------------------------------------------------------------------
# 3. Sampler driven by consumed samples
# ---------------------------------------------------------------------------------------------
class ConsumedSamplesSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this data-parallel rank's micro-batches of global positions, from ``consumed_samples`` on.

    One step consumes ``micro_batch_size * accumulation_steps * dp_size`` positions; micro-step m of
    a step goes to DP rank r as block ``m * dp_size + r`` of ``micro_batch_size`` positions.
    Infinite (epochs roll over); the training loop decides when to stop.
    """

    def __init__(self, consumed_samples: int, micro_batch_size: int, accumulation_steps: int, dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.accumulation_steps = accumulation_steps
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation_steps * self.dp_size

    def __iter__(self) -> Iterator[list[int]]:
        step_start = self.consumed_samples
        while True:
            for micro in range(self.accumulation_steps):
                block = step_start + (micro * self.dp_size + self.dp_rank) * self.micro_batch_size
                yield list(range(block, block + self.micro_batch_size))
            step_start += self.global_batch_size


# ---------------------------------------------------------------------------------------------
# 4. Collation
# ---------------------------------------------------------------------------------------------
def collate(samples: Sequence[MaskedSample], fine_length: int, coarse_length: int) -> dict[str, torch.Tensor]:
    """[CLS] text [SEP] [PAD]... on both sides, fixed lengths, as the batch dict of pipeline/batch.py."""
    batch_size = len(samples)
    out = {
        "fine_ids": np.full((batch_size, fine_length), PAD_ID, dtype=np.int64),
        "fine_labels": np.full((batch_size, fine_length), IGNORE_INDEX, dtype=np.int64),
        "fine_attention_mask": np.zeros((batch_size, fine_length), dtype=np.int64),
        "fine_token_types": np.zeros((batch_size, fine_length), dtype=np.int64),
        "coarse_ids": np.full((batch_size, coarse_length), PAD_ID, dtype=np.int64),
        "coarse_labels": np.full((batch_size, coarse_length), IGNORE_INDEX, dtype=np.int64),
        "coarse_attention_mask": np.zeros((batch_size, coarse_length), dtype=np.int64),
        "coarse_token_types": np.zeros((batch_size, coarse_length), dtype=np.int64),
        "fine_to_coarse": np.full((batch_size, fine_length), -1, dtype=np.int64),
    }
    for b, s in enumerate(samples):
        nf, nc = len(s.fine_ids), len(s.coarse_ids)
        if nf + 2 > fine_length or nc + 2 > coarse_length:
            raise ValueError(f"sample of {nf} fine / {nc} coarse tokens does not fit {fine_length} / {coarse_length}")
        for side, ids, labels, n in (("fine", s.fine_ids, s.fine_labels, nf), ("coarse", s.coarse_ids, s.coarse_labels, nc)):
            out[f"{side}_ids"][b, 0] = CLS_ID
            out[f"{side}_ids"][b, 1 : n + 1] = ids
            out[f"{side}_ids"][b, n + 1] = SEP_ID
            out[f"{side}_labels"][b, 1 : n + 1] = labels
            out[f"{side}_attention_mask"][b, : n + 2] = 1
        out["fine_to_coarse"][b, 0] = 0
        out["fine_to_coarse"][b, 1 : nf + 1] = s.fine_to_coarse + 1
        out["fine_to_coarse"][b, nf + 1] = nc + 1
    return {k: torch.from_numpy(v) for k, v in out.items()}


def _leave_preemption_signals_to_the_rank(_worker_id: int) -> None:
    """Loader workers ignore SIGTERM / SIGUSR1 / SIGINT. Schedulers signal every process of a job (SLURM's
    --signal, a killed process group, DeepSpeed's launcher terminating the process tree), and Ctrl-C
    reaches every process in the terminal's process group: a worker killed by it would make its rank
    fail ("DataLoader worker is killed by signal") instead of saving the preemption checkpoint. The rank
    stops its workers itself when it exits."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


class _Collate:
    """Picklable collate_fn (DataLoader workers are separate processes)."""

    def __init__(self, fine_length: int, coarse_length: int):
        self.fine_length, self.coarse_length = fine_length, coarse_length

    def __call__(self, samples):
        return collate(samples, self.fine_length, self.coarse_length)


def round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


@dataclass
class PretrainingData:
    """The train and valid sample sets of one run, with the sequence lengths they agree on."""

    dataset: PairedDataset
    train: PretrainingSamples | BlendedSamples
    valid: PretrainingSamples | None
    fine_length: int
    coarse_length: int

    @classmethod
    def open(
        cls,
        path: str,
        fine_length: int,
        masking: MaskingConfig,
        seed: int,
        coarse_length: int = 0,
        with_valid: bool = True,
        blend: Sequence[tuple[str, float]] = (),
        weight: float = 1.0,
    ) -> PretrainingData:
        """``blend``: more (path, weight) datasets whose train splits are mixed with ``path``'s (weight
        ``weight``) by ``BlendedSamples``; the valid split is ``path``'s."""
        dataset = PairedDataset(path)
        # A fixed coarse_length is a packing budget (the text of a sample always fits both sides).
        fixed = coarse_length or None
        train = PretrainingSamples(dataset, "train", fine_length, fixed, masking, seed, shuffle=True)
        if blend:
            # Each dataset its own data order and masks: seeds far from seed + 1 (the valid split's).
            parts = [train] + [PretrainingSamples(PairedDataset(p), "train", fine_length, fixed, masking,
                                                  seed + BLEND_SEED_STRIDE * (i + 1), shuffle=True)
                               for i, (p, _) in enumerate(blend)]
            train = BlendedSamples(parts, [weight] + [w for _, w in blend])
        valid = None
        if with_valid and len(dataset.split("valid")) > 0:
            valid = PretrainingSamples(dataset, "valid", fine_length, fixed, masking, seed + 1, shuffle=False)
        if not coarse_length:
            # The longest coarse side of the packing (train and valid), padded to a multiple of 8
            # (never beyond the fine length: a coarse token covers at least one fine token).
            longest = max(train.max_coarse_tokens, valid.max_coarse_tokens if valid else 0) + 2
            coarse_length = min(round_up(longest, 8), fine_length)
        for samples in (train, valid):
            if samples is not None:
                samples.coarse_length = coarse_length
        return cls(dataset, train, valid, fine_length, coarse_length)

    def loader(
        self,
        split: str,
        consumed_samples: int,
        micro_batch_size: int,
        accumulation_steps: int,
        dp_rank: int,
        dp_size: int,
        num_workers: int = 0,
    ) -> torch.utils.data.DataLoader:
        samples = self.train if split == "train" else self.valid
        if samples is None:
            raise ValueError(f"no {split} split in {self.dataset.directory}")
        sampler = ConsumedSamplesSampler(consumed_samples, micro_batch_size, accumulation_steps, dp_rank, dp_size)
        return torch.utils.data.DataLoader(
            samples,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=_Collate(self.fine_length, self.coarse_length),
            persistent_workers=False,
            # page-locked batches on GPU: their copy to the device (non_blocking) overlaps the step
            pin_memory=torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu",
            prefetch_factor=4 if num_workers > 0 else None,
            worker_init_fn=_leave_preemption_signals_to_the_rank,
            # Its own generator: creating an iterator must not draw from the global torch RNG,
            # or a resumed run (which creates one at a different point) would see other dropout.
            generator=torch.Generator().manual_seed(self.train.seed),
        )
