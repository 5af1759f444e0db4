"""The pre-training configuration: typed nested dataclasses, YAML recipes, key=value overrides.

    config = load_config("pipeline/recipes/bert-base.yaml", ["schedule.train_steps=1000", "data.path=/data/zh"])
    validate(config, world_size=8, dataset_meta=meta)      # before any collective call

Every field has a default and a one-line doc. A recipe YAML sets any subset; ``section.field=value``
overrides (values parsed as YAML: ``true``, ``1e-4``, ``[0.9, 0.98]``) come last. The model section
names a recipe of ``pipeline.model.config.model_recipe`` plus field overrides (``model.hidden_size=64``),
checked against ``ModelConfig``'s fields. ``validate`` raises ``ConfigError`` naming the field and
the fix, so a bad run stops before it allocates anything or waits on a peer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATASET = "data/demo-zh"


def resolve_path(path: str) -> Path:
    """Absolute paths as given; relative ones from the working directory if they exist there, else
    from the repository root (so the demo recipe works from any directory)."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute():
        return p
    return p.resolve() if p.exists() else ROOT / p


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field and how to fix it."""


@dataclass
class ModelSection:
    recipe: str = "tiny"
    """name for pipeline.model.config.model_recipe (tiny, tiny-modern, bert-base, bert-large, modern-base)"""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields set on top of the recipe (on the command line: model.<field>=value)"""
    activation_checkpointing: bool = False
    """recompute each layer's activations in the backward pass (less memory, ~30% more compute)"""


