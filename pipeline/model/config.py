"""The model schema: one typed dataclass, validated before anything is built, plus named recipes.

Every option here maps to a row of the BERT / ModernBERT / EuroBERT feature table:

=====================  =================  =====================  ===========================
option                 BERT               ModernBERT             EuroBERT
=====================  =================  =====================  ===========================
pre_norm               False (post-LN)    True                   True
norm                   layernorm          layernorm (no bias)    rmsnorm
activation             gelu               geglu                  (swiglu; geglu here)
position               learned            rope                   rope
bias                   True               False                  False
num_query_groups       = heads            = heads                < heads (GQA)
local_window           0                  128, global_every=3    0
=====================  =================  =====================  ===========================
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from data_prep.format import NUM_SPECIAL

VARIANTS = ("ambert", "ambert-combo", "ambert-hybrid", "bert-fine", "bert-coarse")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "geglu")
POSITIONS = ("learned", "rope")


@dataclass
class ModelConfig:
    """Architecture of an AMBERT-family model. ``validate()`` names the offending field."""

    variant: str = "ambert"
    """ambert (one shared encoder) | ambert-combo (one encoder per granularity) | ambert-hybrid (one
    encoder over [fine ; coarse], attention crosses) | bert-fine | bert-coarse (single-granularity)."""
    fine_vocab_size: int = 21_128
    """Fine vocabulary entries (paper zh: 21,128 characters; en: 30,522 WordPieces)."""
    coarse_vocab_size: int = 93_763
    """Coarse vocabulary entries. The paper's coarse vocabulary includes the fine units as fallback:
    zh 21,128 + 72,635 words = 93,763; en 30,522 words + 77,645 phrases = 108,167 (this reading
    reproduces the paper's 176M / 194M parameters)."""
    vocab_multiple: int = 128
    """Pad each embedding table up to a multiple of this (fast GEMM shapes, divisible by the TP size);
    padded ids never win a softmax (their logits are -inf). 1 = no padding."""
    hidden_size: int = 768
    """Width of the residual stream."""
    num_layers: int = 12
    """Transformer layers per encoder."""
    num_attention_heads: int = 12
    """Query heads."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; None = one per query head (multi-head)."""
    ffn_hidden_size: int | None = None
    """Inner width of the MLP (per branch for GeGLU); None = 4 * hidden_size."""
    max_position_embeddings: int = 512
    """Longest sequence (per granularity) the model accepts; size of the learned position table."""
    type_vocab_size: int = 2
    """Segment (token-type) ids; 0 disables segment embeddings."""
    norm: str = "layernorm"
    """layernorm | rmsnorm."""
    pre_norm: bool = False
    """True: pre-LN (norm before each sub-layer, final norm); False: post-LN as in BERT."""
    activation: str = "gelu"
    """gelu (exact erf GELU, as BERT) | geglu (gated: gelu(x W_g) * (x W_u))."""
    position: str = "learned"
    """learned absolute position embeddings | rope (rotary, applied to queries and keys)."""
    rope_theta: float = 10_000.0
    """RoPE base period."""
    bias: bool = True
    """Biases in linear layers and norms (the MLM output bias is always kept)."""
    local_window: int = 0
    """Sliding-window width (tokens, centred: each token sees +-window/2) of local layers; 0 = all global."""
    global_every: int = 1
    """Layer i uses global attention iff i % global_every == 0 (ModernBERT: 3); others are local."""
    hidden_dropout: float = 0.1
    """Dropout on embeddings and on each sub-layer output."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every weight matrix and embedding."""
    layer_norm_eps: float = 1e-12
    """Epsilon of every norm."""
    sentence_order_head: bool = False
    """Add a pooler + 2-way NSP / sentence-order classifier (needs batch['sentence_order_labels'])."""
    unpad: bool = True
    """Run the linear layers on real tokens only (padding dropped, re-inserted around attention)."""
    activation_checkpointing: bool = False
    """Recompute each transformer layer in backward (memory for compute; large models on GPU)."""

    # ------------------------------------------------------------------------------------------
    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def uses_fine(self) -> bool:
        return self.variant != "bert-coarse"

    @property
    def uses_coarse(self) -> bool:
        return self.variant != "bert-fine"

    @property
    def granularities(self) -> tuple[str, ...]:
        return tuple(g for g, used in (("fine", self.uses_fine), ("coarse", self.uses_coarse)) if used)

    def padded_vocab_size(self, granularity: str) -> int:
        size = self.fine_vocab_size if granularity == "fine" else self.coarse_vocab_size
        return int(math.ceil(size / self.vocab_multiple) * self.vocab_multiple)

    def is_global_layer(self, layer: int) -> bool:
        return self.local_window == 0 or layer % self.global_every == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    # ------------------------------------------------------------------------------------------
    def validate(self, tensor_parallel_size: int = 1) -> None:
        """Raise ValueError naming the first bad field and how to fix it. Cheap: call before building."""
        tp = tensor_parallel_size

        def fail(name: str, problem: str, fix: str) -> None:
            raise ValueError(f"ModelConfig.{name}: {problem}; {fix}")

        if self.variant not in VARIANTS:
            fail("variant", f"unknown variant {self.variant!r}", f"use one of {VARIANTS}")
        for name, value, choices in (
            ("norm", self.norm, NORMS),
            ("activation", self.activation, ACTIVATIONS),
            ("position", self.position, POSITIONS),
        ):
            if value not in choices:
                fail(name, f"unknown value {value!r}", f"use one of {choices}")
        if tp < 1:
            fail("tensor_parallel_size", f"must be >= 1, got {tp}", "pass a positive TP size")
        for name in ("hidden_size", "num_layers", "num_attention_heads", "max_position_embeddings",
                     "vocab_multiple", "global_every"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}", "set a positive value")
        for name in ("fine_vocab_size", "coarse_vocab_size"):
            if getattr(self, name) <= NUM_SPECIAL:
                fail(name, f"{getattr(self, name)} entries leave no room beyond the {NUM_SPECIAL} special "
                     "tokens", "set it to the dataset's vocabulary size (meta / *_vocab.txt)")
        if self.hidden_size % self.num_attention_heads:
            fail("hidden_size", f"{self.hidden_size} is not divisible by num_attention_heads="
                 f"{self.num_attention_heads}", "choose hidden_size = heads * head_dim")
        if self.num_attention_heads % tp:
            fail("num_attention_heads", f"{self.num_attention_heads} is not divisible by the tensor-parallel "
                 f"size {tp}", "use a TP size that divides the head count")
        groups = self.query_groups
        if groups < 1 or self.num_attention_heads % groups:
            fail("num_query_groups", f"{groups} does not divide num_attention_heads={self.num_attention_heads}",
                 "use a divisor of the head count (or None for multi-head attention)")
        if groups % tp:
            fail("num_query_groups", f"{groups} key/value groups cannot be split over tensor-parallel size "
                 f"{tp}", "use a group count divisible by the TP size")
        if self.ffn_hidden_size is not None and self.ffn_hidden_size < 1:
            fail("ffn_hidden_size", f"must be >= 1, got {self.ffn_hidden_size}", "set a positive value (or null: 4 x hidden_size)")
        if self.ffn_size % tp:
            fail("ffn_hidden_size", f"{self.ffn_size} is not divisible by the tensor-parallel size {tp}",
                 "choose a multiple of the TP size")
        if self.vocab_multiple % tp:
            fail("vocab_multiple", f"{self.vocab_multiple} is not divisible by the tensor-parallel size {tp}",
                 "use a multiple of the TP size (e.g. 128)")
        if self.position == "rope" and self.head_dim % 2:
            fail("position", f"rope needs an even head dimension, got {self.head_dim}",
                 "change hidden_size / num_attention_heads")
        if self.type_vocab_size < 0:
            fail("type_vocab_size", "must be >= 0", "use 2 (two segments) or 0 (none)")
        if self.local_window < 0:
            fail("local_window", "must be >= 0", "use 0 for all-global attention")
        if self.local_window > self.max_position_embeddings:
            fail("local_window", f"window {self.local_window} is larger than the sequence length "
                 f"max_position_embeddings={self.max_position_embeddings}",
                 "use a smaller window, or 0 for all-global attention")
        if self.variant == "ambert-hybrid" and self.local_window:  # even with global_every=1 (a window unused
            # today would become a wrong one with the next global_every override)
            # [fine ; coarse] with positions restarting at 0 for the coarse part: a window over those
            # positions joins coarse token k with fine token ~k, which covers other text (the coarse
            # side is ~0.6-0.85x as long), so local layers would attend to the wrong neighbours.
            fail("local_window", f"ambert-hybrid cannot use sliding-window layers (local_window={self.local_window}): "
                 "its coarse positions restart at 0, so a window would join unrelated fine and coarse text",
                 "set local_window=0 (all-global attention) for ambert-hybrid")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, f"must be in [0, 1), got {getattr(self, name)}", "use e.g. 0.1 or 0.0")
        if self.init_std <= 0:
            fail("init_std", "must be > 0", "use e.g. 0.02")
        # Both made every loss NaN from the first step, with no error.
        if not self.layer_norm_eps >= 0:
            fail("layer_norm_eps", f"must be >= 0, got {self.layer_norm_eps}", "use e.g. 1e-12 (BERT) or 1e-5")
        if self.position == "rope" and not self.rope_theta > 0:
            fail("rope_theta", f"must be > 0, got {self.rope_theta}", "use e.g. 10000 (RoPE) or 160000 (ModernBERT)")


