"""AmbertForPreTraining: every variant of the paper's comparison, one class.

=============  ======================  =====================================================
variant        encoders                how the two granularities go through them
=============  ======================  =====================================================
ambert         1 shared                fine and coarse STACKED along the batch (padded to a
                                       common length; with ``unpad`` the padding is dropped):
                                       one encoder call per step, no cross attention
ambert-combo   2 (fine, coarse)        each granularity through its own encoder (and its own
                                       position/segment embeddings): nothing shared
ambert-hybrid  1 shared                [fine ; coarse] CONCATENATED along the length, plus a
                                       granularity embedding: attention crosses granularities
bert-fine      1                       fine only
bert-coarse    1                       coarse only
=============  ======================  =====================================================

Every module runs exactly once per forward (calling a module twice per step is a ZeRO-3 trouble
spot, and one big call is faster than two small ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import parallel
from pipeline.batch import Batch
from pipeline.model.config import ModelConfig
from pipeline.model.embeddings import EmbeddingExtras, word_embedding
from pipeline.model.heads import MaskedLMHead, SentenceOrderHead
from pipeline.model.layers import Encoder, megatron_config


def _positions(length: int, rows: int, device: torch.device) -> torch.Tensor:
    return torch.arange(length, device=device).unsqueeze(0).expand(rows, length)


def _pad_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad dim 1 of [B, L, ...] with zeros up to ``length``."""
    missing = length - x.shape[1]
    if missing == 0:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, missing]
    return F.pad(x, pad)


