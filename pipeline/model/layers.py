"""The encoder: our own transformer layers on megatron-core ColumnParallelLinear / RowParallelLinear.

Why not megatron-core's TransformerBlock: its local attention (DotProductAttention) needs the CUDA
global memory buffer and its own mask conventions, and the option set we need (post-LN *and*
pre-LN, RMSNorm, GeGLU, RoPE, GQA, alternating sliding-window attention, unpadded tokens) would mean
a custom spec for almost every submodule anyway. Own layers keep megatron's tensor-parallel linear
algebra (the part that matters for scaling) and route attention through
``torch.nn.functional.scaled_dot_product_attention``, which picks flash / memory-efficient kernels
on GPU and a fused kernel on CPU.

Tensor parallelism (Megatron style): QKV and the MLP's first projection are column-parallel (each
TP rank owns whole heads / a slice of the inner width), the output projections are row-parallel
(one all-reduce per sub-layer in forward, one in backward). Everything else is replicated.

Initialisation happens inside each module's constructor (safe under ``deepspeed.zero.Init``, which
partitions parameters when a constructor returns). Weight matrices are drawn as the FULL TP=1 tensor
from the default generator and sliced (megatron's ``use_cpu_initialization``), so TP=1 and TP=2
runs from the same seed start from identical weights.

Layers work on a flat ``[tokens, hidden]`` tensor: with ``unpad`` the tokens are only the real
(non-padding) ones of all sequences, so no FLOP is spent on padding outside attention; attention
scatters them back to ``[sequences, length]`` for the SDPA call.

Known limit: sliding-window layers pass SDPA a dense boolean ``[N, 1, L, L]`` mask (built once per
forward). Fine up to a few thousand tokens; for 8k-token ModernBERT-style runs a windowed flash
kernel (flash-attn's ``window_size``) would be the next step on GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from pipeline import parallel
from pipeline.model.config import ModelConfig

# scaled_dot_product_attention(enable_gqa=...) exists from torch 2.5.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def normal_init(std: float):
    def init(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=std)

    return init


def megatron_config(config: ModelConfig) -> ModelParallelConfig:
    """The megatron-core parallel-layer config: CPU initialisation (full weight, then slice) so the
    weights do not depend on the TP size; no sequence parallelism (no CPU path)."""
    return ModelParallelConfig(
        tensor_model_parallel_size=parallel.tensor_parallel_size(),
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=torch.float32,
        sequence_parallel=False,
        gradient_accumulation_fusion=False,
    )


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)


class ReplicatedLinear(nn.Module):
    """A plain linear layer, identical on every TP rank, initialised normal(0, std) in its own
    constructor (nn.Linear + a later nn.init would be lost under deepspeed.zero.Init)."""

    def __init__(self, in_features: int, out_features: int, std: float, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(self.weight, mean=0.0, std=std)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


# ----------------------------------------------------------------------------------------------
# Token layout: padded [N, L] <-> flat real tokens
# ----------------------------------------------------------------------------------------------
@dataclass
class TokenLayout:
    """How the flat token tensor maps onto ``[num_sequences, length]`` and what each token may see.

    Built once per forward; shared by all layers (masks and rotary tables are computed once)."""

    num_sequences: int
    length: int
    token_index: torch.Tensor | None  # flat indices of kept tokens in N*L; None = all kept
    global_mask: torch.Tensor | None  # SDPA boolean mask for global layers (True = attend) or None
    local_mask: torch.Tensor | None  # the same for sliding-window layers
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos, sin: [N, 1, L, head_dim]

    @classmethod
    def build(cls, config: ModelConfig, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> TokenLayout:
        n, length = attention_mask.shape
        valid = attention_mask.bool()
        all_valid = bool(valid.all())
        token_index = None
        if config.unpad and not all_valid:
            token_index = valid.reshape(-1).nonzero().squeeze(1)
        # A sequence with no real token would give a fully masked softmax row (NaN): let its rows see
        # every key instead; its outputs are never used.
        keys = valid | ~valid.any(dim=1, keepdim=True)
        global_mask = None if all_valid else keys[:, None, None, :]
        local_mask = None
        if config.local_window and any(not config.is_global_layer(i) for i in range(config.num_layers)):
            distance = (position_ids[:, :, None] - position_ids[:, None, :]).abs()
            near = distance <= config.local_window // 2
            eye = torch.eye(length, dtype=torch.bool, device=near.device)
            # The diagonal keeps every row non-empty (padded queries included).
            local_mask = ((near & keys[:, None, :]) | eye)[:, None, :, :]
        rope = None
        if config.position == "rope":
            half = config.head_dim // 2
            inv_freq = 1.0 / (
                config.rope_theta ** (torch.arange(0, half, device=position_ids.device, dtype=torch.float32) / half)
            )
            angles = position_ids.float()[:, :, None] * inv_freq  # [N, L, half]
            angles = torch.cat([angles, angles], dim=-1)[:, None]  # [N, 1, L, head_dim]
            rope = (angles.cos(), angles.sin())
        return cls(n, length, token_index, global_mask, local_mask, rope)

    def flatten(self, padded: torch.Tensor) -> torch.Tensor:
        """[N, L, C] -> [tokens, C]."""
        flat = padded.reshape(self.num_sequences * self.length, padded.shape[-1])
        return flat if self.token_index is None else gather_rows(flat, self.token_index)

    def unflatten(self, tokens: torch.Tensor) -> torch.Tensor:
        """[tokens, C] -> [N, L, C] (zeros at padding)."""
        if self.token_index is not None:
            tokens = scatter_rows(tokens, self.token_index, self.num_sequences * self.length)
        return tokens.view(self.num_sequences, self.length, tokens.shape[-1])


class _GatherRows(torch.autograd.Function):
    """``x[index]`` for UNIQUE row indices. The backward is a plain row copy into zeros; autograd's
    generic index_select backward is an accumulating scatter (several times slower on CPU)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, grad.shape[-1]).index_copy_(0, index, grad), None