@dataclass
class DataSection:
    path: str = DEMO_DATASET
    """paired dataset directory (data_prep/build.py output); relative paths are from the repo root"""
    blend: list[dict[str, Any]] = field(default_factory=list)
    """more datasets to train on, each {path: DIR, weight: W}, built with data.path's vocabularies (data_prep/build.py --vocab-from data.path): the train samples come from each in proportion to its weight (data.weight is data.path's), each dataset in its own shuffled epochs; valid losses are data.path's"""
    weight: float = 1.0
    """data.path's weight when data.blend adds datasets (weights are relative: 0.7 and 0.3, or 7 and 3)"""
    build_demo_if_missing: bool = True
    """if `path` is the demo dataset and missing, rank 0 builds it (python data_prep/build.py --lang zh)"""
    seq_length: int = 64
    """fine sequence length including [CLS] and [SEP]; consecutive sentences are packed up to it"""
    coarse_seq_length: int = 0
    """coarse sequence length including [CLS] and [SEP]; 0 = the longest coarse side of the packing, rounded up to a multiple of 8; set, samples are packed to fit it too"""
    mask_rate: float = 0.15
    """fraction of COARSE tokens masked per sample (the fine tokens they cover are masked too)"""
    mask_token_prob: float = 0.8
    """share of masked spans replaced by [MASK]"""
    random_token_prob: float = 0.1
    """share of masked spans replaced by random tokens (the rest is kept unchanged)"""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 = build samples in the training process)"""
    valid_every: int = 0
    """evaluate on the valid split every N steps (0 = never)"""
    valid_batches: int = 8
    """micro-batches in one evaluation, over all data-parallel ranks together: the first valid_batches x micro_batch_size valid samples, the same samples and masks whatever the TP / DP layout"""


@dataclass
class OptimizerSection:
    name: str = "adamw"
    """adamw (torch.optim.AdamW, client optimizer) | stable_adamw (AdamW with per-tensor update clipping, as ModernBERT; without ZeRO, in fp32: ds_configs/zero0.json) | deepspeed_adamw (DeepSpeed's fused AdamW; JIT-compiles)"""
    lr: float = 1e-3
    """peak learning rate"""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """Adam beta1, beta2"""
    eps: float = 1e-6
    """Adam epsilon"""
    weight_decay: float = 0.01
    """decoupled weight decay (not applied to biases, norms and embeddings' norms)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this value (0 = off)"""
    stop_on_nonfinite: bool = True
    """stop the job (exit 1, nothing saved) at the first step whose loss or gradient norm is NaN or infinite, naming the newest complete checkpoint to resume from; fp16 runs check the loss only (DeepSpeed's loss scaling skips overflowing steps itself)"""


@dataclass
class ScheduleSection:
    train_steps: int = 200
    """optimizer steps of the whole run"""
    style: str = "linear"
    """linear (BERT: warm-up, then linear decay to min_lr_ratio) | wsd (ModernBERT: warm-up, stable, linear decay)"""
    warmup_steps: int = 20
    """linear warm-up from 0 to the peak learning rate"""
    decay_fraction: float = 0.1
    """wsd only: last fraction of train_steps spent decaying"""
    min_lr_ratio: float = 0.0
    """final learning rate as a fraction of the peak"""
    stop_after: int = 0
    """end THIS job (checkpoint, exit 0) after this many steps, the schedule unchanged; resume continues (0 = off)"""
    stop_after_minutes: float = 0.0
    """end THIS job (checkpoint, exit 0) after this many minutes, e.g. a time-limited allocation (0 = off)"""


@dataclass
class ParallelismSection:
    tensor_parallel: int = 1
    """tensor-parallel size (megatron-core); must divide attention heads and the world size"""
    micro_batch_size: int = 8
    """samples per rank per forward pass"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    global_batch_size: int = 0
    """samples per optimizer step (0 = micro_batch_size x gradient_accumulation_steps x data-parallel size); if set, must equal that product"""
    precision: str = "fp32"
    """fp32 | bf16 | fp16 (fp16 uses DeepSpeed's dynamic loss scaling)"""
    deepspeed_config: str = "ds_configs/zero3_cpu.json"
    """DeepSpeed JSON (ZeRO stage, offload, ...); batch sizes, clipping and precision come from this file's keys only if left "auto" or absent"""
    collective_timeout_minutes: float = 30.0
    """how long a rank waits in a collective for its peers before the job fails (a hung rank or node); also bounds a checkpoint save"""


@dataclass
class CheckpointSection:
    dir: str = ""
    """checkpoint directory ('' = <output_dir>/checkpoints); must be shared by all nodes"""
    save_every: int = 0
    """save every N steps (0 = only at the end and on SIGTERM/SIGUSR1)"""
    keep_last: int = 3
    """complete checkpoints kept (older ones are deleted once a newer one is complete)"""
    resume: str = ""
    """'' = start fresh, 'auto' = newest complete checkpoint in dir (fresh if none), or a checkpoint directory"""
    init_from: str = ""
    """start a fresh run (step 0, new optimizer state and schedule) from these weights: an export
    (python -m pipeline.convert export) or a complete TP=1 checkpoint, of the same model shape and
    vocabularies (continued pre-training on a dataset built with data_prep/build.py --vocab-from);
    not used when the run continues from a checkpoint of its own"""
    save_at_end: bool = True
    """save a checkpoint after the last step"""


@dataclass
class LoggingSection:
    every: int = 1
    """log metrics every N steps"""
    tensorboard: bool = True
    """write TensorBoard event files to <output_dir>/tensorboard"""
    peak_flops: float = 0.0
    """peak FLOP/s of one device for MFU (0 = a guess: an A100's 312e12 in bf16/fp16 and 19.5e12 in fp32 on a GPU, a matmul measured at start-up on CPU)"""
    profile_steps: str = ""
    """trace these steps with torch.profiler, e.g. "10-12" or "10" ("" = off): <output_dir>/profile/rank<R>_steps<A>-<B>.pt.trace.json (Chrome / Perfetto / TensorBoard's profiler plugin), a .txt table of operators by self time and, on GPUs, the CUDA allocator's history (.memory.pickle)"""
    profile_ranks: str = "0"
    """global ranks that trace logging.profile_steps: "0", "0,8" or "all" (every rank)"""


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    parallelism: ParallelismSection = field(default_factory=ParallelismSection)
    checkpointing: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    output_dir: str = "runs/demo"
    """where config.yaml, metrics.jsonl, tensorboard/ and (by default) checkpoints/ go"""
    seed: int = 1234
    """seed for initialisation, dropout, data order and masks"""

    # --- derived paths -------------------------------------------------------------------
    @property
    def dataset_dir(self) -> Path:
        return resolve_path(self.data.path)

    @property
    def blend_dirs(self) -> list[tuple[Path, float]]:
        """data.blend's datasets and weights (empty: data.path alone)."""
        return [(resolve_path(e["path"]), float(e["weight"])) for e in self.data.blend]

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpointing.dir or os.path.join(self.output_dir, "checkpoints")).resolve()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------
# Loading: dict -> dataclass with type checks
# ---------------------------------------------------------------------------------------------
class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader without YAML 1.1's base-60 numbers: ``10:12`` stays the string it looks like
    (1.1 reads it as 612: ``logging.profile_steps=10:12`` traced step 612), as in YAML 1.2."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of fields, got {value!r}")
        return _from_dict(annotation, value, name)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0].replace(", got", " or null, got", 1) if type(None) in options else errors[0])
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def _from_dict(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"unknown field(s) {', '.join(unknown)} in {where}; known fields: {', '.join(sorted(known))}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """'a.b.c=value' -> {'a': {'b': {'c': value}}}; model.<field>=v goes to model.overrides."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. schedule.train_steps=100)")
    key, raw = text.split("=", 1)
    try:
        value = _yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value {raw!r} is not valid YAML (an unclosed bracket or quote?); "
                          f"fix it") from None
    parts = key.strip().split(".")
    if parts[0] == "model" and len(parts) == 2 and parts[1] not in {f.name for f in dataclasses.fields(ModelSection)}:
        parts = ["model", "overrides", parts[1]]
    out: dict = value
    for p in reversed(parts):
        out = {p: out}
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> PretrainConfig:
    """Defaults <- recipe YAML (if any) <- key=value overrides."""
    values: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file (recipes live in pipeline/recipes/)")
        try:
            loaded = _yaml_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not valid YAML ({' '.join(str(exc).split())}); fix the file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--config {path}: not UTF-8 text; give a YAML recipe") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a YAML mapping of sections")
        deepspeed_keys = {"zero_optimization", "train_batch_size", "train_micro_batch_size_per_gpu", "fp16", "bf16"}
        if deepspeed_keys & set(loaded) and not {"model", "data", "parallelism"} & set(loaded):
            raise ConfigError(f"--config {path} is a DeepSpeed JSON config, not a recipe: give it as "
                              f"--deepspeed_config {path} (or parallelism.deepspeed_config={path}), and a recipe "
                              f"(pipeline/recipes/*.yaml) as --config")
        # Recipes may set model fields directly under `model:`; route them into model.overrides.
        model = dict(loaded.get("model") or {})
        section_fields = {f.name for f in dataclasses.fields(ModelSection)}
        extra = {k: model.pop(k) for k in list(model) if k not in section_fields}
        if extra:
            model["overrides"] = {**extra, **model.get("overrides", {})}
        if model:
            loaded["model"] = model
        values = loaded
    for text in overrides:
        values = _merge(values, parse_override(text))
    return _from_dict(PretrainConfig, values)


