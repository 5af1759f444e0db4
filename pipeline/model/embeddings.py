"""Input embeddings: one vocab-parallel word table per granularity, shared position / segment
(/ granularity) embeddings, norm and dropout.

The word tables are megatron-core VocabParallelEmbedding (rows split over TP ranks, one all-reduce);
the MLM heads tie their output weights to them. Everything else is small and replicated, drawn in
this module's constructor (safe under deepspeed.zero.Init).
"""

from __future__ import annotations

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import VocabParallelEmbedding
from torch import nn

from pipeline.model.config import ModelConfig
from pipeline.model.layers import make_norm, normal_init


def word_embedding(config: ModelConfig, granularity: str, mp_config: ModelParallelConfig) -> VocabParallelEmbedding:
    return VocabParallelEmbedding(
        config.padded_vocab_size(granularity), config.hidden_size,
        init_method=normal_init(config.init_std), config=mp_config,
    )


class EmbeddingExtras(nn.Module):
    """Adds position (learned), segment and granularity embeddings to word vectors, then norm + dropout.

    One instance serves every sequence that goes through one encoder: for ``ambert`` the fine and
    coarse batches are stacked first, so this module (like the encoder) runs once per step."""

    def __init__(self, config: ModelConfig, granularity_embedding: bool = False):
        super().__init__()
        self.config = config
        std = config.init_std
        self.positions = None
        if config.position == "learned":
            self.positions = nn.Parameter(torch.empty(config.max_position_embeddings, config.hidden_size))
            nn.init.normal_(self.positions, std=std)
        self.token_types = None
        if config.type_vocab_size > 0:
            self.token_types = nn.Parameter(torch.empty(config.type_vocab_size, config.hidden_size))
            nn.init.normal_(self.token_types, std=std)
        self.granularities = None
        if granularity_embedding:
            self.granularities = nn.Parameter(torch.empty(2, config.hidden_size))
            nn.init.normal_(self.granularities, std=std)
        self.norm = make_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        words: torch.Tensor,
        position_ids: torch.Tensor,
        token_types: torch.Tensor | None,
        granularity_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = words
        if self.positions is not None:
            x = x + self.positions[position_ids]
        if self.token_types is not None and token_types is not None:
            x = x + self.token_types[token_types]
        if self.granularities is not None and granularity_ids is not None:
            x = x + self.granularities[granularity_ids]
        return self.dropout(self.norm(x))
