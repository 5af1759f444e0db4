"""Analytic parameter count and FLOPs per sample (for MFU), per variant and option.

FLOPs count matrix multiplications only (2 per multiply-add), as in the PaLM / nanoGPT MFU
convention; forward + backward = 3 x forward. Attention counts the scores and the weighted sum over
the keys a token may see (all real tokens in global layers, ``local_window + 1`` in local ones).
Padding is not counted: MFU measures useful work.
"""

from __future__ import annotations

from pipeline.model.config import ModelConfig


def _norm_parameters(config: ModelConfig) -> int:
    if config.norm == "rmsnorm":
        return config.hidden_size
    return config.hidden_size * (2 if config.bias else 1)


def _linear(inputs: int, outputs: int, bias: bool) -> int:
    return inputs * outputs + (outputs if bias else 0)


def layer_parameters(config: ModelConfig) -> int:
    h, d = config.hidden_size, config.head_dim
    qkv = _linear(h, (config.num_attention_heads + 2 * config.query_groups) * d, config.bias)
    out = _linear(config.num_attention_heads * d, h, config.bias)
    gate = 2 if config.activation == "geglu" else 1
    mlp = _linear(h, gate * config.ffn_size, config.bias) + _linear(config.ffn_size, h, config.bias)
    return qkv + out + mlp + 2 * _norm_parameters(config)


def count_parameters(config: ModelConfig) -> int:
    """Number of distinct parameters at TP=1 (tied head weights counted once); equals
    ``sum(p.numel() for p in build_model(config).parameters())``."""
    h = config.hidden_size
    encoder = config.num_layers * layer_parameters(config) + (_norm_parameters(config) if config.pre_norm else 0)
    extras = (
        (config.max_position_embeddings * h if config.position == "learned" else 0)
        + config.type_vocab_size * h
        + (2 * h if config.variant == "ambert-hybrid" else 0)
        + _norm_parameters(config)
    )
    streams = 2 if config.variant == "ambert-combo" else 1
    total = streams * (encoder + extras)
    for g in config.granularities:
        vocab = config.padded_vocab_size(g)
        total += vocab * h  # word table (the MLM output weight is tied to it)
        total += _linear(h, h, config.bias) + _norm_parameters(config) + vocab  # transform + output bias
    if config.sentence_order_head:
        total += _linear(h, h, config.bias) + _linear(len(config.granularities) * h, 2, True)
    return total


def _encoder_forward_flops(config: ModelConfig, length: int) -> float:
    """Forward FLOPs of one encoder over one sequence of ``length`` real tokens."""
    h, d = config.hidden_size, config.head_dim
    gate = 2 if config.activation == "geglu" else 1
    per_token_linear = 2 * (
        h * (config.num_attention_heads + 2 * config.query_groups) * d
        + config.num_attention_heads * d * h
        + h * gate * config.ffn_size
        + config.ffn_size * h
    )
    total = 0.0
    for layer in range(config.num_layers):
        seen = length if config.is_global_layer(layer) else min(length, config.local_window + 1)
        attention = 2 * 2 * seen * config.num_attention_heads * d  # QK^T and (probs)V, per token
        total += length * (per_token_linear + attention)
    return total


def _head_forward_flops(config: ModelConfig, granularity: str, masked: int) -> float:
    h = config.hidden_size
    return masked * 2 * (h * h + h * config.padded_vocab_size(granularity))


def flops_per_sample(config: ModelConfig, fine_len: float, coarse_len: float,
                     fine_masked: float, coarse_masked: float) -> float:
    """Forward + backward FLOPs of one training sample with the given real (unpadded) lengths and
    numbers of masked tokens; average lengths give the average cost."""
    lengths = {"fine": fine_len, "coarse": coarse_len}
    masked = {"fine": fine_masked, "coarse": coarse_masked}
    granularities = config.granularities
    forward = 0.0
    if config.variant == "ambert-hybrid":
        forward += _encoder_forward_flops(config, round(fine_len + coarse_len))
    else:
        for g in granularities:
            forward += _encoder_forward_flops(config, round(lengths[g]))
    for g in granularities:
        forward += _head_forward_flops(config, g, masked[g])
    if config.sentence_order_head:
        h = config.hidden_size
        forward += len(granularities) * 2 * h * h + 2 * len(granularities) * h * 2
    return 3.0 * forward
