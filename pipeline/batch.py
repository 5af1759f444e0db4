"""The batch contract between the data side (pipeline/data) and the model (pipeline/model).

A batch is a plain ``dict[str, torch.Tensor]`` (DeepSpeed's engine and ZeRO-3 hooks handle dicts
natively). Keys, shapes and meanings, B = micro-batch size, Lf / Lc = fine / coarse lengths:

=========================  ===========  =========================================================
key                        shape        meaning
=========================  ===========  =========================================================
fine_ids                   [B, Lf] i64  fine token ids ([CLS] ... [SEP] ... [SEP] [PAD]...),
                                        after masking
fine_labels                [B, Lf] i64  original id at positions to predict, IGNORE_INDEX elsewhere
fine_attention_mask        [B, Lf] i64  1 for real tokens, 0 for padding
fine_token_types           [B, Lf] i64  segment id (0 / 1)
coarse_ids ...             [B, Lc]      the same four for the coarse sequence (same text)
fine_to_coarse             [B, Lf] i64  index of the coarse token that covers each fine token,
                                        -1 at padding (optional: token-level fine-tuning)
sentence_order_labels      [B]     i64  optional NSP / sentence-order target
labels                     [B]     i64  optional sequence-classification target (fine-tuning)
=========================  ===========  =========================================================

Single-granularity baselines read only their side (``bert-fine``: fine_*; ``bert-coarse``:
coarse_*); the data side always produces both, so every variant trains on identical samples.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

FINE_KEYS = ("fine_ids", "fine_labels", "fine_attention_mask", "fine_token_types")
COARSE_KEYS = ("coarse_ids", "coarse_labels", "coarse_attention_mask", "coarse_token_types")
OPTIONAL_KEYS = ("fine_to_coarse", "sentence_order_labels", "labels")

Batch = dict[str, torch.Tensor]


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def check_batch(batch: Batch) -> None:
    """Raise ValueError naming the first key that breaks the contract above."""
    for keys in (FINE_KEYS, COARSE_KEYS):
        present = [k for k in keys if k in batch]
        if not present:
            continue
        if len(present) != len(keys):
            missing = sorted(set(keys) - set(present))
            raise ValueError(f"batch has {present} but lacks {missing}")
        shape = batch[keys[0]].shape
        for k in keys:
            if batch[k].shape != shape:
                raise ValueError(f"batch[{k!r}] has shape {tuple(batch[k].shape)}, expected {tuple(shape)}")
    if "fine_ids" not in batch and "coarse_ids" not in batch:
        raise ValueError("batch has neither fine_ids nor coarse_ids")
