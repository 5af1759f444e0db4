"""Output heads: the masked-only MLM head (tied to its vocab-parallel embedding table) and the
optional NSP / sentence-order head.

The MLM head gathers the masked positions FIRST and only then runs the transform and the output
projection: with a ~100k coarse vocabulary, dense logits at every position would cost about as much
as the whole encoder. Logits stay split over the vocabulary (each TP rank holds its rows of the
tied table); the loss is megatron-core's vocab_parallel_cross_entropy and the accuracy uses a
cross-rank argmax (max over ranks, then the smallest global index attaining it, exactly what
``argmax`` over the full TP=1 logits returns).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    VocabParallelEmbedding,
    copy_to_tensor_model_parallel_region,
    set_tensor_model_parallel_attributes,
    vocab_parallel_cross_entropy,
)
from torch import nn

from pipeline import parallel
from pipeline.batch import IGNORE_INDEX
from pipeline.model.config import ModelConfig
from pipeline.model.layers import ReplicatedLinear, gather_rows, make_norm


def vocab_parallel_argmax(logits: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """Global argmax of logits split over TP ranks along the last dim (ties: smallest index)."""
    local_max, local_index = logits.max(dim=-1)
    global_index = local_index + vocab_start
    if parallel.tensor_parallel_size() == 1:
        return global_index
    group = parallel.tensor_parallel_group()
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    candidate = torch.where(local_max == global_max, global_index, torch.full_like(global_index, 2**62))
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
    return candidate


class MaskedLMHead(nn.Module):
    """transform (dense + GELU + norm) -> logits with the tied embedding table + a vocab-parallel bias."""

    def __init__(self, config: ModelConfig, granularity: str, embedding: VocabParallelEmbedding):
        super().__init__()
        self.dense = ReplicatedLinear(config.hidden_size, config.hidden_size, config.init_std, bias=config.bias)
        self.norm = make_norm(config)
        # Tied: the same Parameter registered here too, so ZeRO-3 gathers it for this module's
        # forward as well (reading another module's partitioned weight would see an empty tensor).
        self.weight = embedding.weight
        self.vocab_start = embedding.vocab_start_index
        self.vocab_end = embedding.vocab_end_index
        self.real_vocab_size = config.fine_vocab_size if granularity == "fine" else config.coarse_vocab_size
        self.bias = nn.Parameter(torch.zeros(self.vocab_end - self.vocab_start))
        set_tensor_model_parallel_attributes(self.bias, is_parallel=True, dim=0, stride=1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] replicated -> [N, local vocab] (this rank's slice of the padded vocabulary)."""
        hidden = self.norm(F.gelu(self.dense(hidden)))
        logits = F.linear(copy_to_tensor_model_parallel_region(hidden), self.weight, self.bias)
        if self.vocab_end > self.real_vocab_size:
            # Padding rows of the table must never be predicted. In place: linear's backward does not
            # need its output, and a full copy of [masked, vocab] logits is not free.
            logits[:, max(self.real_vocab_size - self.vocab_start, 0):] = float("-inf")
        return logits

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, return_logits: bool = False) -> dict:
        """hidden [B, L, H], labels [B, L] (IGNORE_INDEX where nothing is predicted)."""
        flat_labels = labels.reshape(-1)
        positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
        targets = flat_labels.index_select(0, positions)
        selected = gather_rows(hidden.reshape(-1, hidden.shape[-1]), positions)
        logits = self.logits(selected).float()
        count = targets.numel()
        with torch.no_grad():
            correct = (vocab_parallel_argmax(logits, self.vocab_start) == targets).sum()
            accuracy = correct.float() / max(count, 1)
        out = {"logits": logits.detach().clone()} if return_logits else {}
        # vocab_parallel_cross_entropy subtracts the max from its input in place: it gets its own copy
        # only when the logits are also returned.
        losses = vocab_parallel_cross_entropy(logits, targets)
        out.update(loss=losses.sum() / max(count, 1), accuracy=accuracy,
                   count=torch.tensor(float(count), device=hidden.device))
        return out


class SentenceOrderHead(nn.Module):
    """BERT-style pooler (dense + tanh on each [CLS]) and a 2-way classifier on their concatenation."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.pooler = ReplicatedLinear(config.hidden_size, config.hidden_size, config.init_std, bias=config.bias)
        inputs = len(config.granularities) * config.hidden_size
        self.classifier = ReplicatedLinear(inputs, 2, config.init_std, bias=True)

    def forward(self, cls_vectors: list[torch.Tensor], labels: torch.Tensor | None) -> dict:
        # One pooler call over the stacked [CLS] vectors (a module called twice per step is a ZeRO-3
        # trouble spot), then [fine ; coarse] side by side.
        pooled = torch.tanh(self.pooler(torch.cat(cls_vectors, dim=0)))
        pooled = torch.cat(pooled.chunk(len(cls_vectors), dim=0), dim=-1)
        logits = self.classifier(pooled)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels)
            out["accuracy"] = (logits.argmax(-1) == labels).float().mean().detach()
        return out
