"""Synthetic batches in the pipeline/batch.py contract, for tests and benchmarks (no dataset needed).

Random ids with ragged lengths ([CLS] ... [SEP] then padding), two segments, and ~``mask_rate`` of
the real tokens selected for prediction (80% replaced by [MASK]). Deterministic in ``seed``."""

from __future__ import annotations

import torch

from data_prep.format import CLS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID
from pipeline.batch import IGNORE_INDEX, Batch


def _side(rows: int, length: int, vocab: int, mask_rate: float, ragged: bool, generator: torch.Generator) -> dict:
    ids = torch.randint(NUM_SPECIAL, vocab, (rows, length), generator=generator)
    lengths = torch.full((rows,), length)
    if ragged and rows > 1:
        lengths = torch.randint(max(3, int(0.6 * length)), length + 1, (rows,), generator=generator)
        lengths[0] = length  # the longest row sets the padded length
    positions = torch.arange(length)[None, :]
    real = positions < lengths[:, None]
    ids[:, 0] = CLS_ID
    ids[torch.arange(rows), lengths - 1] = SEP_ID
    ids[~real] = PAD_ID
    token_types = ((positions >= (lengths[:, None] // 2)) & real).long()
    candidates = real & (ids >= NUM_SPECIAL)
    chosen = candidates & (torch.rand(rows, length, generator=generator) < mask_rate)
    first = candidates.float().argmax(dim=1)
    chosen[torch.arange(rows), first] = True  # at least one prediction per row
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[chosen] = ids[chosen]
    replace = chosen & (torch.rand(rows, length, generator=generator) < 0.8)
    ids = ids.masked_fill(replace, MASK_ID)
    return {"ids": ids, "labels": labels, "attention_mask": real.long(), "token_types": token_types}


def synthetic_batch(
    fine_vocab_size: int,
    coarse_vocab_size: int,
    batch_size: int = 4,
    fine_len: int = 32,
    coarse_len: int = 24,
    mask_rate: float = 0.15,
    ragged: bool = True,
    seed: int = 0,
    sentence_order: bool = False,
) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    batch: Batch = {}
    for granularity, length, vocab in (("fine", fine_len, fine_vocab_size), ("coarse", coarse_len, coarse_vocab_size)):
        for key, value in _side(batch_size, length, vocab, mask_rate, ragged, generator).items():
            batch[f"{granularity}_{key}"] = value
    if sentence_order:
        batch["sentence_order_labels"] = torch.randint(0, 2, (batch_size,), generator=generator)
    return batch