class _ScatterRows(torch.autograd.Function):
    """Rows of x placed at UNIQUE ``index`` in a zero tensor of ``rows`` rows (inverse of _GatherRows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(index)
        return x.new_zeros(rows, x.shape[-1]).index_copy_(0, index, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return _GatherRows.apply(x, index)


def scatter_rows(x: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    return _ScatterRows.apply(x, index, rows)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Tables are fp32; cast so bf16 queries/keys stay bf16 (SDPA needs q, k, v of one dtype).
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


# ----------------------------------------------------------------------------------------------
# Sub-layers
# ----------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Bidirectional (grouped-query) self-attention; QKV column-parallel, output row-parallel.

    The fused QKV weight is laid out group by group ([q_heads_of_group ; k ; v] per key/value
    group), so a contiguous TP slice holds whole groups and TP=1 / TP=2 read it the same way."""

    def __init__(self, config: ModelConfig, layer: int, mp_config: ModelParallelConfig):
        super().__init__()
        tp = parallel.tensor_parallel_size()
        self.config = config
        self.is_global = config.is_global_layer(layer)
        self.head_dim = config.head_dim
        self.heads_per_group = config.num_attention_heads // config.query_groups
        self.local_groups = config.query_groups // tp
        self.local_heads = config.num_attention_heads // tp
        qkv_size = (config.num_attention_heads + 2 * config.query_groups) * self.head_dim
        self.qkv = ColumnParallelLinear(
            config.hidden_size, qkv_size, config=mp_config, init_method=normal_init(config.init_std),
            bias=config.bias, gather_output=False,
        )
        self.output = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, config=mp_config,
            init_method=normal_init(config.init_std), bias=config.bias, input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        qkv, _ = self.qkv(tokens)
        n, length, d = layout.num_sequences, layout.length, self.head_dim
        qkv = layout.unflatten(qkv).view(n, length, self.local_groups, self.heads_per_group + 2, d)
        # One split (its backward is one concatenation) rather than three slices (each slice's
        # backward would allocate and add a full-size zero gradient).
        query, key, value = qkv.split([self.heads_per_group, 1, 1], dim=3)
        query = query.reshape(n, length, self.local_heads, d).transpose(1, 2)
        key = key.squeeze(3).transpose(1, 2)
        value = value.squeeze(3).transpose(1, 2)
        if layout.rope is not None:
            cos, sin = layout.rope
            query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        mask = layout.global_mask if self.is_global else layout.local_mask
        dropout = self.config.attention_dropout if self.training else 0.0
        # Attention probabilities live inside the TP region (each rank has its own heads): their
        # dropout must come from the per-TP-rank stream.
        gqa = {}
        if self.heads_per_group > 1:
            if _SDPA_HAS_GQA:
                gqa = {"enable_gqa": True}
            else:  # torch < 2.5: materialise the shared keys/values per query head
                key = key.repeat_interleave(self.heads_per_group, dim=1)
                value = value.repeat_interleave(self.heads_per_group, dim=1)
        with parallel.rng_tracker().fork():
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=dropout, **gqa
            )
        context = context.transpose(1, 2).reshape(n, length, self.local_heads * d)
        output, _ = self.output(layout.flatten(context))
        return output


