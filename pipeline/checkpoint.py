"""Checkpoints that survive preemption: complete-marker commit, auto-resume, retention, RNG state.

Layout of ``checkpoints/``::

    step_00000100/                 # DeepSpeed's files for one save (tag = directory name)
      mp_rank_00_model_states.pt   #   client_state inside: consumed samples, per-rank RNG, config ...
      zero_pp_rank_*_optim_states.pt
      COMPLETE                     # written LAST, by rank 0, after every rank finished writing
    step_00000200/ ...
    latest                         # DeepSpeed's pointer; NOT trusted (written before all ranks are done)

A save is only ever considered by ``--resume auto`` once its ``COMPLETE`` marker exists: a job killed
mid-save leaves a directory without one, and the previous checkpoint is used. The marker is a small
JSON file with what a resume must check before touching a collective (step, dataset fingerprint,
model config, world layout), so a mismatch fails fast with a clear message on every rank.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("pretrain")

COMPLETE = "COMPLETE"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
# Model fields that change parameter shapes: a checkpoint cannot be loaded if any differs.
SHAPE_FIELDS = (
    "variant", "fine_vocab_size", "coarse_vocab_size", "vocab_multiple", "hidden_size", "num_layers",
    "num_attention_heads", "num_query_groups", "ffn_hidden_size", "max_position_embeddings",
    "type_vocab_size", "norm", "activation", "position", "bias", "sentence_order_head",
    "pre_norm",  # pre-LN adds the encoder's final norm
)
# Model fields that keep every shape but change what the weights compute: a resume that changes one is
# told (deliberate, e.g. a larger RoPE base for a long-context phase, or not).
FUNCTION_FIELDS = ("local_window", "global_every", "rope_theta", "layer_norm_eps")


def changed_function_fields(saved: dict, model_config: dict) -> dict[str, tuple]:
    """{field: (checkpoint's value, run's value)} for the FUNCTION_FIELDS a resume changes."""
    return {k: (saved[k], model_config.get(k)) for k in FUNCTION_FIELDS if k in saved and saved[k] != model_config.get(k)}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in ``directory``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for child in d.iterdir():
        m = TAG_PATTERN.match(child.name)
        if m and (child / COMPLETE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def find_resume_checkpoint(directory: str | os.PathLike, resume: str) -> Path | None:
    """The checkpoint to resume from: None (fresh), the newest complete one ('auto'), or an explicit path."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(directory)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"checkpointing.resume={resume}: {why_not_a_checkpoint(path)}; or use checkpointing.resume=auto")
    if path.resolve().parent == Path(directory).resolve():
        # Rolling back within the run's own folder: the newer checkpoints of the abandoned run would stay
        # "newest", so keep_last would delete this run's saves first and --resume auto (a requeue) would
        # go back to them.
        newer = [p for _, p in complete_checkpoints(directory) if p.name > path.name]
        if newer:
            aside = Path(directory) / "set_aside"
            raise CheckpointError(
                f"checkpointing.resume={resume}: {directory} also holds newer complete checkpoints "
                f"({', '.join(p.name for p in newer)}), which would stay the newest: keep_last would delete this "
                f"run's own saves first and --resume auto (a requeued job) would continue from {newer[-1].name}. "
                f"Move them out of the folder first: mkdir -p {aside} && mv {' '.join(str(p) for p in newer)} {aside}/")
    return path


def why_not_a_checkpoint(path: str | os.PathLike) -> str:
    """Why ``path`` (which has no COMPLETE marker) is not a usable checkpoint, and what to pass instead.

    Tells apart what users actually pass: a missing path, a file, the checkpoints folder itself, an
    interrupted save, an exported model and a pre-training dataset."""
    path = Path(path)

    def newest_complete(directory: Path) -> str:
        found = complete_checkpoints(directory)
        if not found:
            return f"{directory} holds no complete checkpoint"
        return f"the newest complete one is {found[-1][1]}"

    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is a file, not a checkpoint directory (.../checkpoints/step_NNNNNNNN)"
    if TAG_PATTERN.match(path.name):
        return (f"{path} has no {COMPLETE} marker: that save was interrupted (a job stopped while saving); "
                f"use a complete one ({newest_complete(path.parent)})")
    if any(TAG_PATTERN.match(child.name) for child in path.iterdir()):
        return f"{path} is a checkpoints folder: pass one of its step_NNNNNNNN directories ({newest_complete(path)})"
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return f"{path} is an exported model (python -m pipeline.convert export), not a training checkpoint"
    export_files = [name for name in ("config.json", "model.safetensors", "training.json") if (path / name).is_file()]
    if export_files:  # (an export holds its dataset's meta.json too: not to be called a dataset)
        missing = [name for name in ("config.json", "model.safetensors") if name not in export_files]
        return (f"{path} is an exported model missing its {' and '.join(missing)}: export it again from its "
                f"checkpoint (`python -m pipeline.convert export CHECKPOINT {path}`)")
    if (path / "meta.json").is_file():
        return f"{path} is a pre-training dataset (data_prep/build.py), not a checkpoint"
    return f"{path} is not a training checkpoint (no {COMPLETE} marker; expected .../checkpoints/step_NNNNNNNN)"


