import warnings

# Import-time noise of megatron-core without TransformerEngine/Apex (its local fallbacks are what we
# use): four UserWarnings on stderr before the output of every tool (inference, finetune, convert,
# export_hf); pretrain.py filters them too.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
