"""Checkpoint conversion: another (TP, DP) layout via DeepSpeed universal checkpoints; fp32 export.

    # continue a TP=2/DP=2 run at TP=1 (any DP): convert, then resume from the converted copy
    python -m pipeline.convert universal runs/x/checkpoints/step_00001000 runs/y/checkpoints/step_00001000
    deepspeed --num_gpus 2 pipeline/pretrain.py ... parallelism.tensor_parallel=1 \
        checkpointing.dir=runs/y/checkpoints checkpointing.resume=auto

    # consolidated fp32 weights (safetensors + config.json), loadable without DeepSpeed
    python -m pipeline.convert export runs/x/checkpoints/step_00001000 exported/ambert-tiny

How TP shards are merged. DeepSpeed's ``ds_to_universal`` concatenates every parameter's TP slices
along dim 0 unless told otherwise, which silently doubles replicated tensors (a LayerNorm weight of 64
becomes 128) and merges row-parallel weights along the wrong dim. Every save therefore records
``universal_checkpoint_info`` (client_state): which parameters are replicated across TP ranks and
which are split along dim 1 (megatron's ``partition_dim``); loading a universal checkpoint at another
TP size tags every parameter with ``ds_autotp_universal_checkpoint_meta`` (see
``tag_parameters_for_universal_load``) so DeepSpeed slices the merged tensor the same way.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch


def _full_shape_and_dim(param: torch.nn.Parameter, tp_size: int) -> tuple[tuple[int, ...], int | None]:
    shape = tuple(getattr(param, "ds_shape", param.shape))
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return shape, None
    dim = int(param.partition_dim)
    full = list(shape)
    full[dim] *= tp_size
    return tuple(full), dim


def universal_checkpoint_info(module: torch.nn.Module) -> dict:
    """The UNIVERSAL_CHECKPOINT_INFO dict for ``ds_to_universal`` (patterns over parameter names)."""
    from deepspeed.checkpoint.constants import (
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
        TP_REPLICATED_PARAMETER_PATTERNS,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    replicated, row_parallel = [], []
    for name, param in module.named_parameters():
        pattern = rf"^{re.escape(name)}$"
        if not getattr(param, "tensor_model_parallel", False):
            replicated.append(pattern)
        elif int(getattr(param, "partition_dim", 0)) == 1:
            row_parallel.append(pattern)
        if int(getattr(param, "partition_stride", 1)) != 1:
            raise ValueError(f"parameter {name} has partition_stride != 1: universal conversion would interleave it wrongly")
    return {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row_parallel,
    }