def read_marker(path: str | os.PathLike) -> dict:
    marker_path = Path(path) / COMPLETE
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{marker_path} is not valid JSON ({exc}): the checkpoint's marker was damaged. "
                              f"{_older_choice(Path(path))}") from None
    if not isinstance(marker, dict):
        raise CheckpointError(f"{marker_path} holds a JSON {type(marker).__name__}, not the marker object pretrain.py "
                              f"writes. {_older_choice(Path(path))}")
    return marker


def load_init_weights(path: str, dataset, model_config: dict) -> dict[str, torch.Tensor]:
    """``checkpointing.init_from``: the full fp32 weights of an export or a complete TP=1 checkpoint to
    start a fresh run from. CheckpointError (naming the fix, before any process group) when it is
    neither, or when its model shape or its vocabularies differ from this run's (``dataset``: the
    run's PairedDataset; ``model_config``: the run's ModelConfig as a dict)."""
    from data_prep.format import COARSE_VOCAB_FILE, FINE_VOCAB_FILE, Vocab
    from pipeline.finetuning import FinetuneError, resolve_pretrained

    flag = "checkpointing.init_from"
    try:
        pretrained = resolve_pretrained(path, "", flag=flag, allow_random=False)
    except FinetuneError as exc:
        raise CheckpointError(str(exc)) from None
    saved = pretrained.model_config.to_dict()
    try:  # the model's language: what its --vocab-from command needs (a zh model cannot encode an en corpus)
        language = json.loads((Path(pretrained.tokenizer_dir) / "meta.json").read_text(encoding="utf-8"))["language"]
    except (OSError, ValueError, KeyError, TypeError):
        language = dataset.meta.get("language", "LANG")
    if language != dataset.meta.get("language", language):
        raise CheckpointError(
            f"{flag}={path} is a --lang {language} model and data.path={dataset.directory} a --lang "
            f"{dataset.meta.get('language')} dataset: its vocabularies are for the other language. Give a --lang "
            f"{language} dataset (python data_prep/build.py --lang {language} --input ... --output ... --vocab-from "
            f"{pretrained.tokenizer_dir}) or another {flag}")
    rebuild = (f"python data_prep/build.py --lang {language} --input ... --output ... --vocab-from "
               f"{pretrained.tokenizer_dir}")
    sizes = [f"{k}: {saved.get(k)!r} there vs {model_config.get(k)!r} here" for k in ("fine_vocab_size", "coarse_vocab_size")
             if saved.get(k) != model_config.get(k)]
    if sizes:  # the run's vocabulary sizes come from its dataset, not from model settings
        raise CheckpointError(
            f"{flag}={path} was pre-trained with vocabularies of other sizes than data.path={dataset.directory} has "
            f"({'; '.join(sizes)}): its token ids would mean other tokens. Build the dataset with the model's "
            f"vocabularies: {rebuild}")
    diffs = [f"{k}: {saved.get(k)!r} there vs {model_config.get(k)!r} here" for k in SHAPE_FIELDS
             if saved.get(k) != model_config.get(k)]
    if diffs:
        raise CheckpointError(f"{flag}={path} is a model of another shape ({'; '.join(diffs)}): give this run the "
                              f"same model settings (model.recipe / model.* overrides; the export's config.json) or "
                              f"another {flag}")
    recorded = _record_of(Path(path)).get("vocab_fingerprints")
    if isinstance(recorded, dict):  # what the model was trained with, whatever its dataset holds now
        here = vocab_fingerprints(dataset)
        for side, name in (("fine", FINE_VOCAB_FILE), ("coarse", COARSE_VOCAB_FILE)):
            if recorded.get(side) is not None and recorded.get(side) != here[side]:
                raise CheckpointError(
                    f"{flag}={path} was pre-trained with another {name} (fingerprint {recorded.get(side)}) than "
                    f"data.path={dataset.directory} has ({here[side]}): its token ids would mean other tokens (the "
                    f"dataset it was trained on may have been rebuilt since). Build the dataset with the model's "
                    f"vocabularies (--vocab-from a copy of the original dataset), or give another {flag}")
    for name, here in ((FINE_VOCAB_FILE, dataset.fine_vocab), (COARSE_VOCAB_FILE, dataset.coarse_vocab)):
        there = Vocab.load(Path(pretrained.tokenizer_dir) / name)
        if there.fingerprint() != here.fingerprint():
            raise CheckpointError(
                f"{flag}={path} was pre-trained with another {name} ({Path(pretrained.tokenizer_dir) / name}) than "
                f"data.path={dataset.directory} has: its token ids would mean other tokens. Build the dataset with "
                f"the model's vocabularies: {rebuild}")
    return pretrained.state_dict