def field_docs() -> dict[str, dict[str, str]]:
    """{section class: {field: its docstring}}, read from this file (the docstring under each field)."""
    import ast

    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(Path(__file__).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef):
            docs[node.name] = {
                a.target.id: " ".join(b.value.value.split()) for a, b in zip(node.body, node.body[1:])
                if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)}
    return docs


def commented_yaml(config: PretrainConfig) -> str:
    """The config as YAML (load_saved_config reads it back), each field under its documentation."""
    import textwrap

    docs = field_docs()

    def block(owner, indent: str) -> list[str]:
        lines = []
        for f in dataclasses.fields(owner):
            value = getattr(owner, f.name)
            doc = docs.get(type(owner).__name__, {}).get(f.name)
            if isinstance(owner, ModelSection) and f.name == "overrides":
                try:
                    resolved = build_model_config(config).to_dict()
                    doc = (f"{doc}; the model they give (fine_vocab_size and coarse_vocab_size come from the dataset "
                           "unless set here): "
                           + ", ".join(f"{k}={v}" for k, v in resolved.items()))
                except (ConfigError, ValueError):
                    pass
            if doc:
                lines += textwrap.wrap(doc, 100, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ",
                                       break_on_hyphens=False, break_long_words=False)
            if dataclasses.is_dataclass(value):
                lines += [f"{indent}{f.name}:", *block(value, indent + "  ")]
            else:
                dumped = yaml.safe_dump({f.name: value}, allow_unicode=True, sort_keys=False, default_flow_style=False, width=1000)
                lines += [indent + line for line in dumped.splitlines()]
        return lines

    return "\n".join(block(config, "")) + "\n"


def load_saved_config(path: str | os.PathLike) -> PretrainConfig:
    """Read back the config.yaml written with a run (or stored in a checkpoint)."""
    return _from_dict(PretrainConfig, _yaml_load(Path(path).read_text(encoding="utf-8")))


