r"""Checkpoint conversion: another (TP, DP) layout via DeepSpeed universal checkpoints; fp32 export.

    # continue a TP=2/DP=2 run at TP=1 (any DP): convert, then resume from the converted copy
    python -m pipeline.convert universal runs/x/checkpoints/step_00001000 runs/y/checkpoints
    deepspeed --num_gpus 2 pipeline/pretrain.py ... parallelism.tensor_parallel=1 \
        checkpointing.dir=runs/y/checkpoints checkpointing.resume=auto

    # consolidated fp32 weights (safetensors + config.json + the dataset's tokenizer files),
    # loadable without DeepSpeed (pipeline.convert.load_exported, pipeline.inference.AmbertEncoder)
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
import contextlib
import json
import os
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


def _stride(param: torch.nn.Parameter) -> int:
    """megatron's ``partition_stride``: GeGLU's fc1 holds [gate ; up] and each TP rank holds its slice
    of BOTH halves (stride 2), not one contiguous block of the full tensor."""
    stride = int(getattr(param, "partition_stride", 1))
    if stride not in (1, 2) or (stride == 2 and int(getattr(param, "partition_dim", 0)) != 0):
        raise ValueError(f"a tensor-parallel parameter with partition_stride={stride} along dim "
                         f"{getattr(param, 'partition_dim', 0)}: checkpoint conversion handles stride 1, and 2 along dim 0")
    return stride


def tp_shard(full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's piece of the full (TP=1) tensor of ``param``: the inverse of
    ``parallel.full_tensor`` (with stride 2, its slice of each half, concatenated)."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = int(param.partition_dim), _stride(param)
    if stride == 1:
        return full.chunk(tp_size, dim)[tp_rank]
    return torch.cat([half.chunk(tp_size, dim)[tp_rank] for half in full.chunk(stride, dim)], dim=dim)


def universal_checkpoint_info(module: torch.nn.Module) -> dict:
    """The UNIVERSAL_CHECKPOINT_INFO dict for ``ds_to_universal`` (patterns over parameter names)."""
    from deepspeed.checkpoint.constants import (
        PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0,
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
        TP_REPLICATED_PARAMETER_PATTERNS,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    replicated, row_parallel, two_halves = [], [], []
    for name, param in module.named_parameters():
        pattern = rf"^{re.escape(name)}$"
        if not getattr(param, "tensor_model_parallel", False):
            replicated.append(pattern)
        elif _stride(param) == 2:  # merged as [gate of every rank ; up of every rank]
            two_halves.append(pattern)
        elif int(getattr(param, "partition_dim", 0)) == 1:
            row_parallel.append(pattern)
    return {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row_parallel,
        PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: two_halves,
    }


def tag_parameters_for_universal_load(module: torch.nn.Module) -> None:
    """Attach ``ds_autotp_universal_checkpoint_meta`` to every parameter, so that loading a universal
    checkpoint slices each merged tensor for THIS run's TP rank (replicated ones are taken whole)."""
    from deepspeed.checkpoint.constants import (
        DS_AUTOTP_UC_META,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    from pipeline.parallel import tensor_parallel_size

    tp_size = tensor_parallel_size()
    for _, param in module.named_parameters():
        full_shape, dim = _full_shape_and_dim(param, tp_size)
        split = getattr(param, "tensor_model_parallel", False)
        meta = {
            UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            "partition_type": ("row" if int(getattr(param, "partition_dim", 0)) == 1 else "column") if split else None,
            "partition_dim": int(param.partition_dim) if split else None,
            "logical_shape": list(full_shape),
            "replicated": not split,
            "conversion": {},
        }
        if split and dim is not None and _stride(param) == 2:  # each rank: its slice of both halves
            half = full_shape[dim] // 2
            meta["sub_param_sizes"] = [half, half]
            meta["sub_param_shard_widths"] = [[half // tp_size] * tp_size, [half // tp_size] * tp_size]
        setattr(param, DS_AUTOTP_UC_META, meta)


def prepare_universal_load(module: torch.nn.Module) -> None:
    """Everything DeepSpeed needs before ``load_checkpoint`` of a universal checkpoint with TP."""
    from deepspeed.utils import groups

    from pipeline.parallel import tensor_parallel_group

    groups._TENSOR_MODEL_PARALLEL_GROUP = tensor_parallel_group()
    tag_parameters_for_universal_load(module)


UNIVERSAL_FORMAT = 2
"""Recorded in a converted checkpoint's COMPLETE marker. 2: every state file is a ``{"param": tensor}``
dict in the parameter's full shape. Conversions without it (format 1) of a TP=1 ZeRO-3 checkpoint hold
bare flat tensors, which DeepSpeed's ZeRO-3 loader never slices for tensor parallelism."""

_STATE_FILES = ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt")


@contextlib.contextmanager
def _module_states_of_tensors_only():
    """While ``ds_to_universal`` runs: the model states it loads hold tensors only.

    megatron-core's parallel linear layers put ``<layer>._extra_state = None`` into every state dict
    (compatibility with Transformer Engine), and ``ds_to_universal`` writes each entry of a ZeRO-1/2
    checkpoint's ``mp_rank_*_model_states.pt`` "module" as ``tensor.float()``: an AttributeError on
    None, so no ZeRO-1/2 checkpoint (the bert-base and modern-base recipes') could be converted or
    exported. The files on disk are not touched."""
    load = torch.load

    def tensors_only(*args, **kwargs):
        state = load(*args, **kwargs)
        module = state.get("module") if isinstance(state, dict) else None
        if isinstance(module, dict) and not all(isinstance(v, torch.Tensor) for v in module.values()):
            state["module"] = type(module)((k, v) for k, v in module.items() if isinstance(v, torch.Tensor))
        return state

    torch.load = tensors_only
    try:
        yield
    finally:
        torch.load = load


def _wrap_bare_zero3_states(universal: Path) -> None:
    """Give every parameter state the dict form DeepSpeed's TP-aware loaders expect.

    ``ds_to_universal`` writes a ZeRO-3 checkpoint saved at TP=1 through its DP-only merge, which
    stores each state as a bare flat tensor. The ZeRO-3 universal loader applies the TP slicing
    (``ds_autotp_universal_checkpoint_meta``) only to ``{"param": ...}`` dicts, so at TP>1 every rank
    would take the WHOLE tensor of each split parameter (the word embeddings first) and overrun its
    partition. Wrapped and given the recorded (full, since TP=1) shape, they load at any TP size.
    """
    from deepspeed.checkpoint.constants import PARAM

    shapes: dict[str, tuple[int, ...]] = {}
    for model_file in sorted(universal.glob("*mp_rank_00_model_states.pt"))[:1]:
        for group in torch.load(model_file, map_location="cpu", weights_only=False).get("param_shapes", []):
            shapes.update({name: tuple(shape) for name, shape in group.items()})
    for param_dir in sorted(p for p in (universal / "zero").iterdir() if p.is_dir()):
        for name in _STATE_FILES:
            path = param_dir / name
            if not path.is_file():
                continue
            state = torch.load(path, map_location="cpu", weights_only=False)
            if isinstance(state, dict):
                continue
            shape = shapes.get(param_dir.name)
            if shape is not None and state.numel() == int(torch.Size(shape).numel()):
                state = state.reshape(shape)
            torch.save({PARAM: state}, path)


def _read_marker_quietly(path: Path) -> dict:
    try:
        marker = json.loads((path / "COMPLETE").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def to_universal(source: Path, target_dir: Path, workers: int = 1) -> Path:
    """Convert one complete checkpoint (a step_* directory) into a universal one in ``target_dir``.

    The result is a step_* directory with its own COMPLETE marker (``"universal": true``), so
    ``--resume auto`` with ``checkpointing.dir=<target_dir>`` picks it up at any (TP, DP) layout.
    """
    from deepspeed.checkpoint import ds_to_universal

    from pipeline.checkpoint import COMPLETE, TAG_PATTERN, complete_checkpoints, read_marker

    source = _complete_checkpoint(source)
    marker = read_marker(source)
    if marker.get("universal"):  # ds_to_universal reads ZeRO optimizer shards, which a universal checkpoint has not
        raise ConvertError(f"{source} is already a universal checkpoint (converted from "
                           f"{marker.get('converted_from', 'another checkpoint')}): a run continues from it at any TP / "
                           f"data-parallel size as it is (checkpointing.dir={source.parent}); to convert again, convert "
                           f"a checkpoint that run saved")
    target_dir = Path(target_dir)
    _refuse_inside(source, target_dir, "target")
    if target_dir.exists() and not target_dir.is_dir():
        raise ConvertError(f"target {target_dir} is a file: give the checkpoint directory of the continued run")
    if TAG_PATTERN.match(target_dir.name):
        raise ConvertError(f"target {target_dir} is named like a checkpoint (step_NNNNNNNN): give the checkpoints "
                           f"folder of the continued run (e.g. {target_dir.parent}); the converted checkpoint goes "
                           f"inside it as {source.name}, where --resume auto finds it")
    if target_dir.resolve() == source.parent.resolve():
        raise ConvertError(f"target {target_dir} is the folder {source.name} itself is in: give a new, empty folder "
                           f"for the converted checkpoint (the continued run's checkpointing.dir)")
    for _step, existing in complete_checkpoints(target_dir):
        # --resume auto takes the newest complete checkpoint of the folder: it must be this conversion
        same_run = Path(str(_read_marker_quietly(existing).get("converted_from", ""))).parent == source.parent
        if not same_run or existing.name >= source.name:
            raise ConvertError(f"{target_dir} already holds the checkpoint {existing.name}"
                               f"{'' if same_run else ' of another run'}: --resume auto there would continue from "
                               f"the newest one, not necessarily this conversion. Give an empty or new folder")
    target = target_dir / source.name
    if target.exists():
        raise ConvertError(f"{target} already exists: remove it or choose another target directory")
    partial = scratch_directory(target, "partial")  # a new name: an older folder is never deleted
    args = argparse.Namespace(
        input_folder=str(source), output_folder=str(partial), num_extract_workers=workers, num_merge_workers=workers,
        keep_temp_folder=False, strict=True, inject_missing_state=False,
    )
    try:
        with _module_states_of_tensors_only():
            ds_to_universal.main(args)
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, AssertionError, AttributeError, TypeError) as exc:
        from pipeline.checkpoint import disk_full

        why = disk_full(target_dir, exc)  # before the partial output is removed (which frees space)
        shutil.rmtree(partial, ignore_errors=True)
        if why is not None:
            raise ConvertError(f"converting {source} into {target_dir} failed: {why}. What it had written was "
                               f"removed (the source is untouched): free space, or write elsewhere, then run the same "
                               f"command again") from None
        raise ConvertError(f"checkpoint {source} cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}): "
                           f"one of its files is missing or damaged; convert an older complete checkpoint") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        _wrap_bare_zero3_states(partial)
        (target_dir / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer: we use COMPLETE markers
        partial.rename(target)
    except BaseException as exc:
        from pipeline.checkpoint import disk_full

        why = disk_full(target_dir, exc) if isinstance(exc, (OSError, RuntimeError)) else None
        shutil.rmtree(partial, ignore_errors=True)
        if why is not None:
            raise ConvertError(f"converting {source} into {target_dir} failed: {why}. What it had written was "
                               f"removed (the source is untouched): free space, or write elsewhere, then run the same "
                               f"command again") from None
        raise
    marker = {**marker, "universal": True, "converted_from": str(source), "universal_format": UNIVERSAL_FORMAT}
    (target / COMPLETE).write_text(json.dumps(marker, indent=1, default=str), encoding="utf-8")
    return target


def export(source: Path, output: Path) -> Path:
    """Consolidated fp32 weights (TP shards merged, ZeRO partitions gathered) as safetensors, plus
    config.json (the ModelConfig) and the run config: loadable with ``load_exported`` and no DeepSpeed.
    Written next to ``output`` and renamed into place when complete (see ``check_export_output``)."""
    from pipeline.checkpoint import read_marker

    source = _complete_checkpoint(source)
    final = Path(output)
    _refuse_inside(source, final, "output")
    refuse_containing(source, final, "checkpoint")
    check_export_output(final, ("config.json", "model.safetensors"), "an export")  # before the expensive part
    marker = read_marker(source)
    scratch: list[Path] = []  # what this export created: removed on failure, never anything else
    try:
        state = _consolidated_state(source, marker, final, scratch)
        output = scratch_directory(final, "partial")  # written aside, renamed when complete
        scratch.append(output)
        _write_export(state, marker, output, final)
        return commit_output(output, final, "an export")
    except (OSError, RuntimeError) as exc:  # a full disk: say so, and remove what was half written
        from pipeline.checkpoint import disk_full

        why = disk_full(final, exc)  # before the scratch directories are removed (which frees space)
        _remove_scratch(scratch)
        if why is None:
            raise
        raise ConvertError(f"export of {source} to {final} failed: {why}. What it had written was removed (the "
                           f"source and any earlier output are untouched): free space, or give another OUTPUT, "
                           f"then run the same command again") from None
    except BaseException:
        _remove_scratch(scratch)
        raise


def _consolidated_state(source: Path, marker: dict, final: Path, scratch: list[Path]) -> dict[str, torch.Tensor]:
    """The full fp32 tensors of a checkpoint (through a universal conversion next to ``final``, removed after)."""
    tmp_universal = None
    try:
        if marker.get("universal"):
            zero_dir = source / "zero"
        else:
            tmp_universal = scratch_directory(final, "universal-tmp")
            scratch.append(tmp_universal)
            zero_dir = to_universal(source, tmp_universal) / "zero"
        # Without TP, DeepSpeed's ZeRO-3 merge writes flat tensors: shape them from the recorded
        # parameter shapes (with TP the merge already yields full-shape tensors).
        shapes = {}
        for model_file in sorted(source.glob("*mp_rank_00_model_states.pt"))[:1]:
            for group in torch.load(model_file, map_location="cpu", weights_only=False).get("param_shapes", []):
                shapes.update({name: tuple(shape) for name, shape in group.items()})
        state = {}
        for param_dir in sorted(p for p in zero_dir.iterdir() if p.is_dir()):
            fp32 = torch.load(param_dir / "fp32.pt", map_location="cpu", weights_only=False)
            tensor = fp32["param"] if isinstance(fp32, dict) else fp32
            shape = shapes.get(param_dir.name)
            if tensor.dim() == 1 and shape is not None and len(shape) > 1 and tensor.numel() == int(torch.Size(shape).numel()):
                tensor = tensor.view(shape)
            state[param_dir.name] = tensor.float().contiguous().clone()
    finally:
        if tmp_universal is not None:
            shutil.rmtree(tmp_universal, ignore_errors=True)
            scratch.remove(tmp_universal)
    return state


def _write_export(state: dict[str, torch.Tensor], marker: dict, output: Path, final: Path) -> None:
    """The export's files into ``output`` (a scratch directory; ``final`` is where it will be)."""
    from safetensors.torch import save_file

    save_file(state, str(output / "model.safetensors"), metadata={"format": "pt", "step": str(marker["step"])})
    shareable(output / "model.safetensors")
    (output / "config.json").write_text(json.dumps(marker["model_config"], indent=1), encoding="utf-8")
    # The tokenizers the model was trained with travel with it (pipeline/inference.py reads them).
    from data_prep.encode import TOKENIZER_FILES
    from data_prep.format import META_FILE

    dataset = Path(str(marker.get("dataset_path", "")))
    for name in TOKENIZER_FILES:  # meta.json, the vocabularies, fine_tokenizer.json, phrases.tsv, user_dict.txt
        if (dataset / name).is_file():
            shutil.copy2(dataset / name, output / name)
    if not (dataset / META_FILE).is_file():
        print(f"warning: the pre-training dataset {dataset} is gone, so the export has no tokenizer files; copy "
              f"meta.json, fine_vocab.txt, coarse_vocab.txt (and fine_tokenizer.json, phrases.tsv) of it into "
              f"{final} before using the export", file=sys.stderr)
    else:
        from pipeline.finetuning import dataset_changed_since

        changed = dataset_changed_since(marker, dataset)
        if changed:
            print(f"warning: the pre-training dataset {dataset} {changed}: the tokenizer files copied into {final} "
                  f"may not be those the model was trained on (a vocabulary rebuilt on other text keeps its size). "
                  f"Copy meta.json, fine_vocab.txt, coarse_vocab.txt (and fine_tokenizer.json, phrases.tsv, "
                  f"user_dict.txt) of the original dataset into {final} before using the export", file=sys.stderr)
    (output / "training.json").write_text(
        json.dumps({k: marker.get(k) for k in ("step", "consumed_samples", "dataset_path", "dataset_fingerprint", "vocab_fingerprints",
                                        "tensor_parallel", "data_parallel", "started_from")}, indent=1),
        encoding="utf-8",
    )


class ConvertError(ValueError):
    """A conversion cannot run as asked; the message names the problem and the fix."""


def _refuse_inside(source: Path, output: Path, role: str) -> None:
    """An output written into the source checkpoint would be deleted with it by keep_last retention."""
    if output.resolve().is_relative_to(source.resolve()):
        raise ConvertError(f"{role} {output} is inside the checkpoint {source}: checkpoint retention (keep_last) "
                           f"would delete it together with the checkpoint. Write it outside {source}")


def _complete_checkpoint(source) -> Path:
    from pipeline.checkpoint import COMPLETE, why_not_a_checkpoint

    source = Path(source)
    if not (source / COMPLETE).is_file():
        raise ConvertError(f"SOURCE: {why_not_a_checkpoint(source)}. Give a complete checkpoint directory "
                           f"(.../checkpoints/step_NNNNNNNN)")
    return source


def shareable(*paths: Path) -> None:
    """Give files the permissions of any other file written here (0666 minus the umask): safetensors
    writes its files 0600, so an export shared on a cluster would be unreadable to the others."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)


# Files only the other kind of export writes: an HF export also has config.json + model.safetensors,
# so the signature alone would let `convert export` replace it (and the reverse).
_EXPORT_KINDS = {"an export": ("fine_vocab.txt", "coarse_vocab.txt"),
                 "a Hugging Face model": ("vocab.txt", "tokenizer_config.json")}

# Every name each kind of export writes (`_write_export` here and `save_exported` in pipeline/inference.py:
# the weights, config.json, training.json and data_prep's TOKENIZER_FILES; pipeline/export_hf.py's
# `_write_hf`: what transformers 4.x / 5.x save for a BertForMaskedLM and its fast tokenizer, sharded
# weights included). Replacing an output deletes it whole, so it is replaced only when it holds nothing else.
_HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
_HF_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def export_file_names(kind: str) -> frozenset[str]:
    """The names ``kind`` (a key of ``_EXPORT_KINDS``) writes into its output directory."""
    if kind == "a Hugging Face model":
        return frozenset(_HF_FILES)
    from data_prep.encode import TOKENIZER_FILES

    return frozenset(("model.safetensors", "config.json", "training.json", *TOKENIZER_FILES))


def _not_written_by(output: Path, kind: str) -> list[str]:
    """The entries of ``output`` that ``kind`` does not write (a folder never: it writes files only)."""
    names = export_file_names(kind)
    extra = []
    for entry in output.iterdir():
        written = entry.name in names or (kind == "a Hugging Face model" and _HF_SHARD.fullmatch(entry.name))
        if not written or (entry.is_dir() and not entry.is_symlink()):
            extra.append(entry.name + ("/" if entry.is_dir() and not entry.is_symlink() else ""))
    return sorted(extra)


def check_export_output(output: Path, signature: tuple[str, ...], kind: str) -> None:
    """An output directory may be new, empty, or ``kind`` written before and holding nothing else (it is
    replaced whole); nothing else (another kind of export, an export a user or fine-tuning added files
    to, a training run) is overwritten. Checked before any work, and again just before the replacement."""
    output = Path(output)
    if output.is_symlink():  # renaming it aside would move the link, not the export it points to
        raise ConvertError(f"output {output} is a symbolic link: give the directory it points to "
                           f"({output.resolve()}) or a new one")
    if output.exists() and not output.is_dir():
        raise ConvertError(f"output {output} is a file: give a directory to write {kind} into")
    if not output.is_dir() or not any(output.iterdir()):
        return
    exported = any((output / name).exists() for name in ("config.json", "model.safetensors", "training.json"))
    if (output / "meta.json").is_file() and (any(output.glob("*.idx")) or not exported):  # (an export's vocabularies too)
        raise ConvertError(f"output {output} is a pre-training dataset (data_prep/build.py), not {kind}: give a new or "
                           f"empty directory")
    for other, files in _EXPORT_KINDS.items():
        if other != kind and any((output / name).is_file() for name in files):
            raise ConvertError(f"output {output} holds {other}, not {kind}: give a new or empty directory, or one "
                               f"holding {kind} written before (it is replaced)")
    if not all((output / name).is_file() for name in signature):
        raise ConvertError(f"output {output} is a non-empty folder that does not hold {kind}: give a new or "
                           f"empty directory, or one holding {kind} written before (it is replaced)")
    extra = _not_written_by(output, kind)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise ConvertError(f"output {output} holds {kind} but also {shown}, which {kind} does not write: replacing "
                           f"the folder would delete {'it' if len(extra) == 1 else 'them'}. Give a new or empty "
                           f"directory, or move {'it' if len(extra) == 1 else 'them'} out of {output} first")


def refuse_containing(source: Path, output: Path, role: str) -> None:
    """An output that contains what it is made from (``convert export RUN/checkpoints/step_N RUN``):
    replacing it would delete the source, and the run around it, with the old output."""
    if source.resolve().is_relative_to(output.resolve()):
        raise ConvertError(f"output {output} contains the {role} {source} it is made from: replacing {output} "
                           f"would delete it. Give an output directory outside it (a new or empty one)")


def scratch_directory(final: Path, tag: str) -> Path:
    """A new directory next to ``final`` (the same filesystem: renaming it is atomic) named
    ``<final>.<tag>-<pid>-<random>``: created here, so it is never a path that existed before."""
    import tempfile

    final.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{final.name}.{tag}-{os.getpid()}-", dir=final.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)  # mkdtemp's 0700 would make the renamed output private
    return path


def _remove_scratch(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    paths.clear()


def commit_output(partial: Path, final: Path, kind: str | None = None) -> Path:
    """Put a completely written ``partial`` directory in place of ``final`` (a previous output of ``kind``
    is replaced; checked again here, as files may have been added while the export ran). The previous
    output is renamed aside under a new name, then removed: no other path is deleted."""
    if kind is not None:
        check_export_output(final, (), kind)
    if not final.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        partial.rename(final)
        return final
    old = scratch_directory(final, "old")
    final.rename(old)  # replaces the empty directory just made
    try:
        partial.rename(final)
    except BaseException:
        old.rename(final)  # the previous output back in place
        raise
    try:
        shutil.rmtree(old)
    except OSError as exc:
        print(f"warning: {final} was written, but the previous output moved aside to {old} could not be removed "
              f"({type(exc).__name__}: {exc}); remove it yourself", file=sys.stderr)
    return final


def load_exported(directory: str | Path):
    """Rebuild the model from an export (single process, TP=1) and load its weights."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from pipeline.model import ModelConfig, build_model
    from pipeline.parallel import initialize_parallel

    directory = Path(directory)
    if not dist.is_initialized():  # megatron's layers want a (here: single-process) process group
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    config = ModelConfig.from_dict(json.loads((directory / "config.json").read_text(encoding="utf-8")))
    initialize_parallel(1)
    model = build_model(config)
    missing, unexpected = model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)
    # Tied weights (the MLM decoders share the word embeddings) are exported once, under the
    # parameter's own name; their aliases in the state dict are filled by that same tensor.
    canonical = {id(p): n for n, p in model.named_parameters()}
    aliases = {n for n, t in model.state_dict(keep_vars=True).items() if id(t) in canonical and canonical[id(t)] != n}
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not match the model: missing {missing}, unexpected {unexpected}")
    return model


def main(argv: list[str] | None = None) -> int:
    from pipeline.checkpoint import CheckpointError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    u = sub.add_parser("universal", help="convert a checkpoint so training continues at another (TP, DP) layout")
    u.add_argument("source", type=Path, help="a complete checkpoint directory (.../checkpoints/step_NNNNNNNN)")
    u.add_argument("target_dir", type=Path, help="checkpoint directory of the continued run (checkpointing.dir)")
    u.add_argument("--workers", type=int, default=1, help="processes for extraction/merging")
    e = sub.add_parser("export", help="consolidated fp32 weights (safetensors) + config.json")
    e.add_argument("source", type=Path, help="a complete checkpoint directory (.../checkpoints/step_NNNNNNNN)")
    e.add_argument("output", type=Path, help="output directory")
    args = parser.parse_args(argv)
    try:
        if args.command == "universal":
            print(to_universal(args.source, args.target_dir, args.workers))
        else:
            print(export(args.source, args.output))
    except (ConvertError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:  # a full disk: say so, and remove what was half written
        from pipeline.checkpoint import disk_full

        universal = args.command == "universal"
        where = args.target_dir if universal else args.output
        why = disk_full(where, exc)
        if why is None:
            raise
        # export and to_universal remove the scratch directories they made (and nothing else)
        print(f"error: {args.command} of {args.source} to {where} failed: {why}. What it had written was removed "
              f"(the source and any earlier output are untouched): free space, or give another "
              f"{'TARGET_DIR' if universal else 'OUTPUT'}, then run the same command again", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