class AmbertForPreTraining(nn.Module):
    """Multi-grained BERT for MLM pre-training on megatron-core tensor-parallel layers.

    ``forward(batch)`` returns ``loss`` (= fine_loss + coarse_loss [+ sentence_order_loss]),
    ``{g}_loss``, ``{g}_accuracy`` and ``{g}_masked`` (number of predicted tokens) for each
    granularity the variant uses; identical on all TP ranks."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate(parallel.tensor_parallel_size())
        self.config = config
        mp_config = megatron_config(config)
        self.word_embeddings = nn.ModuleDict(
            {g: word_embedding(config, g, mp_config) for g in config.granularities}
        )
        streams = config.granularities if config.variant == "ambert-combo" else ("shared",)
        hybrid = config.variant == "ambert-hybrid"
        self.embeddings = nn.ModuleDict({s: EmbeddingExtras(config, granularity_embedding=hybrid) for s in streams})
        self.encoders = nn.ModuleDict({s: Encoder(config, mp_config) for s in streams})
        self.heads = nn.ModuleDict(
            {g: MaskedLMHead(config, g, self.word_embeddings[g]) for g in config.granularities}
        )
        self.sentence_order = SentenceOrderHead(config) if config.sentence_order_head else None

    # ------------------------------------------------------------------------------------------
    def _check_lengths(self, batch: Batch) -> None:
        limit = self.config.max_position_embeddings
        for g in self.config.granularities:
            length = batch[f"{g}_ids"].shape[1]
            if length > limit:
                raise ValueError(
                    f"batch['{g}_ids'] has length {length} > ModelConfig.max_position_embeddings={limit}; "
                    "use shorter sequences or a model with more positions"
                )

    def _run(self, stream: str, words, mask, positions, types, granularity_ids=None) -> torch.Tensor:
        hidden = self.embeddings[stream](words, positions, types, granularity_ids)
        return self.encoders[stream](hidden, mask, positions)

    def encode(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Contextual vectors: ``{g}_hidden`` [B, L_g, H] for each granularity of the variant."""
        self._check_lengths(batch)
        variant = self.config.variant
        granularities = self.config.granularities
        words = {g: self.word_embeddings[g](batch[f"{g}_ids"]) for g in granularities}
        masks = {g: batch[f"{g}_attention_mask"] for g in granularities}
        types = {g: batch.get(f"{g}_token_types") for g in granularities}
        lengths = {g: batch[f"{g}_ids"].shape[1] for g in granularities}
        rows = batch[f"{granularities[0]}_ids"].shape[0]
        device = words[granularities[0]].device
        types = {g: (t if t is not None else torch.zeros_like(masks[g])) for g, t in types.items()}

        if len(granularities) == 1 or variant == "ambert-combo":
            out = {}
            for g in granularities:
                stream = g if variant == "ambert-combo" else "shared"
                positions = _positions(lengths[g], rows, device)
                out[f"{g}_hidden"] = self._run(stream, words[g], masks[g], positions, types[g])
            return out

        if variant == "ambert":
            # Stack along the batch: one encoder call over 2B sequences of the common length.
            length = max(lengths.values())
            stacked_words = torch.cat([_pad_length(words[g], length) for g in granularities], dim=0)
            stacked_mask = torch.cat([_pad_length(masks[g], length) for g in granularities], dim=0)
            stacked_types = torch.cat([_pad_length(types[g], length) for g in granularities], dim=0)
            positions = _positions(length, 2 * rows, device)
            hidden = self._run("shared", stacked_words, stacked_mask, positions, stacked_types)
            fine, coarse = hidden.split(rows, dim=0)
            return {"fine_hidden": fine[:, : lengths["fine"]], "coarse_hidden": coarse[:, : lengths["coarse"]]}

        # ambert-hybrid: one sequence [fine ; coarse]; positions restart at 0 for the coarse part and
        # a granularity embedding tells the two apart.
        cat_words = torch.cat([words["fine"], words["coarse"]], dim=1)
        cat_mask = torch.cat([masks["fine"], masks["coarse"]], dim=1)
        cat_types = torch.cat([types["fine"], types["coarse"]], dim=1)
        positions = torch.cat(
            [_positions(lengths["fine"], rows, device), _positions(lengths["coarse"], rows, device)], dim=1
        )
        granularity_ids = torch.cat(
            [torch.zeros_like(masks["fine"]), torch.ones_like(masks["coarse"])], dim=1
        ).long()
        hidden = self._run("shared", cat_words, cat_mask, positions, cat_types, granularity_ids)
        fine, coarse = hidden.split([lengths["fine"], lengths["coarse"]], dim=1)
        return {"fine_hidden": fine, "coarse_hidden": coarse}

    def forward(self, batch: Batch, return_logits: bool = False) -> dict[str, torch.Tensor]:
        hidden = self.encode(batch)
        out: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for g in self.config.granularities:
            head = self.heads[g](hidden[f"{g}_hidden"], batch[f"{g}_labels"], return_logits=return_logits)
            out[f"{g}_loss"] = head["loss"]
            out[f"{g}_accuracy"] = head["accuracy"]
            out[f"{g}_masked"] = head["count"]
            if return_logits:
                out[f"{g}_logits"] = head["logits"]  # this TP rank's vocabulary slice
            total = head["loss"] if total is None else total + head["loss"]
        if self.sentence_order is not None:
            cls_vectors = [hidden[f"{g}_hidden"][:, 0] for g in self.config.granularities]
            sop = self.sentence_order(cls_vectors, batch.get("sentence_order_labels"))
            if "loss" in sop:
                out["sentence_order_loss"] = sop["loss"]
                out["sentence_order_accuracy"] = sop["accuracy"]
                total = total + sop["loss"]
        out["loss"] = total
        return out


def build_model(config: ModelConfig, device: torch.device | str | None = None) -> AmbertForPreTraining:
    """Build the model on this rank's TP slice (call pipeline.parallel.initialize_parallel first).

    Weights are created on the CPU from the default generator (identical for any TP size given the
    same seed) and moved to ``device`` if given; DeepSpeed moves them itself otherwise."""
    model = AmbertForPreTraining(config)
    if device is not None:
        model = model.to(device)
    return model