# ----------------------------------------------------------------------------------------------
# Recipes. Vocabulary sizes are placeholders: the trainer overrides them from the dataset meta.
# ----------------------------------------------------------------------------------------------
_BERT_STYLE = dict(norm="layernorm", pre_norm=False, activation="gelu", position="learned", bias=True,
                   local_window=0, global_every=1, layer_norm_eps=1e-12)
_MODERN_STYLE = dict(norm="layernorm", pre_norm=True, activation="geglu", position="rope", bias=False,
                     layer_norm_eps=1e-5, hidden_dropout=0.0, attention_dropout=0.0)

RECIPES: dict[str, dict] = {
    # The paper's configuration (BERT-base encoder, Chinese vocabularies).
    "bert-base": dict(_BERT_STYLE, hidden_size=768, num_layers=12, num_attention_heads=12,
                      ffn_hidden_size=3072, max_position_embeddings=512),
    "bert-large": dict(_BERT_STYLE, hidden_size=1024, num_layers=24, num_attention_heads=16,
                       ffn_hidden_size=4096, max_position_embeddings=512),
    # ModernBERT-base shape: 22 layers, GeGLU 1152, RoPE, alternating 128-token local / global.
    "modern-base": dict(_MODERN_STYLE, hidden_size=768, num_layers=22, num_attention_heads=12,
                        ffn_hidden_size=1152, max_position_embeddings=8192, rope_theta=160_000.0,
                        local_window=128, global_every=3),
    # Tests: small enough for 2 CPU cores; "tiny-modern" turns every modern option on at once
    # (pre-LN, RMSNorm, GeGLU, RoPE, no biases, GQA, alternating local/global attention).
    "tiny": dict(_BERT_STYLE, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128,
                 max_position_embeddings=64, fine_vocab_size=300, coarse_vocab_size=500),
    "tiny-modern": dict(_MODERN_STYLE, norm="rmsnorm", hidden_size=64, num_layers=3, num_attention_heads=4,
                        num_query_groups=2, ffn_hidden_size=96, max_position_embeddings=64,
                        local_window=8, global_every=2, fine_vocab_size=300, coarse_vocab_size=500),
}


def model_recipe(name: str, **overrides) -> ModelConfig:
    """A named recipe with field overrides, e.g. ``model_recipe("tiny", variant="ambert-combo")``."""
    if name not in RECIPES:
        raise ValueError(f"unknown model recipe {name!r}; known recipes: {sorted(RECIPES)}")
    values = dict(RECIPES[name])
    values.update(overrides)
    return ModelConfig.from_dict(values)


__all__ = ["RECIPES", "VARIANTS", "ModelConfig", "model_recipe"]
