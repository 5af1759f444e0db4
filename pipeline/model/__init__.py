"""The AMBERT model family on megatron-core tensor-parallel layers.

    from pipeline.parallel import initialize_parallel
    from pipeline.model import build_model, model_recipe

    initialize_parallel(tensor_parallel_size=1, seed=1234)     # after torch.distributed init
    model = build_model(model_recipe("bert-base", fine_vocab_size=..., coarse_vocab_size=...))
    out = model(batch)            # loss, fine_loss, coarse_loss, fine_accuracy, coarse_accuracy, ...
"""

from pipeline.model.ambert import AmbertForPreTraining, build_model
from pipeline.model.config import RECIPES, VARIANTS, ModelConfig, model_recipe
from pipeline.model.flops import count_parameters, flops_per_sample

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