# ---------------------------------------------------------------------------------------------
# Model config resolution
# ---------------------------------------------------------------------------------------------
def build_model_config(config: PretrainConfig, dataset_meta: dict | None = None):
    """The ModelConfig of this run: recipe + overrides, vocab sizes taken from the dataset if unset."""
    from pipeline.model.config import ModelConfig, model_recipe

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(config.model.overrides) - names)
    if unknown:
        raise ConfigError(f"model.{unknown[0]}: not a ModelConfig field; known fields: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(ModelConfig)
    overrides = {k: _coerce(v, hints[k], f"model.{k}") for k, v in config.model.overrides.items()}
    if dataset_meta is not None:
        for side in ("fine", "coarse"):
            key = f"{side}_vocab_size"
            data_size = dataset_meta.get(key)
            if data_size is None:
                continue
            if key not in overrides:
                overrides[key] = int(data_size)
            elif int(overrides[key]) < int(data_size):
                raise ConfigError(
                    f"model.{key}={overrides[key]} is smaller than the dataset's {key}={data_size} "
                    f"({config.data.path}/meta.json); remove model.{key} to take it from the dataset"
                )
    try:
        model_config = model_recipe(config.model.recipe, **overrides)
    except KeyError as exc:
        raise ConfigError(f"model.recipe={config.model.recipe!r}: unknown recipe ({exc})") from None
    except ValueError as exc:
        if "recipe" in str(exc):
            raise ConfigError(f"model.recipe={config.model.recipe!r}: {exc}") from None
        raise ConfigError(f"model: {exc}") from None
    return model_config


# ---------------------------------------------------------------------------------------------
# Validation (no collective call, no allocation: safe to run on every rank first)
# ---------------------------------------------------------------------------------------------
def data_parallel_size(config: PretrainConfig, world_size: int) -> int:
    return world_size // config.parallelism.tensor_parallel


def global_batch_size(config: PretrainConfig, world_size: int) -> int:
    p = config.parallelism
    return p.micro_batch_size * p.gradient_accumulation_steps * data_parallel_size(config, world_size)


def batch_fix(config: PretrainConfig, world_size: int, target: int) -> str:
    """How to get a global batch of ``target`` samples at this world size: the accumulation steps
    (or a smaller micro-batch) to set, or why it cannot be had at this data-parallel size."""
    p, dp = config.parallelism, data_parallel_size(config, world_size)
    per_step = p.micro_batch_size * dp
    if target > 0 and target % per_step == 0:
        return f"set parallelism.gradient_accumulation_steps={target // per_step}"
    if target > 0 and target % dp == 0:  # fewer samples per rank: a smaller micro-batch
        per_rank = target // dp
        micro = max(d for d in range(1, min(per_rank, p.micro_batch_size) + 1) if per_rank % d == 0)
        return (f"set parallelism.micro_batch_size={micro} and parallelism.gradient_accumulation_steps="
                f"{per_rank // micro} ({per_rank} samples per data-parallel rank)")
    below, above = target // dp * dp, (target // dp + 1) * dp
    return (f"parallelism.global_batch_size must be a positive multiple of the data-parallel size {dp} "
            f"(e.g. {' or '.join(str(n) for n in (below, above) if n > 0)})")


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def validate_paths(config: PretrainConfig) -> None:
    """The checks of ``validate`` that look at this node's file system (which can differ between
    nodes): output and checkpoint directories that can be made and written, the DeepSpeed JSON and an
    explicit checkpoint to resume exist."""
    p, c = config.parallelism, config.checkpointing
    for what, where in (("output_dir", config.output_dir), ("checkpointing.dir", c.dir)):
        if not where:
            continue
        _need(not Path(where).exists() or Path(where).is_dir(), f"{what}={where} is an existing file: give a directory")
        base = _nearest_existing(Path(where))
        _need(base.is_dir(), f"{what}={where}: {base} is a file, so the directory cannot be made; give another path")
        _need(os.access(base, os.W_OK | os.X_OK),
              f"{what}={where}: {base} is not writable by this user, so nothing could be saved there; give a "
              f"writable directory")
        from pipeline.inference import kept_directory

        inside = kept_directory(where)
        _need(not inside, f"{what}={where} is (inside) {inside}: a training run does not belong there; give another "
                          f"directory")
    ds_path = resolve_path(p.deepspeed_config)
    _need(ds_path.is_file(), f"parallelism.deepspeed_config={p.deepspeed_config}: no such file (see ds_configs/README.md)")
    if c.resume not in ("", "auto"):
        _need(Path(c.resume).is_dir(), f"checkpointing.resume={c.resume}: no such checkpoint directory (use 'auto' or a step_* directory)")
    if c.init_from:
        _need(Path(c.init_from).is_dir(), f"checkpointing.init_from={c.init_from}: "
                                           f"{'a file, not a directory' if Path(c.init_from).is_file() else 'no such directory'} "
                                           f"(give an export of `python -m pipeline.convert export` or a complete step_* "
                                           f"checkpoint directory)")


def validate(config: PretrainConfig, world_size: int, dataset_meta: dict | None = None, model_config=None,
             paths: bool = True) -> None:
    """Raise ConfigError naming the first wrong field. ``model_config`` / ``dataset_meta`` enable the
    checks that need them (heads, vocab sizes, sequence length limit); ``paths``: also the file-system
    checks (``validate_paths``)."""
    p, d, s, o, c = config.parallelism, config.data, config.schedule, config.optimizer, config.checkpointing
    need = _need

    need(p.tensor_parallel >= 1, f"parallelism.tensor_parallel={p.tensor_parallel}: must be >= 1")
    need(
        world_size % p.tensor_parallel == 0,
        f"parallelism.tensor_parallel={p.tensor_parallel} does not divide the world size {world_size}; "
        f"launch a multiple of {p.tensor_parallel} processes or change parallelism.tensor_parallel",
    )
    need(p.micro_batch_size >= 1, f"parallelism.micro_batch_size={p.micro_batch_size}: must be >= 1")
    need(p.gradient_accumulation_steps >= 1, f"parallelism.gradient_accumulation_steps={p.gradient_accumulation_steps}: must be >= 1")
    dp = data_parallel_size(config, world_size)
    product = global_batch_size(config, world_size)
    need(
        p.global_batch_size in (0, product),
        f"parallelism.global_batch_size={p.global_batch_size} != micro_batch_size {p.micro_batch_size} x "
        f"gradient_accumulation_steps {p.gradient_accumulation_steps} x data-parallel size {dp} = {product}; "
        f"{batch_fix(config, world_size, p.global_batch_size)}, or set parallelism.global_batch_size=0",
    )
    need(math.isfinite(p.collective_timeout_minutes) and p.collective_timeout_minutes > 0,
         f"parallelism.collective_timeout_minutes={p.collective_timeout_minutes}: must be > 0")
    need(p.precision in ("fp32", "bf16", "fp16"), f"parallelism.precision={p.precision!r}: expected fp32, bf16 or fp16")
    need(d.seq_length >= 4, f"data.seq_length={d.seq_length}: must be >= 4 ([CLS] text [SEP])")
    need(
        d.coarse_seq_length == 0 or 3 <= d.coarse_seq_length <= d.seq_length,
        f"data.coarse_seq_length={d.coarse_seq_length}: 0 (from the packing) or between 3 and data.seq_length",
    )
    need(0.0 < d.mask_rate < 1.0, f"data.mask_rate={d.mask_rate}: must be in (0, 1) (0.15 BERT, 0.3 ModernBERT)")
    for name, value in (("mask_token_prob", d.mask_token_prob), ("random_token_prob", d.random_token_prob)):
        need(0.0 <= value <= 1.0, f"data.{name}={value}: must be in [0, 1] (BERT: 0.8 [MASK], 0.1 random)")
    need(
        d.mask_token_prob + d.random_token_prob <= 1.0,
        f"data.mask_token_prob + data.random_token_prob = {d.mask_token_prob + d.random_token_prob:g}: must be at most 1 "
        f"(the rest of the masked tokens stay as they are)",
    )
    need(d.num_workers >= 0, f"data.num_workers={d.num_workers}: must be >= 0")
    for i, entry in enumerate(d.blend):
        where = f"data.blend[{i}]"
        need(set(entry) == {"path", "weight"} and isinstance(entry.get("path"), str) and bool(entry["path"].strip()),
             f"{where}={entry!r}: expected {{path: DIR, weight: W}} (e.g. data.blend='[{{path: data/wiki, weight: 0.3}}]')")
        try:  # PyYAML reads 1e-4 (no dot) as a string
            weight = None if isinstance(entry["weight"], bool) else float(entry["weight"])
        except (TypeError, ValueError):
            weight = None
        need(weight is not None and math.isfinite(weight) and weight > 0,
             f"{where}.weight={entry['weight']!r}: must be a number > 0 (weights are relative to data.weight={d.weight})")
    if d.blend:
        need(math.isfinite(d.weight) and d.weight > 0, f"data.weight={d.weight}: must be > 0 (data.path's share of the blend)")
        weights = [d.weight] + [float(e["weight"]) for e in d.blend]
        smallest = min(range(len(weights)), key=weights.__getitem__)
        need(weights[smallest] * 10_000 >= sum(weights),
             f"{'data.weight' if smallest == 0 else f'data.blend[{smallest - 1}].weight'}={weights[smallest]}: below "
             f"1/10000 of the weights' total {sum(weights)}, its dataset would never be sampled; raise it or drop the dataset")
        paths = [resolve_path(d.path)] + [resolve_path(e["path"]) for e in d.blend]
        for i, path in enumerate(paths[1:]):
            need(path not in paths[: i + 1], f"data.blend[{i}].path={d.blend[i]['path']}: {path} is already in the blend "
                                             f"(data.path or an earlier entry); give each dataset once, with its total weight")
    need(d.valid_every >= 0, f"data.valid_every={d.valid_every}: must be >= 0 (0 = never evaluate)")
    need(d.valid_batches >= 1, f"data.valid_batches={d.valid_batches}: must be >= 1 (to skip evaluation, set "
                               f"data.valid_every=0)")
    need(o.name in ("adamw", "stable_adamw", "deepspeed_adamw"), f"optimizer.name={o.name!r}: expected adamw, stable_adamw or deepspeed_adamw")
    need(math.isfinite(o.lr) and o.lr > 0, f"optimizer.lr={o.lr}: must be a finite number > 0")
    need(config.seed >= 0, f"seed={config.seed}: must be >= 0 (numpy and torch seeds are non-negative)")
    need(bool(str(config.output_dir).strip()), "output_dir is empty: give a directory for config.yaml, logs and checkpoints")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optimizer.betas={o.betas}: two values in [0, 1)")
    need(math.isfinite(o.grad_clip) and o.grad_clip >= 0, f"optimizer.grad_clip={o.grad_clip}: must be a finite number >= 0 (0 = off)")
    need(math.isfinite(o.eps) and o.eps >= 0, f"optimizer.eps={o.eps}: must be a finite number >= 0 (1e-6 BERT)")
    need(math.isfinite(o.weight_decay) and o.weight_decay >= 0,
         f"optimizer.weight_decay={o.weight_decay}: must be a finite number >= 0 (0 = off)")
    need(config.logging.peak_flops >= 0, f"logging.peak_flops={config.logging.peak_flops}: must be >= 0 (0 = a guess)")
    need(s.train_steps >= 1, f"schedule.train_steps={s.train_steps}: must be >= 1")
    need(s.style in ("linear", "wsd"), f"schedule.style={s.style!r}: expected linear or wsd")
    need(0 <= s.warmup_steps <= s.train_steps, f"schedule.warmup_steps={s.warmup_steps}: must be in [0, schedule.train_steps]")
    need(0 <= s.decay_fraction <= 1, f"schedule.decay_fraction={s.decay_fraction}: must be in [0, 1]")
    need(0 <= s.min_lr_ratio <= 1, f"schedule.min_lr_ratio={s.min_lr_ratio}: must be in [0, 1]")
    need(s.stop_after >= 0 and s.stop_after_minutes >= 0, "schedule.stop_after / stop_after_minutes: must be >= 0 (0 = off)")
    need(c.keep_last >= 1, f"checkpointing.keep_last={c.keep_last}: must be >= 1")
    need(c.save_every >= 0, f"checkpointing.save_every={c.save_every}: must be >= 0")
    need(config.logging.every >= 1, f"logging.every={config.logging.every}: must be >= 1")
    window = parse_profile_steps(config.logging.profile_steps)
    parse_profile_ranks(config.logging.profile_ranks, world_size)
    need(window is None or window[0] <= s.train_steps,
         f"logging.profile_steps={config.logging.profile_steps!r}: after the run's last step (schedule.train_steps="
         f"{s.train_steps}); choose steps up to {s.train_steps}")
    if p.precision == "fp16" and not uses_gpu():
        need(False, "parallelism.precision=fp16: DeepSpeed has no fp16 on CPU; use fp32 (or bf16) here, fp16 on GPUs")
    if paths:
        validate_paths(config)

    if dataset_meta is not None and model_config is not None:
        for side in ("fine", "coarse"):
            key = f"{side}_vocab_size"
            data_size = dataset_meta.get(key)
            model_size = getattr(model_config, key)
            need(
                data_size is None or model_size >= int(data_size),
                f"model.{key}={model_size} is smaller than the dataset's {key}={data_size} "
                f"({d.path}/meta.json); remove model.{key} to take it from the dataset",
            )
    if model_config is not None:
        heads = model_config.num_attention_heads
        need(
            heads % p.tensor_parallel == 0,
            f"parallelism.tensor_parallel={p.tensor_parallel} does not divide model.num_attention_heads={heads}",
        )
        # The pre-training data has one text per sample and no sentence-order labels: the head would
        # be built, counted in the FLOPs and saved, but never trained.
        need(
            not model_config.sentence_order_head,
            "model.sentence_order_head=true: pre-training samples carry no NSP / sentence-order labels (MLM only, "
            "the AMBERT default), so the head would never be trained; remove model.sentence_order_head",
        )
        limit = model_config.max_position_embeddings
        need(
            d.seq_length <= limit,
            f"data.seq_length={d.seq_length} exceeds the model's limit model.max_position_embeddings={limit}; "
            f"lower data.seq_length or raise model.max_position_embeddings",
        )
        try:
            model_config.validate(p.tensor_parallel)
        except ValueError as exc:
            raise ConfigError(f"model: {exc}") from None


_PROFILE_STEPS = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """``"10-12"`` -> (10, 12), ``"7"`` -> (7, 7), ``""`` -> None (off). Steps count from 1 (the
    step numbers of the metrics)."""
    if not str(text).strip():
        return None
    match = _PROFILE_STEPS.match(str(text))
    if not match:
        raise ConfigError(
            f"logging.profile_steps={text!r}: expected a step or a range of steps, e.g. 10 or 10-12 (\"\" = off)")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if first < 1 or last < first:
        raise ConfigError(
            f"logging.profile_steps={text!r}: expected FIRST-LAST with 1 <= FIRST <= LAST, e.g. 10-12")
    return first, last


def parse_profile_ranks(text: str, world_size: int) -> frozenset[int]:
    """``"0"``, ``"0,8"`` or ``"all"``: the global ranks that record a trace."""
    if str(text).strip().lower() == "all":
        return frozenset(range(world_size))
    try:
        ranks = frozenset(int(r) for r in str(text).split(",") if r.strip())
    except ValueError:
        raise ConfigError(
            f"logging.profile_ranks={text!r}: expected global ranks separated by commas (e.g. 0 or 0,8) or all") from None
    outside = sorted(r for r in ranks if not 0 <= r < world_size)
    if not ranks or outside:
        raise ConfigError(
            f"logging.profile_ranks={text!r}: {'no rank given' if not ranks else f'rank {outside[0]} is not in this job'} "
            f"(ranks 0..{world_size - 1}); e.g. 0, 0,{world_size - 1} or all")
    return ranks


def uses_gpu() -> bool:
    """Whether this run computes on GPUs: a CUDA device is there and DeepSpeed's accelerator is not forced
    to the CPU (``DS_ACCELERATOR=cpu`` keeps a GPU node's job on the CPU, over gloo: then the RNG
    streams, memory buffers, precision checks and metrics must be the CPU's too)."""
    import torch

    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"


def read_deepspeed_config(path: str) -> dict:
    try:
        ds = json.loads(resolve_path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"parallelism.deepspeed_config={path}: not valid JSON ({exc}); fix the file or use one "
                          f"of ds_configs/") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"parallelism.deepspeed_config={path}: holds a JSON {type(ds).__name__}, not a DeepSpeed "
                          f"config object; see ds_configs/")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallelism.deepspeed_config={path}: zero_optimization.stage={stage!r}; expected 0, 1, "
                          f"2 or 3 (a mapping \"zero_optimization\": {{\"stage\": N, ...}})")
    _check_deepspeed_keys(ds, path)
    return ds


