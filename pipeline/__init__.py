import sys
import warnings

# Import-time noise of megatron-core without TransformerEngine/Apex (its local fallbacks are what we
# use): four UserWarnings on stderr before the output of every tool (inference, finetune, convert,
# export_hf); pretrain.py filters them too.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


def skip_final_garbage_collection() -> None:
    """For a command-line entry point: freeze the heap at exit (``gc.freeze``, an atexit handler), so
    the interpreter's last collections skip it. Those walked every object of torch, DeepSpeed and
    megatron-core, 1.9-2.4 s of each training rank's exit against 0.5-0.6 s (one rank, on 2 cores), in
    every job, test and restart. The exit handlers still run (logging, MPI_Finalize); only cyclic
    garbage is left to the process's end, as the kernel frees its memory anyway."""
    import atexit
    import gc

    atexit.register(gc.freeze)


def _no_compile(model=None, **kwargs):
    """``torch.compile``'s signature, compiling nothing: ``f`` for ``@torch.compile`` and
    ``torch.compile(f)``, the identity decorator for ``@torch.compile(mode=...)``."""
    return model if model is not None else (lambda fn: fn)


# Modules whose import compiles functions this project never calls (see below).
_IMPORTED_WITHOUT_COMPILE = ("megatron.core", "deepspeed.runtime.zero.muon.original_muon")


class _ImportWithoutTorchCompile:
    """Import hook: megatron-core's import runs with ``torch.compile`` swapped for ``_no_compile``.

    megatron-core wraps its fused kernels (bias + GeLU/GeGLU/SwiGLU, bias-dropout-add, rotary
    embeddings...) in ``torch.compile`` as it is imported (``megatron.core.jit.jit_fuser``), and that
    first call imports TorchDynamo and Inductor: ~2 s of every process's start (a training rank's
    imports took 5.3-6.0 s, 3.4-3.7 s without). This project calls none of those kernels (its layers
    are megatron-core's tensor-parallel linears and embeddings, its activations its own), so they stay
    plain functions, as megatron's own ``disable_jit_fuser()`` would leave them had it run first; the
    jit_fuser of megatron modules imported later is that no-op too. DeepSpeed's Muon optimizer
    (``deepspeed.initialize`` imports it; this project builds its own optimizers, and a ds_config that
    asked for Muon would run its Newton-Schulz step eagerly) compiles that step the same way, the only
    other import of Inductor in a training rank: TorchDynamo itself is still imported (torch.optim's
    constructors do), Inductor not. With ``skip_final_garbage_collection``, a 2-step launch of 2 ranks
    on 2 cores took 8.6-9.3 s instead of 13.1-14.1 s. Only these imports run with the swap: after them
    ``torch.compile`` is torch's again. Installed by importing ``pipeline`` (no import of torch or
    megatron here); a process that imported megatron-core before ``pipeline`` keeps megatron's
    defaults."""

    def __init__(self) -> None:
        self.pending = set(_IMPORTED_WITHOUT_COMPILE)

    def find_spec(self, name, path=None, target=None):
        if name not in self.pending:
            return None
        self.pending.discard(name)
        if not self.pending:
            sys.meta_path.remove(self)
        spec = None
        for finder in list(sys.meta_path):  # the finder that would have found it (a path, an editable install)
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_without_compile(module):
            import torch

            compile_ = torch.compile
            torch.compile = _no_compile
            try:
                exec_module(module)
                if module.__name__ == "megatron.core":
                    from megatron.core import jit  # (imported by now; if not, imported under the no-op)

                    jit.jit_fuser = _no_compile  # for megatron modules imported later
            finally:
                torch.compile = compile_

        spec.loader.exec_module = exec_without_compile
        return spec


if "megatron.core" not in sys.modules and not any(isinstance(f, _ImportWithoutTorchCompile) for f in sys.meta_path):
    sys.meta_path.insert(0, _ImportWithoutTorchCompile())