def vocab_fingerprints(dataset) -> dict[str, str]:
    """The fingerprints of a PairedDataset's two vocabularies (what its token ids mean)."""
    return {"fine": dataset.fine_vocab.fingerprint(), "coarse": dataset.coarse_vocab.fingerprint()}


def _record_of(source: Path) -> dict:
    """An export's training.json or a checkpoint's marker; {} when there is none or it is unreadable."""
    for name in ("training.json", COMPLETE):
        try:
            record = json.loads((source / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return record if isinstance(record, dict) else {}
    return {}


def describe_origin(path: str) -> dict:
    """What ``checkpointing.init_from`` points at, for the run's records (its checkpoints' markers,
    its exports' training.json): the resolved path, the step and dataset that model was trained to,
    and where IT started from (the chain of continued pre-training runs)."""
    source = Path(path).resolve()
    record = _record_of(source)
    return {"path": str(source), **{k: record[k] for k in ("step", "dataset_path", "dataset_fingerprint", "started_from")
                                    if record.get(k) is not None}}


def copy_full_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full (unsharded) weights into ``module`` as built for this run: each tensor-parallel
    parameter gets its slice for this TP rank, ZeRO-3 partitions are filled through a gather (DP rank
    0's values are broadcast). Call before ``deepspeed.initialize``, so the optimizer's fp32 master
    copies start from these weights."""
    import deepspeed

    from pipeline.convert import _full_shape_and_dim, tp_shard
    from pipeline.parallel import tensor_parallel_rank, tensor_parallel_size

    tp_rank, tp_size = tensor_parallel_rank(), tensor_parallel_size()
    params = dict(module.named_parameters())  # tied weights once, under the name the export uses
    # a checkpoint's state dict may also hold the tied weights' other names and buffers: not loaded
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(module.state_dict(keep_vars=True)))
    if missing or unexpected:
        raise CheckpointError(f"checkpointing.init_from: the weights do not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    for name, param in params.items():
        full_shape, dim = _full_shape_and_dim(param, tp_size)
        full = state[name]
        if tuple(full.shape) != tuple(full_shape):
            raise CheckpointError(f"checkpointing.init_from: {name} has shape {tuple(full.shape)}, the model's is "
                                  f"{tuple(full_shape)}")
        piece = full if dim is None else tp_shard(full, param, tp_rank, tp_size)
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=hasattr(param, "ds_id")):
            with torch.no_grad():
                param.data.copy_(piece.to(param.dtype))


def check_compatible(marker: dict, fingerprint: str, model_config: dict, path: Path, layout: dict | None = None) -> None:
    """Refuse to resume against another dataset, another model shape, or (``layout``: this run's
    tensor_parallel, data_parallel, zero_stage) another layout than a non-universal checkpoint was
    saved at (before any collective)."""
    if marker.get("dataset_fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was trained on dataset {marker.get('dataset_path')} (fingerprint "
            f"{marker.get('dataset_fingerprint')}), this run reads a different dataset (fingerprint {fingerprint}); "
            f"point data.path at the original dataset, or start a fresh run in another checkpointing.dir"
        )
    saved = marker.get("model_config", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs run {model_config.get(k)!r}" for k in SHAPE_FIELDS if saved.get(k) != model_config.get(k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} has another model shape ({'; '.join(diffs)}); use the checkpoint's model "
            f"settings (\"model_config\" in {path / COMPLETE}) or start a fresh run in another checkpointing.dir"
        )
    if layout and not marker.get("universal"):
        names = {"tensor_parallel": "TP", "data_parallel": "DP", "zero_stage": "ZeRO stage"}
        family = {0: 0, 1: 1, 2: 1, 3: 3}  # ZeRO-1 and -2 save the same optimizer files; 0 and 3 do not

        def same(key: str) -> bool:
            a, b = marker[key], layout[key]
            return family.get(a, a) == family.get(b, b) if key == "zero_stage" else a == b

        diffs = [k for k in names if k in marker and k in layout and not same(k)]
        if diffs:
            saved = ", ".join(f"{names[k]}={marker[k]}" for k in diffs)
            run = ", ".join(f"{names[k]}={layout[k]}" for k in diffs)
            raise CheckpointError(
                f"checkpoint {path} was saved at {saved}; this run has {run}. Resume at the saved layout, or "
                f"convert the checkpoint once with `python -m pipeline.convert universal {path} NEW_DIR` and resume "
                f"from it with checkpointing.dir=NEW_DIR --resume auto (any TP and DP; ZeRO stage 1 or 2 from stage "
                f"1 or 2, stage 3 from stage 3)"
            )


def check_universal_stage(path: Path, marker: dict, zero_stage: int) -> None:
    """A universal checkpoint loads at any TP and DP, but only within its ZeRO family: below stage 3
    DeepSpeed reads it from ``mp_rank_XX_model_states.pt`` files, which only a conversion of a ZeRO-1/2
    checkpoint has, and its stage-3 loader does not take such a conversion. Across families it failed
    inside DeepSpeed with a bare AssertionError, reported as a damaged checkpoint."""
    from_zero3 = not any(Path(path).glob("mp_rank_*_model_states.pt"))
    if from_zero3 == (zero_stage >= 3):
        return
    stages, configs = ("3", "ds_configs/zero3.json, or zero3_cpu.json on CPU") if from_zero3 else (
        "1 or 2", "ds_configs/zero1.json or zero2.json, or zero1_cpu.json on CPU")
    raise CheckpointError(
        f"{path} was converted from a ZeRO-{marker.get('zero_stage', 3 if from_zero3 else '1/2')} checkpoint, which "
        f"DeepSpeed loads only at ZeRO stage {stages}; this run has stage {zero_stage}. Continue it with such a "
        f"config (parallelism.deepspeed_config={configs}), or start a run at stage {zero_stage} from its weights "
        f"(`python -m pipeline.convert export {marker.get('converted_from', path)} EXPORT`, then "
        f"checkpointing.init_from=EXPORT: the optimizer state starts afresh)"
    )


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _human(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def disk_full(path: str | os.PathLike, exc: BaseException) -> str | None:
    """Why writing under ``path`` failed with ``exc`` when the disk (or a quota) is full: "the disk is
    full (X free of Y there)"; None for any other failure. torch.save and safetensors report a full
    disk only as "iostream error" / "unexpected pos" / a bare I/O error, so the free space left tells
    (under 1% of the filesystem or 256 MB), besides ENOSPC / EDQUOT."""
    import errno

    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        usage = shutil.disk_usage(where)
    except OSError:
        usage = None
    quota = isinstance(exc, OSError) and exc.errno == errno.EDQUOT
    full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or (
        usage is not None and usage.free < max(256 << 20, usage.total // 100))
    if not (full or quota):
        return None
    what = "the disk quota is exceeded" if quota else "the disk is full"
    free = f"{_human(usage.free)} free of {_human(usage.total)} there" if usage else "free space unknown"
    return f"{what} ({free}; {type(exc).__name__}: {' '.join(str(exc).split())[:200]})"


def full_disk_error(directory: Path, path: Path, exc: BaseException, keep_last: int) -> CheckpointError | None:
    """The CheckpointError for a save that failed because the disk (or a quota) is full, or None when it
    failed for another reason. The incomplete save is removed (it has no COMPLETE marker: nothing
    would ever read it), which gives its space back."""
    why = disk_full(directory, exc)
    if why is None:
        return None
    written = _du(path) if path.is_dir() else 0
    shutil.rmtree(path, ignore_errors=True)
    complete = complete_checkpoints(directory)
    if complete:
        newest = complete[-1][1]
        size = f"A checkpoint of this run takes {_human(_du(newest))}"
        kept = f"the newest complete checkpoint, {newest.name}, is intact: --resume auto continues from it"
    else:
        size = f"A checkpoint of this run takes more than the {_human(written)} written before the disk was full"
        kept = "there is no complete checkpoint yet"
    return CheckpointError(
        f"saving checkpoint {path.name} to {directory} failed: {why}. The incomplete {path.name} was removed; {kept}. {size}, and "
        f"checkpointing.keep_last={keep_last} are kept: free space, lower checkpointing.keep_last, or give "
        f"checkpointing.dir on a larger filesystem (moving the checkpoints there), then run the same command "
        f"with --resume auto")


def gather_rng_states(rng_state: dict) -> list[dict]:
    """Every rank's RNG state, in global rank order (each rank keeps the whole list)."""
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state)
    return states


def save(engine, directory: str | os.PathLike, step: int, client_state: dict, marker: dict, keep_last: int) -> Path:
    """Save through DeepSpeed, then commit with the COMPLETE marker and prune old checkpoints.

    Every rank must call this. The marker is written by rank 0 only after a barrier that every rank
    reaches once its own files are on disk.
    """
    directory = Path(directory)
    tag = tag_for(step)
    path = directory / tag
    if dist.get_rank() == 0 and path.exists():
        shutil.rmtree(path)  # a leftover of an interrupted save of the same step
    dist.barrier()
    try:
        engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=True)
    except (OSError, RuntimeError) as exc:  # torch.save says "iostream error" / "unexpected pos" on a full disk
        failure = full_disk_error(directory, path, exc, keep_last)
        if failure is None:
            raise
        raise failure from None
    _fault_injection("save", step)
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = path / (COMPLETE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"step": step, "tag": tag, **marker}, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / COMPLETE)
        _prune(directory, keep_last)
        log.info("checkpoint %s complete", path)
    dist.barrier()
    return path