class MLP(nn.Module):
    """GELU or GeGLU feed-forward; fc1 column-parallel, fc2 row-parallel.

    GeGLU's fc1 holds [gate ; up]; megatron's ``stride=2`` slices each half separately, so every
    TP rank gets matching gate and up columns."""

    def __init__(self, config: ModelConfig, mp_config: ModelParallelConfig):
        super().__init__()
        self.gated = config.activation == "geglu"
        width = config.ffn_size * (2 if self.gated else 1)
        self.fc1 = ColumnParallelLinear(
            config.hidden_size, width, config=mp_config, init_method=normal_init(config.init_std),
            bias=config.bias, gather_output=False, stride=2 if self.gated else 1,
        )
        self.fc2 = RowParallelLinear(
            config.ffn_size, config.hidden_size, config=mp_config, init_method=normal_init(config.init_std),
            bias=config.bias, input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.fc1(tokens)
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)
            hidden = F.gelu(gate) * up
        else:
            hidden = F.gelu(hidden)
        output, _ = self.fc2(hidden)
        return output


class TransformerLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, mp_config: ModelParallelConfig):
        super().__init__()
        self.pre_norm = config.pre_norm
        self.attention = SelfAttention(config, layer, mp_config)
        self.attention_norm = make_norm(config)
        self.mlp = MLP(config, mp_config)
        self.mlp_norm = make_norm(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.dropout(self.attention(self.attention_norm(x), layout))
            return x + self.dropout(self.mlp(self.mlp_norm(x)))
        x = self.attention_norm(x + self.dropout(self.attention(x, layout)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class Encoder(nn.Module):
    """A stack of transformer layers (+ final norm when pre-LN). Built layer by layer (a deep copy
    of a layer, as nn.TransformerEncoder does, breaks under ZeRO-3)."""

    def __init__(self, config: ModelConfig, mp_config: ModelParallelConfig):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([TransformerLayer(config, i, mp_config) for i in range(config.num_layers)])
        self.final_norm = make_norm(config) if config.pre_norm else None

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """hidden [N, L, H] (embedded), attention_mask [N, L] (1 = real token) -> [N, L, H]."""
        layout = TokenLayout.build(self.config, attention_mask, position_ids)
        x = layout.flatten(hidden)
        for layer in self.layers:
            if self.config.activation_checkpointing and self.training:
                x = _checkpointed(layer, x, layout)
            else:
                x = layer(x, layout)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return layout.unflatten(x)


def _checkpointed(layer: TransformerLayer, x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Recompute ``layer`` in backward. torch's checkpoint restores the default RNG but not the
    per-TP-rank dropout stream: replay that stream from its state at the original forward, then put
    the current state back, so recomputed attention dropout masks match the original ones."""
    tracker = parallel.rng_tracker()
    at_forward = tracker.get_states()
    calls = []

    def run(tokens: torch.Tensor) -> torch.Tensor:
        if not calls:
            calls.append(True)
            return layer(tokens, layout)
        current = tracker.get_states()
        tracker.set_states(at_forward)
        try:
            return layer(tokens, layout)
        finally:
            tracker.set_states(current)

    return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)