# Top-level DeepSpeed config sections that its constants module does not list.
_DEEPSPEED_SECTIONS = {
    "zero_optimization", "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor",
    "comet", "comms_logger", "aio", "elasticity", "pipeline", "compression_training", "data_efficiency",
    "curriculum_learning", "autotuning", "amp", "sparse_attention", "eigenvalue", "progressive_layer_drop",
    "quantize_training", "weight_quantization", "hybrid_engine", "nebula", "graph_harvesting", "fp32_allreduce",
    "sparse_gradients", "compile", "timers", "monitor_config", "optimizer", "scheduler",
}


def _check_deepspeed_keys(ds: dict, path: str) -> None:
    """DeepSpeed ignores a top-level key it does not know and fails late (inside zero.Init, after the
    data and model are set up) on a wrong key inside zero_optimization. Both are caught here: a
    top-level key that is a near miss of a known one ("zero_optimisation") and any key DeepSpeed's
    ZeRO config rejects, with its name and the closest valid one."""
    import difflib

    try:
        import deepspeed.runtime.constants as constants
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:  # no DeepSpeed here: it will say so itself
        return
    known = _DEEPSPEED_SECTIONS | {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}
    for key in ds:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
            if close:
                raise ConfigError(f"parallelism.deepspeed_config={path}: unknown key {key!r} (DeepSpeed would ignore "
                                  f"it silently); did you mean {close[0]!r}?")
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        import pydantic

        try:
            DeepSpeedZeroConfig(**zero)
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            name = ".".join(str(part) for part in error.get("loc", ())) or "?"
            fields = set(DeepSpeedZeroConfig.model_fields) | {
                f.alias for f in DeepSpeedZeroConfig.model_fields.values() if f.alias}
            close = difflib.get_close_matches(name, sorted(fields), n=1, cutoff=0.7)
            hint = f"; did you mean {close[0]!r}?" if close and close[0] != name else ""
            raise ConfigError(f"parallelism.deepspeed_config={path}: zero_optimization.{name}: {error.get('msg')}"
                              f"{hint} (see ds_configs/README.md)") from None