def _prune(directory: Path, keep_last: int) -> None:
    complete = complete_checkpoints(directory)
    newest = complete[-1][0] if complete else -1
    for _, path in complete[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    # Interrupted saves older than the newest complete one will never be used.
    for child in directory.iterdir():
        m = TAG_PATTERN.match(child.name)
        if m and int(m.group(1)) < newest and not (child / COMPLETE).exists():
            shutil.rmtree(child, ignore_errors=True)


def load(engine, path: str | os.PathLike, load_optimizer_states: bool = True) -> dict:
    """Load a complete checkpoint into the engine; returns its client_state."""
    path = Path(path)
    try:
        load_path, client_state = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=load_optimizer_states, load_lr_scheduler_states=True
        )
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, AssertionError) as exc:
        # a file deleted, truncated or overwritten after the save was committed
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:300]}): one of its files is missing or damaged. "
                              f"{_older_choice(path)}") from None
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {path} (files missing?). {_older_choice(path)}")
    if getattr(engine, "lr_scheduler", None) is not None:
        from pipeline.optim import sync_learning_rate

        sync_learning_rate(engine.lr_scheduler)  # ZeRO restores the saved schedule's lr after the scheduler
    return client_state or {}


def _older_choice(path: Path) -> str:
    older = [p for step, p in complete_checkpoints(path.parent) if p.name < path.name]
    if not older:
        return "No older complete checkpoint is left in its folder: restore the files, or start a fresh run."
    return (f"The newest older complete one is {older[-1]}: move {path.name} (and any newer one) out of {path.parent}, "
            f"then resume with --resume auto (or checkpointing.resume={older[-1]}), or give it to fine-tuning / export "
            f"instead")


