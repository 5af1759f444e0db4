"""The AMBERT model family on megatron-core tensor-parallel layers.

    from pipeline.parallel import initialize_parallel
    from pipeline.model import build_model, model_recipe

    initialize_parallel(tensor_parallel_size=1, seed=1234)     # after torch.distributed init
    model = build_model(model_recipe("bert-base", fine_vocab_size=..., coarse_vocab_size=...))
    out = model(batch)            # loss, fine_loss, coarse_loss, fine_accuracy, coarse_accuracy, ...
"""

from pipeline.model.config import RECIPES, VARIANTS, ModelConfig, model_recipe
from pipeline.model.flops import count_parameters, flops_per_sample


def __getattr__(name: str):
    # The model itself on first use: it imports megatron-core (~3 s), which the recipes, the config
    # checks and the FLOP counts (`pretrain.py --finished`, the study's flags) do not need.
    if name in ("AmbertForPreTraining", "build_model"):
        from pipeline.model import ambert

        return getattr(ambert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "RECIPES",
    "VARIANTS",
    "AmbertForPreTraining",
    "ModelConfig",
    "build_model",
    "count_parameters",
    "flops_per_sample",
    "model_recipe",
]