def deepspeed_config(config: PretrainConfig, world_size: int, override_path: str | None = None) -> dict:
    """The DeepSpeed config dict: the JSON file's ZeRO settings + this config's batch/precision/clipping.

    A key the JSON sets to a concrete value that disagrees with this config is an error (two
    sources of truth for the batch size is how runs silently train at the wrong batch size).
    """
    path = override_path or config.parallelism.deepspeed_config
    ds = read_deepspeed_config(path)
    p = config.parallelism
    offload = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if (isinstance(offload, dict) and str(offload.get("device", "none")).lower() in ("cpu", "nvme")
            and config.optimizer.name != "deepspeed_adamw" and ds.get("zero_force_ds_cpu_optimizer", True)):
        # DeepSpeed refuses a client optimizer with ZeRO-Offload, but only inside deepspeed.initialize,
        # after the model is built on every rank.
        raise ConfigError(
            f"parallelism.deepspeed_config={path} offloads the optimizer (zero_optimization.offload_optimizer.device="
            f"{offload.get('device')}), which DeepSpeed runs only with its own CPU Adam: set "
            f"optimizer.name=deepspeed_adamw (not {config.optimizer.name}), or put \"zero_force_ds_cpu_optimizer\": false "
            f"in the JSON to step {config.optimizer.name} on the CPU anyway (much slower)")
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if config.optimizer.name == "stable_adamw" and (stage or p.precision != "fp32"):
        # Its update clipping is per tensor; ZeRO (any stage) and DeepSpeed's bf16/fp16 optimizers
        # step flat partitions of many tensors (DeepSpeed asserts on it inside deepspeed.initialize).
        raise ConfigError(
            f"optimizer.name=stable_adamw clips each tensor's update by that tensor's own statistics, but with "
            f"{f'ZeRO stage {stage}' if stage else f'parallelism.precision={p.precision}'} DeepSpeed steps the "
            f"optimizer on flat partitions of many tensors (and refuses it inside deepspeed.initialize): use "
            f"optimizer.name=adamw, or stable_adamw without ZeRO in fp32 "
            f"(parallelism.deepspeed_config=ds_configs/zero0.json parallelism.precision=fp32)")
    wanted = {
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": p.gradient_accumulation_steps,
        "train_batch_size": global_batch_size(config, world_size),
        "gradient_clipping": config.optimizer.grad_clip,
    }
    for key, value in wanted.items():
        have = ds.get(key, "auto")
        if have != "auto" and have != value:
            raise ConfigError(
                f"deepspeed config sets {key}={have} but the run config gives {value}; set it in the run config "
                f"(parallelism.* / optimizer.grad_clip) and use \"auto\" in the JSON"
            )
        ds[key] = value
    for name in ("bf16", "fp16"):  # precision has one source, as the batch: a JSON that enables another is an error
        enabled = (ds.get(name) or {}).get("enabled", "auto") if isinstance(ds.get(name), dict) else "auto"
        if enabled not in ("auto", False) and p.precision != name:
            raise ConfigError(f"deepspeed config {path} enables {name} but the run config has parallelism.precision="
                              f"{p.precision}; set parallelism.precision={name} (precision is taken from the run config) "
                              f"and leave 'enabled' out of the JSON or set it to 'auto'")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": p.precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": p.precision == "fp16"}
    if p.precision != "fp16":
        ds["fp16"] = {"enabled": False}
    ds.setdefault("steps_per_print", 10**9)  # our own logger reports; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    if config.optimizer.name == "deepspeed_adamw":
        o = config.optimizer
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                       # no GPU: torch's Adam instead of JIT-compiling DeepSpeed's fused op (~80 s)
                       "torch_adam": not uses_gpu()},
        }
    return ds