def _fault_injection(point: str, step: int) -> None:
    """Test hook: AMBERT_FAULT=kill_rank<R>_in_save@<STEP> SIGKILLs rank R after its DeepSpeed files
    are written but before the COMPLETE marker (a job killed mid-save)."""
    spec = os.environ.get("AMBERT_FAULT", "")
    m = re.fullmatch(r"kill_rank(\d+)_in_(\w+)@(\d+)", spec)
    if m and m.group(2) == point and int(m.group(3)) == step and int(m.group(1)) == dist.get_rank():
        log.warning("AMBERT_FAULT: killing rank %d during %s at step %d", dist.get_rank(), point, step)
        os.kill(os.getpid(), signal.SIGKILL)


def rng_state_for_rank(client_state: dict, rank: int, world_size: int, tensor_parallel: int | None = None) -> dict | None:
    """The RNG state rank ``rank`` saved, or None when the checkpoint was saved at another layout: at
    the same world size but another TP size (a universal conversion), old rank k's stream would give
    the TP ranks of one data-parallel group different dropout on replicated tensors, which then drift
    apart (and DeepSpeed refuses to merge them in the next conversion or export)."""
    states = client_state.get("rng_states")
    if not states or len(states) != world_size:
        return None
    saved_tp = ((client_state.get("config") or {}).get("parallelism") or {}).get("tensor_parallel")
    if tensor_parallel is not None and saved_tp is not None and saved_tp != tensor_parallel:
        return None
    return states[rank]


__all__ = [
    "COMPLETE", "CheckpointError", "check_compatible", "why_not_a_checkpoint", "complete_checkpoints", "find_resume_checkpoint",
    "gather_rng_states", "load", "read_marker", "rng_state_for_rank", "save", "tag_for", "torch",
]
