r"""AMBERT pre-training: DeepSpeed ZeRO (1/2/3) + megatron-core tensor parallelism, exact resume.

    deepspeed [--num_gpus N | --num_nodes N --hostfile H] pipeline/pretrain.py \
        [--config pipeline/recipes/X.yaml] [--deepspeed_config ds_configs/X.json] [--resume auto] [key=value ...]

The same script runs under torchrun, mpirun (MPI discovery) and srun. Without --config it runs the
demo recipe (pipeline/recipes/demo.yaml) on the Chinese demo dataset, building it first if missing.

The loop, top to bottom: config -> validate (no collective yet) -> rank 0 locks output_dir (a run
still going there refuses this one) -> distributed + TP groups -> data -> model under zero.Init ->
engine -> resume -> [train step -> log -> evaluate -> save] -> final save. Preemption (SIGTERM /
SIGUSR1) is noticed at the end of a step: every rank saves, then exits 0 so the scheduler can
requeue the job. Ctrl-C (SIGINT) does the same and exits 130; a second Ctrl-C stops at once, without
saving.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed pipeline/pretrain.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import warnings  # noqa: E402

# Import-time noise of the stack, once per rank: megatron-core without TransformerEngine/Apex (its
# local fallbacks are what we use) and DeepSpeed's calls to renamed torch.distributed functions.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

import torch
import torch.distributed as dist

# DeepSpeed's accelerator, before deepspeed is imported: the GPU exactly when torch can use one (as
# parallel.init_distributed picks NCCL), not when /dev/nvidia0 exists (a Kubernetes pod given GPU 1 sees
# only /dev/nvidia1; a CPU build of torch on a GPU node must run on the CPU). DS_ACCELERATOR=cpu forces it.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

from data_prep.format import META_FILE, FormatError, lock_holder
from pipeline import checkpoint as ckpt
from pipeline import skip_final_garbage_collection
from pipeline.batch import IGNORE_INDEX
from pipeline.config import (
    DEMO_DATASET,
    ROOT,
    ConfigError,
    PretrainConfig,
    batch_fix,
    build_model_config,
    commented_yaml,
    deepspeed_config,
    global_batch_size,
    load_config,
    parse_profile_ranks,
    parse_profile_steps,
    validate,
    validate_paths,
)
from pipeline.data import MaskingConfig, PretrainingData
from pipeline.metrics import MetricsLogger, default_peak_flops, memory_mb
from pipeline.profiling import StepProfiler
from pipeline.run_lock import LockHeld, RunLock

log = logging.getLogger("pretrain")
DEFAULT_RECIPE = ROOT / "pipeline" / "recipes" / "demo.yaml"


# ---------------------------------------------------------------------------------------------
# Command line and environment
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"recipe YAML (default: {DEFAULT_RECIPE.relative_to(ROOT)})")
    parser.add_argument("--deepspeed_config", help="DeepSpeed JSON (= parallelism.deepspeed_config=...)")
    parser.add_argument("--resume", help="'auto' or a checkpoint directory (= checkpointing.resume=...)")
    parser.add_argument("--finished", action="store_true",
                        help="do not train: exit 0 if the run this command line describes has a complete checkpoint "
                             "at schedule.train_steps, 3 if it stopped before (preemption, time limit: a job script "
                             "requeues or restarts it), 2 if its config is wrong (launchers/slurm.sbatch, kubernetes.yaml)")
    parser.add_argument("--print-config", action="store_true",
                        help="do not train: print the config this command line resolves to (recipe + overrides) as "
                             "YAML, each field under its documentation, and exit (2 if it is wrong); --config takes "
                             "the output back")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. schedule.train_steps=100")
    args = parser.parse_intermixed_args(argv)  # options may come between key=value overrides
    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"parallelism.deepspeed_config={args.deepspeed_config}")
    if args.resume:
        overrides.append(f"checkpointing.resume={args.resume}")
    return args, overrides


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as any launcher sets them, before torch.distributed exists."""
    def first(*names: str, default: int) -> int:
        for n in names:
            if n in os.environ:
                return int(os.environ[n])
        return default

    rank = first("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", default=0)
    world = first("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS", default=1)
    local = first("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", default=0)
    if "RANK" not in os.environ and "SLURM_STEP_ID" in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        # Started by srun (one task per GPU): torch.distributed's env:// rendezvous needs these.
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError(
                "started by srun without MASTER_ADDR: export MASTER_ADDR=$(scontrol show hostnames "
                "$SLURM_JOB_NODELIST | head -n 1) and MASTER_PORT in the batch script (see launchers/slurm.sbatch)"
            )
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        os.environ.setdefault("MASTER_PORT", "29500")
    elif "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" in os.environ and os.environ.get("MASTER_ADDR"):
        # Plain mpirun with MASTER_ADDR given (launchers/openmpi.sh gives its hostfile's first host):
        # torch's env:// rendezvous from Open MPI's variables. Without them DeepSpeed's MPI discovery
        # replaces MASTER_ADDR with the first address of rank 0's `hostname -I`, which other nodes may
        # not reach (a docker bridge, a management network): a hang at start-up.
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        os.environ.setdefault("MASTER_PORT", "29500")
    return rank, world, local


def data_order_settings(config: PretrainConfig) -> dict:
    """What fixes the training samples and their masks: recorded in each checkpoint's marker, so a
    resume that changes them is told (the position in the data is a sample count)."""
    d = config.data
    return {"data.seq_length": d.seq_length, "data.coarse_seq_length": d.coarse_seq_length, "seed": config.seed,
            "data.mask_rate": d.mask_rate, "data.mask_token_prob": d.mask_token_prob,
            "data.random_token_prob": d.random_token_prob,
            **blend_shares(config)}


def blend_shares(config: PretrainConfig) -> dict:
    """data.blend as each dataset's share of the samples (weights 7 and 3 are 0.7 and 0.3)."""
    weights = [config.data.weight if config.data.blend else 1.0] + [w for _, w in config.blend_dirs]
    shares = [round(w / sum(weights), 6) for w in weights]
    return {"data.weight": shares[0], "data.blend": [[str(p), s] for (p, _), s in zip(config.blend_dirs, shares[1:])]}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_settings(config: PretrainConfig, fingerprint: str, ds_config: dict, blend: list[dict] = ()) -> None:
    """Collective, right after the process group exists: every rank's resolved config, dataset and
    DeepSpeed config must equal rank 0's. Ranks started with other overrides (one node's job script
    edited, not the other's) would otherwise train inconsistently or wait for each other forever
    (different step counts). The dataset is compared by content (its fingerprint), not by path: the
    nodes may mount it in different places. On any difference every rank raises the same error."""
    from pipeline import parallel

    settings = {k: v for k, v in _flatten(config.to_dict()).items() if k not in ("data.path", "data.blend")}
    settings.update({"dataset (fingerprint)": fingerprint, **_flatten(ds_config, "deepspeed: ")})
    settings.update({f"data.blend[{i}] (weight, fingerprint)": [b["weight"], b["fingerprint"]] for i, b in enumerate(blend)})
    differences = parallel.settings_differing_from_rank0(settings)
    if differences:
        listed = "; ".join(f"rank {rank}: {name}={mine!r} (rank 0: {ours!r})" for name, rank, mine, ours in differences[:8])
        more = f"; and {len(differences) - 8} more" if len(differences) > 8 else ""
        raise ConfigError(f"the ranks were started with different settings: {listed}{more}; every rank must run the "
                          f"same recipe, overrides and dataset")


def check_dataset_dir(config: PretrainConfig, path: Path | None = None, field: str = "data.path", given: str = "") -> None:
    """data.path (or the ``field`` data.blend[i].path, ``given`` as ``path``) must be a finished dataset;
    a data_prep work directory or an interrupted build is named as such, with the command that finishes it."""
    if path is None:
        path, given = config.dataset_dir, config.data.path
    if (path / META_FILE).is_file():
        return
    unfinished = path.with_name(path.name.removesuffix(".partial"))
    if path.name.endswith(".partial") and (unfinished / META_FILE).is_file():  # the build finished meanwhile
        raise ConfigError(f"{field}={given}: {path} is not a dataset (the work directory of a data_prep "
                          f"build); the finished dataset is {unfinished}: point {field} at it")
    if unfinished.with_name(unfinished.name + ".partial").is_dir():
        raise ConfigError(
            f"{field}={given}: {path} is not a dataset but the work of an unfinished data_prep build "
            f"(the dataset appears as {unfinished} when it completes): finish it by running the same "
            f"`python data_prep/build.py ... --output {unfinished}` command again with --resume, then point {field} at {unfinished}"
        )
    if path.is_file() and (path.parent / META_FILE).is_file():  # .../meta.json or .../train_fine.bin
        raise ConfigError(f"{field}={given} is a file of the dataset {path.parent}: point {field} at "
                          f"that directory")
    raise ConfigError(
        f"{field}={given}: {path} is not a dataset (no {META_FILE}); build one with "
        f"`python data_prep/build.py --lang zh|en --output {path}` or point {field} at one"
    )


def ensure_demo_dataset(config: PretrainConfig, rank: int) -> None:
    """Build the demo dataset if it is the configured one and missing: rank 0 builds, the others
    wait for its meta.json (written last by the atomic build). No collective is involved."""
    path = config.dataset_dir
    if (path / META_FILE).is_file():
        return
    if config.data.path != DEMO_DATASET or not config.data.build_demo_if_missing:
        check_dataset_dir(config)
    failed = path.parent / f".{path.name}.build-failed"  # rank 0's message to the waiting ranks
    if rank == 0:
        try:
            if path.is_dir() and any(path.iterdir()):
                raise ConfigError(
                    f"data.path={config.data.path}: {path} exists but is not a complete dataset (no {META_FILE}), so "
                    f"the demo dataset cannot be built there: delete it (rm -rf {path}) and start again, or build "
                    f"it with `python data_prep/build.py --lang zh --output {path} --overwrite`"
                )
            log.info("building the demo dataset in %s (first run only)", path)
            path.parent.mkdir(parents=True, exist_ok=True)
            failed.unlink(missing_ok=True)
            # --resume: an interrupted build of it (DIR.partial) continues; none, and it starts afresh
            cmd = [sys.executable, str(ROOT / "data_prep" / "build.py"), "--lang", "zh", "--output", str(path), "--resume"]
            code = subprocess.run(cmd, cwd=ROOT).returncode
            if code != 0:
                raise ConfigError(
                    f"building the demo dataset {path} failed (data_prep exited with {code}; its message is above): "
                    f"fix that and start again, or build a dataset with `python data_prep/build.py` and point "
                    f"data.path at it")
        except ConfigError as exc:
            with contextlib.suppress(OSError):
                failed.write_text(str(exc), encoding="utf-8")
            raise
        return
    started = time.time()
    deadline = started + 3600
    while not (path / META_FILE).is_file():
        with contextlib.suppress(OSError):  # a marker older than this run is a previous run's
            if failed.stat().st_mtime >= started - 5:
                raise ConfigError(f"rank 0 could not build the demo dataset: {failed.read_text(encoding='utf-8')}")
        if time.time() > deadline:
            raise ConfigError(f"rank {rank}: gave up waiting an hour for rank 0 to build the demo dataset {path}; "
                              f"build it first with `python data_prep/build.py --lang zh --output {path}`")
        time.sleep(1)


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT; checked (and agreed on by all ranks) once per step.

    Ctrl-C reaches every rank of a run started from a terminal (and the launcher, which sends them
    SIGTERM): it used to raise KeyboardInterrupt mid-step, losing the steps since the last save. Now it
    is a preemption too; a second one on a rank raises KeyboardInterrupt there (stop without saving)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.interrupted = False  # a Ctrl-C (SIGINT) among the signals: the run exits 130, not 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)
        signal.signal(signal.SIGINT, self._interrupt)

    def _handler(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signum

    def _interrupt(self, signum, frame) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        self._handler(signum, frame)
        # not `log`: a handler must not take the logging lock the interrupted code may hold
        os.write(2, b"Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again: stop "
                    b"now, without saving)\n")

    def any_rank(self, job_start: float = 0.0, minutes_limit: float = 0.0) -> bool:
        """True on every rank if any rank got a signal or (minutes_limit > 0) ran out of time."""
        out_of_time = minutes_limit > 0 and time.time() - job_start >= 60 * minutes_limit
        from pipeline.parallel import collective_device

        flag = torch.tensor([1.0 if self.signal is not None or out_of_time else 0.0], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm is NaN or infinite: the weights are no longer usable."""


def check_finite(step: int, metrics: dict, grad_norm: float | None, checkpoint_dir: Path,
                 weights_finite: bool = True) -> None:
    """Raise TrainingDiverged if this step's loss (averaged over the data-parallel ranks, so every rank
    sees the same value) or global gradient norm is not finite, or (``weights_finite``: where the engine
    keeps no gradient norm, ZeRO stage 0 in fp32) a weight is. Nothing is saved after it."""
    losses = {k: v for k, v in metrics.items() if k == "loss" or k.endswith("_loss")}
    if (all(math.isfinite(v) for v in losses.values()) and (grad_norm is None or math.isfinite(grad_norm))
            and weights_finite):
        return
    values = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
    if grad_norm is not None:
        values += f", gradient norm {grad_norm:.4g}"
    if not weights_finite:
        values += ", non-finite weights"
    found = ckpt.complete_checkpoints(checkpoint_dir)
    if found:
        then = (f"The newest complete checkpoint is {found[-1][1]} (step {found[-1][0]}): {FIX_DIVERGENCE}, then run "
                f"again with --resume auto to continue from it")
    else:
        then = f"There is no complete checkpoint in {checkpoint_dir} yet: {FIX_DIVERGENCE}, then start again"
    raise TrainingDiverged(
        f"step {step}: training diverged ({values}); the run stops here, saving nothing from this step on. {then} "
        f"(optimizer.stop_on_nonfinite=false trains on regardless)")


FIX_DIVERGENCE = ("lower optimizer.lr, raise schedule.warmup_steps, keep optimizer.grad_clip on, or check the data "
                  "(python data_prep/build.py --verify DIR)")


def weights_are_finite(module: torch.nn.Module) -> bool:
    """Every parameter of this rank finite (one fused norm per device: NaN and inf propagate into it)."""
    params = [p.detach() for p in module.parameters() if p.numel()]
    if not params:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(params))).all())


def _nan_injection(step: int) -> bool:
    """Test hook: AMBERT_FAULT=nan_loss_at=<step> multiplies that step's loss by NaN before backward (on
    every rank), so the gradients, the weights and the reported loss become NaN as in a real divergence."""
    spec = os.environ.get("AMBERT_FAULT", "")
    return spec.startswith("nan_loss_at=") and step == int(spec.split("=", 1)[1])


def _step_fault_injection(step: int) -> None:
    """Test hooks: AMBERT_FAULT=sleep_per_step=<s> slows steps so a test can signal mid-run;
    AMBERT_FAULT=fail_rank0_at=<step> makes rank 0 fail with an ordinary exception after that step."""
    spec = os.environ.get("AMBERT_FAULT", "")
    if spec.startswith("sleep_per_step="):
        time.sleep(float(spec.split("=", 1)[1]))
    if spec.startswith("fail_rank0_at=") and step == int(spec.split("=", 1)[1]) and dist.get_rank() == 0:
        raise ValueError(f"injected failure at step {step} (AMBERT_FAULT)")


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
def build_engine(config: PretrainConfig, model_config, ds_config: dict, init_weights: dict | None = None):
    import deepspeed

    from pipeline.model import build_model
    from pipeline.optim import build_optimizer, build_scheduler, parameter_groups
    from pipeline.parallel import DeepSpeedMPU, data_parallel_group

    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    # ZeRO-3 must partition over the data-parallel group only: without it, TP ranks' shards get
    # mixed up and the model is silently wrong (ENVIRONMENT.md).
    with deepspeed.zero.Init(
        data_parallel_group=data_parallel_group(), mpu=DeepSpeedMPU(), config_dict_or_path=ds_config, enabled=stage == 3
    ):
        model = build_model(model_config)
    if init_weights is not None:  # before the engine: its optimizer copies start from them
        ckpt.copy_full_weights(model, init_weights)
    optimizer = build_optimizer(config, model)
    # DeepSpeed's own optimizer (optimizer.name=deepspeed_adamw) gets the same groups as ours: given
    # model.parameters() it put weight decay on the biases and norms too.
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=parameter_groups(model, config.optimizer.weight_decay) if optimizer is None else None,
        lr_scheduler=lambda opt: build_scheduler(config, opt),
        config=ds_config,
        mpu=DeepSpeedMPU(),
    )
    return engine


def metric_keys(model_config) -> tuple[str, ...]:
    """The losses and accuracies the model reports: a single-granularity baseline has none on the other
    side (a logged 0 there would read as a perfect loss in metrics.jsonl, TensorBoard and the plots)."""
    return metric_keys_of(model_config.granularities)


def metric_keys_of(granularities: tuple[str, ...]) -> tuple[str, ...]:
    return ("loss", *(f"{g}_loss" for g in granularities), *(f"{g}_accuracy" for g in granularities))


def micro_batch_work(model_config, batch) -> torch.Tensor:
    """[real tokens, masked fine, masked coarse, FLOPs] of one micro-batch, counting only the
    granularities the model reads (bert-fine never sees the coarse side) and each sample's real
    (non-padding) lengths: padding is no useful work, so MFU and tokens/s must not count it."""
    from pipeline.model import flops_per_sample

    rows = batch["fine_ids"].shape[0] if "fine_ids" in batch else batch["coarse_ids"].shape[0]
    lengths, masked = {}, {}
    for g in ("fine", "coarse"):
        if g in model_config.granularities:
            lengths[g] = batch[f"{g}_attention_mask"].sum(dim=1).tolist()
            masked[g] = (batch[f"{g}_labels"] != IGNORE_INDEX).sum(dim=1).tolist()
        else:
            lengths[g] = masked[g] = [0] * rows
    flops = sum(flops_per_sample(model_config, lengths["fine"][i], lengths["coarse"][i], masked["fine"][i],
                                 masked["coarse"][i]) for i in range(rows))
    return torch.tensor([sum(lengths["fine"]) + sum(lengths["coarse"]), sum(masked["fine"]), sum(masked["coarse"]),
                         flops], dtype=torch.float64)


def train_step(engine, batches, accumulation_steps: int, dp_group, poison: bool = False) -> dict:
    """One optimizer step over ``accumulation_steps`` micro-batches; metrics averaged over DP ranks,
    work (tokens, masked tokens, FLOPs) summed over them."""
    model_config = engine.module.config
    keys = metric_keys(model_config)
    totals = None  # summed on the model's device: no host sync per micro-batch (one, after the all-reduce)
    work = torch.zeros(4, dtype=torch.float64)
    for _ in range(accumulation_steps):
        cpu_batch = next(batches)
        work += micro_batch_work(model_config, cpu_batch)  # from the loader's CPU tensors: no device sync
        batch = {k: v.to(engine.device, non_blocking=True) for k, v in cpu_batch.items()}  # (pinned on GPU)
        out = engine(batch)
        if poison:  # _nan_injection
            out = {**out, "loss": out["loss"] * float("nan")}
            out.update({k: out[k] * float("nan") for k in keys if k.endswith("_loss")})
        engine.backward(out["loss"])
        engine.step()
        step_values = torch.stack([out[k].detach().reshape(()).to(torch.float64) for k in keys])
        totals = step_values if totals is None else totals + step_values
    from pipeline.parallel import collective_device

    device = collective_device()
    packed = torch.cat([(totals / accumulation_steps).to(device), work.to(device)])
    dist.all_reduce(packed, group=dp_group)
    values = packed.tolist()
    dp = dist.get_world_size(dp_group)
    metrics = {k: values[i] / dp for i, k in enumerate(keys)}
    tokens, fine_masked, coarse_masked, flops = values[len(keys):]
    metrics["tokens"] = tokens
    for g, count in (("fine", fine_masked), ("coarse", coarse_masked)):
        if g in model_config.granularities:
            metrics[f"{g}_masked"] = count
    metrics["flops"] = flops
    return metrics


def valid_set_warning(config: PretrainConfig, available: int) -> str | None:
    """An evaluation asks for more samples than the valid split has (it wraps around: the same samples
    again, with other masks), as the start-up warns for a train split smaller than a global batch."""
    wanted = config.data.valid_batches * config.parallelism.micro_batch_size
    if not config.data.valid_every or available >= wanted:
        return None
    return (f"the valid split has {available} samples, fewer than an evaluation's data.valid_batches x "
            f"micro_batch_size = {wanted}: each evaluation repeats them (with other masks); set data.valid_batches="
            f"{max(1, available // config.parallelism.micro_batch_size)} to use each once")


def valid_sums(engine, data: PretrainingData, config: PretrainConfig, dp_rank: int, dp_size: int) -> torch.Tensor:
    """This DP rank's share of one evaluation: per granularity of the model, [loss x predicted tokens,
    correct predictions, predicted tokens] over its rows of the valid set.

    The valid set is the first ``valid_batches x micro_batch_size`` valid positions, dealt out
    micro-batch by micro-batch like a training step; every rank runs the same number of forwards
    (ZeRO-3 gathers parameters over the DP group in each), rows past the set predict nothing. So the
    samples, their masks and the token-weighted result do not depend on the TP / DP layout."""
    micro_batch_size = config.parallelism.micro_batch_size
    set_size = config.data.valid_batches * micro_batch_size
    forwards = math.ceil(config.data.valid_batches / dp_size)
    granularities = engine.module.config.granularities
    sums = torch.zeros(3 * len(granularities), dtype=torch.float64)
    loader = data.loader("valid", 0, micro_batch_size, 1, dp_rank, dp_size, num_workers=0)
    for micro, batch in zip(range(forwards), loader):
        first = (micro * dp_size + dp_rank) * micro_batch_size
        beyond = torch.arange(first, first + micro_batch_size) >= set_size
        for g in granularities:
            batch[f"{g}_labels"][beyond] = IGNORE_INDEX
        out = engine({k: v.to(engine.device) for k, v in batch.items()})
        for i, g in enumerate(granularities):
            count = float(out[f"{g}_masked"])
            sums[3 * i: 3 * i + 3] += torch.tensor(
                [float(out[f"{g}_loss"]) * count, float(out[f"{g}_accuracy"]) * count, count], dtype=torch.float64)
    return sums


def valid_metrics(sums: torch.Tensor, granularities: tuple[str, ...]) -> dict:
    """The summed ``valid_sums`` of every DP rank -> token-weighted losses and accuracies."""
    metrics = {}
    for i, g in enumerate(granularities):
        loss_sum, correct, count = sums[3 * i: 3 * i + 3].tolist()
        metrics[f"{g}_loss"], metrics[f"{g}_accuracy"] = loss_sum / max(count, 1), correct / max(count, 1)
    metrics["loss"] = sum(metrics[f"{g}_loss"] for g in granularities)
    return {k: metrics[k] for k in metric_keys_of(granularities)}


@torch.no_grad()
def evaluate(engine, data: PretrainingData, config: PretrainConfig, dp_rank: int, dp_size: int, dp_group) -> dict:
    """Loss and accuracy on the same fixed valid samples every time, whatever the layout (valid_sums)."""
    engine.eval()
    from pipeline.parallel import collective_device

    sums = valid_sums(engine, data, config, dp_rank, dp_size).to(collective_device())
    engine.train()
    dist.all_reduce(sums, group=dp_group)
    return valid_metrics(sums.cpu(), engine.module.config.granularities)


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    # megatron-core's IndexedDataset logs every file it opens at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)


def log_to_file(output_dir: Path, rank: int) -> Path:
    """Everything this rank logs also goes to OUTPUT/logs/rank<k>.log (appended across resumes)."""
    path = output_dir / "logs" / f"rank{rank}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"output_dir={output_dir}: cannot write {path} ({exc.strerror}); give a writable "
                          f"directory") from None
    handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank}] %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.getLogger().addHandler(handler)
    return path


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def _startup_checks(config: PretrainConfig, rank: int, world_size: int):
    """What this rank checks on its own node before any process group: the dataset (built first if
    it is the missing demo), the model it implies, the DeepSpeed config, and the checkpoint to resume.
    Returns (dataset, model_config, ds_config, resume_path, resume_universal, init_weights, blend)."""
    ensure_demo_dataset(config, rank)
    check_dataset_dir(config)
    from data_prep.format import PairedDataset

    dataset = PairedDataset(config.dataset_dir)
    from data_prep.format import token_file_problems

    edited = token_file_problems(config.dataset_dir, dataset.meta)
    if edited:  # the ids would be trained under one vocabulary and exported with another
        raise FormatError(f"data.path={config.data.path}: {edited[0]}")
    blend = check_blend(config, dataset)
    model_config = build_model_config(config, dataset.meta)
    if config.model.activation_checkpointing:
        model_config.activation_checkpointing = True
    validate(config, world_size, dataset.meta, model_config)
    ds_config = deepspeed_config(config, world_size)
    resume_path = ckpt.find_resume_checkpoint(config.checkpoint_dir, config.checkpointing.resume)
    earlier = ckpt.complete_checkpoints(config.checkpoint_dir)
    if not config.checkpointing.resume and earlier:
        # A fresh run here would interleave its saves with the old ones (retention would delete the
        # new ones first) and a later --resume auto would pick the old run up again.
        raise ckpt.CheckpointError(
            f"{config.checkpoint_dir} holds checkpoints of an earlier run (newest {earlier[-1][1].name}): continue "
            f"it with --resume auto, or start a fresh run in another output_dir (or checkpointing.dir), or delete them")
    metrics = Path(config.output_dir) / "metrics.jsonl"
    if not config.checkpointing.resume and rank == 0 and metrics.is_file() and metrics.stat().st_size > 0:
        raise ConfigError(
            f"output_dir={config.output_dir} holds the metrics.jsonl of an earlier run (and no checkpoint to continue): "
            f"a fresh run there would mix its loss curve with the old one. Use another output_dir, or delete "
            f"{metrics} (and {Path(config.output_dir) / 'tensorboard'}) first")
    if config.checkpointing.resume == "auto" and resume_path is None and rank == 0:
        log.info("--resume auto: no complete checkpoint in %s, starting from step 0", config.checkpoint_dir)
    resume_universal = False
    if resume_path is not None:
        marker = ckpt.read_marker(resume_path)
        layout = {"tensor_parallel": config.parallelism.tensor_parallel,
                  "data_parallel": world_size // config.parallelism.tensor_parallel,
                  "zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0)}
        ckpt.check_compatible(marker, dataset.fingerprint, model_config.to_dict(), resume_path, layout)
        saved_order = marker.get("data_order")
        changed = {k: (saved_order[k], v) for k, v in data_order_settings(config).items()
                   if saved_order is not None and k in saved_order and saved_order[k] != v}
        if changed and rank == 0:
            log.warning(
                "resuming with other data settings than %s was saved with (%s): the samples are packed and masked "
                "anew for them and the %d samples consumed so far count as a position in the new order, so this "
                "run does not see the data an uninterrupted run would (fine for a deliberate change, e.g. a longer "
                "seq_length for the last phase)", resume_path.name,
                ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()), marker.get("consumed_samples", 0))
        saved_batch, batch = marker.get("global_batch_size"), global_batch_size(config, world_size)
        if saved_batch and saved_batch != batch and rank == 0:  # (checkpoints from before it was recorded: unknown)
            fix = batch_fix(config, world_size, saved_batch)
            keep = (f"to keep {saved_batch} on this job, {fix}; parallelism.global_batch_size={saved_batch} makes "
                    f"every later resume check it" if fix.startswith("set ") else
                    f"{saved_batch} cannot be kept at data-parallel size {layout['data_parallel']} (not a multiple of it)")
            log.warning(
                "resuming with a global batch of %d samples per step (micro_batch_size %d x gradient_accumulation_steps "
                "%d x data-parallel size %d); %s was trained with %d: the schedule goes on by steps, so each step left "
                "sees %s samples than the run was planned with (fine for a deliberate change): %s",
                batch, config.parallelism.micro_batch_size, config.parallelism.gradient_accumulation_steps,
                layout["data_parallel"], resume_path.name, saved_batch, "more" if batch > saved_batch else "fewer", keep)
        changed = ckpt.changed_function_fields(marker.get("model_config", {}), model_config.to_dict())
        if changed and rank == 0:
            log.warning(
                "resuming with other model settings than %s was saved with (%s): its weights continue under them, "
                "computing another function than they were trained for (fine for a deliberate change)",
                resume_path.name, ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        # A checkpoint converted by `python -m pipeline.convert universal` loads at any (TP, DP).
        resume_universal = bool(marker.get("universal"))
        if (resume_universal and marker.get("tensor_parallel") == 1 and config.parallelism.tensor_parallel > 1
                and marker.get("universal_format", 1) < 2):
            raise ckpt.CheckpointError(
                f"{resume_path} was converted from a TP=1 checkpoint by an older `pipeline.convert universal` "
                f"that cannot load at parallelism.tensor_parallel={config.parallelism.tensor_parallel}: convert "
                f"{marker.get('converted_from', 'the original checkpoint')} again (or continue at tensor_parallel=1)"
            )
        if resume_universal:
            ckpt.check_universal_stage(resume_path, marker, layout["zero_stage"])
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    init_weights = None
    if config.checkpointing.init_from:
        if resume_path is not None:
            if rank == 0:
                log.info("continuing from %s: checkpointing.init_from=%s is not used (it only starts a fresh run)",
                         resume_path, config.checkpointing.init_from)
        else:  # every rank reads them (a shared file system, as for the dataset): no broadcast of a whole model
            init_weights = ckpt.load_init_weights(config.checkpointing.init_from, dataset, model_config.to_dict())
    return dataset, model_config, ds_config, resume_path, resume_universal, init_weights, blend


def check_blend(config: PretrainConfig, dataset) -> list[dict]:
    """data.blend's datasets: each finished, undamaged and built with data.path's vocabularies (the
    same token ids for the same tokens). Returns {path, weight, fingerprint} for each."""
    from data_prep.format import PairedDataset, token_file_problems

    blend = []
    for i, (path, weight) in enumerate(config.blend_dirs):
        field, given = f"data.blend[{i}].path", config.data.blend[i]["path"]
        check_dataset_dir(config, path, field, given)
        other = PairedDataset(path)
        edited = token_file_problems(path, other.meta)
        if edited:
            raise FormatError(f"{field}={given}: {edited[0]}")
        for side in ("fine", "coarse"):
            theirs, ours = other.meta.get("language"), dataset.meta.get("language")
            if theirs and ours and theirs != ours:  # (rebuilding it with --vocab-from would be the wrong fix)
                raise ConfigError(
                    f"{field}={given} is a --lang {theirs} dataset and data.path={config.data.path} a --lang {ours} one: "
                    f"a blend mixes datasets of one language (their vocabularies give the token ids their meaning). "
                    f"Blend --lang {ours} datasets, or train on the --lang {theirs} one in its own run")
            if getattr(other, f"{side}_vocab").fingerprint() != getattr(dataset, f"{side}_vocab").fingerprint():
                raise ConfigError(
                    f"{field}={given}: its {side} vocabulary differs from data.path={config.data.path}'s: the same token "
                    f"ids would mean other tokens. Build its text again with data.path's vocabularies, into a new "
                    f"directory: `python data_prep/build.py --lang {dataset.meta.get('language', 'zh|en')} --input ... "
                    f"--output NEW_DIR --vocab-from {config.dataset_dir}`, and point {field} at NEW_DIR")
        same = [name for name, fp in [("data.path", dataset.fingerprint)] + [
            (f"data.blend[{j}].path", b["fingerprint"]) for j, b in enumerate(blend)] if fp == other.fingerprint]
        if same:
            raise ConfigError(f"{field}={given} is the same dataset as {same[0]} (a copy or another path to it): give "
                              f"each dataset once, with its total weight")
        blend.append({"path": str(path), "weight": weight, "fingerprint": other.fingerprint})
    return blend


STOPPED_EARLY = 3  # ``--finished``'s exit code for a run that has not reached its last step


def finished_status(config) -> int:
    """``--finished``: 0 if the run's newest complete checkpoint is at schedule.train_steps (the job
    scripts train with checkpointing.save_at_end=true), STOPPED_EARLY if not; prints which."""
    found = ckpt.complete_checkpoints(config.checkpoint_dir)
    step = found[-1][0] if found else 0
    saved = ckpt.read_marker(found[-1][1]).get("model_config") if found else None
    if saved:  # another model than this command line's: training would refuse it, so it is not "finished"
        model = build_model_config(config).to_dict()
        diffs = [f"{k}: checkpoint {saved.get(k)!r} vs command line {model.get(k)!r}" for k in ckpt.SHAPE_FIELDS
                 if not k.endswith("_vocab_size") and saved.get(k) != model.get(k)]  # (vocabularies: the dataset's)
        if diffs:
            raise ckpt.CheckpointError(
                f"{found[-1][1]} has another model shape than this command line ({'; '.join(diffs)}): it is another "
                f"run's. Use its model settings, or give this run another output_dir (or checkpointing.dir)")
    if step >= config.schedule.train_steps:
        print(f"finished: {config.checkpoint_dir} has a complete checkpoint at step {step} "
              f"(schedule.train_steps={config.schedule.train_steps})")
        return 0
    print(f"not finished: the newest complete checkpoint in {config.checkpoint_dir} is "
          f"{f'at step {step}' if found else 'none'} of schedule.train_steps={config.schedule.train_steps}")
    return STOPPED_EARLY


RUN_LOCK = ".pretrain.lock"  # in output_dir (and a checkpointing.dir outside it): held by a live run's rank 0


def lock_run_dirs(config: PretrainConfig, run_lock: RunLock) -> None:
    """Rank 0, before anything is written in output_dir: lock it, and checkpointing.dir if that is
    outside it, for the whole run (pipeline/run_lock.py). A live run holding either (a resubmitted job
    while the first still runs, ranks left running by a killed launcher) refuses this one: the two
    would write interleaved checkpoints and metrics into one place."""
    output_dir = Path(config.output_dir)
    where = [("output_dir", config.output_dir, output_dir)]
    if not config.checkpoint_dir.is_relative_to(output_dir.resolve()):
        where.append(("checkpointing.dir", config.checkpointing.dir, config.checkpoint_dir))
    for field, value, directory in where:
        try:
            run_lock.acquire(directory)
        except LockHeld as held:
            raise ConfigError(
                f"{field}={value} is in use by a pre-training run that is still running ({held.holder}; lock "
                f"{held.path}): a second run there would interleave its checkpoints and metrics with it. Wait for "
                f"it to finish or stop it, then start this job again with --resume auto (it continues from the "
                f"newest complete checkpoint), or give this run another {field}") from None
        except OSError as exc:
            raise ConfigError(f"{field}={value}: cannot make the lock file {run_lock.path(directory)} "
                              f"({exc.strerror}); give a writable directory") from None


def _leave_the_live_runs_logs(config: PretrainConfig, message: str) -> None:
    """A rank > 0 whose rank 0 was refused output_dir's lock: the logs/rank<k>.log it opened are the
    live run's, which must not get this job's error (it goes to the console only)."""
    path = Path(config.output_dir) / RUN_LOCK
    who = lock_holder(path)
    if who and f"({who}; lock {path})" in message:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
            handler.close()


_PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    run_lock = RunLock(RUN_LOCK)  # taken by rank 0 (lock_run_dirs)
    # The preemption handlers (PreemptionFlag) are this run's: an in-process caller (a notebook, a
    # sweep driver, the tests) gets its own back. Left installed, they made SIGTERM a no-op in the
    # caller and in every process it forked later (a multiprocessing pool's terminate() waited forever).
    handlers = {sig: signal.getsignal(sig) for sig in _PREEMPTION_SIGNALS}
    try:
        return _main(argv, run_lock)
    finally:
        run_lock.release()  # the process exit would too; an in-process caller may start another run
        _restore_signal_handlers(handlers)


def _restore_signal_handlers(handlers: dict) -> None:
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # (no handler could have been installed: PreemptionFlag would have raised)
    for sig, handler in handlers.items():
        if handler is not None:  # None: not installed from Python, nothing to put back
            signal.signal(sig, handler)


def _main(argv: list[str] | None, run_lock: RunLock) -> int:
    args, overrides = parse_args(argv)
    if args.finished or args.print_config:  # no process group, no logs
        config = load_config(args.config or DEFAULT_RECIPE, overrides)
        # the checks that need no world size, dataset or file system (a config training would refuse is
        # not "finished"); the world size is taken as one tensor-parallel group, whose batch arithmetic
        # says nothing of the job's (the bert-base recipe's global_batch_size=256 is 8 ranks' worth)
        layout_free = copy.deepcopy(config)
        layout_free.parallelism.global_batch_size = 0
        if str(config.logging.profile_ranks).strip().lower() != "all":  # ("all" would be a set of 2^30 ranks)
            parse_profile_ranks(config.logging.profile_ranks, 1 << 30)  # the syntax; the ranks are the job's
        layout_free.logging.profile_ranks = "0"
        validate(layout_free, max(1, config.parallelism.tensor_parallel), paths=False,
                 model_config=build_model_config(layout_free))
        if args.print_config:
            print(commented_yaml(config), end="")
            return 0
        return finished_status(config)
    rank, world_size, _ = launch_env()
    setup_logging(rank)
    # From the start: a SIGUSR1 / SIGTERM (time limit, preemption) during start-up (engine build,
    # checkpoint load) is kept and honoured after the first step (save, exit 0), instead of killing
    # the rank mid-load, which a requeue script would take for a failed run.
    preemption = PreemptionFlag()

    # 1. Config, validated on every rank before any collective call or allocation. A mistake in the
    #    command line or recipe is the same on every rank: each stops here, no process group needed.
    try:
        config = load_config(args.config or DEFAULT_RECIPE, overrides)
        validate(config, world_size, paths=False)
    except ConfigError as exc:
        if launch_env()[2] != 0:  # the same line on every rank of a node: printed once, by its local rank 0
            raise SameOnEveryRank(str(exc)) from None
        raise
    timeout = config.parallelism.collective_timeout_minutes
    try:
        validate_paths(config)
        if rank == 0:  # first: a refused run leaves the live one's files as they are (logs included)
            lock_run_dirs(config, run_lock)
        log_to_file(Path(config.output_dir), rank)
        state = _startup_checks(config, rank, world_size)
    except (ConfigError, ckpt.CheckpointError, FormatError) as exc:
        # What this rank finds on its node (dataset, checkpoints) may differ from its peers': they
        # would wait for it in init_distributed until the collective timeout. Tell them first.
        from pipeline import parallel

        parallel.startup_failed(exc, world_size, min(timeout, parallel.STARTUP_JOIN_MINUTES))
        raise
    dataset, model_config, ds_config, resume_path, resume_universal, init_weights, blend = state
    # Lineage, in every checkpoint's marker (and an export's training.json): the weights this run
    # started from (None: a random initialisation), carried over when it is continued.
    if resume_path is not None:
        started_from = ckpt.read_marker(resume_path).get("started_from")
    else:
        started_from = ckpt.describe_origin(config.checkpointing.init_from) if init_weights is not None else None

    # 2. Processes and parallel groups.
    from pipeline import parallel

    # init_distributed first warns on stderr (local rank 0) about a lock left by a killed JIT build of
    # DeepSpeed's CPU op, on which every later start would wait forever (parallel.warn_deepspeed_build_lock).
    parallel.init_distributed(timeout_minutes=timeout)  # + the release of DeepSpeed's CPU shared-memory names
    try:
        parallel.agree_on_startup()  # a peer that failed its own start-up checks stops this rank too
    except parallel.PeerStartupError as exc:
        if rank != 0:
            _leave_the_live_runs_logs(config, str(exc))
        raise ConfigError(str(exc)) from None
    check_same_settings(config, dataset.fingerprint, ds_config, blend)
    parallel.initialize_parallel(config.parallelism.tensor_parallel, seed=config.seed, timeout_minutes=timeout)
    slow_bf16 = bf16_emulated(config.parallelism.precision)
    if slow_bf16 and rank == 0:
        log.warning(slow_bf16)
    dp_rank, dp_size, dp_group = parallel.data_parallel_rank(), parallel.data_parallel_size(), parallel.data_parallel_group()
    output_dir = Path(config.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
        log.info("config (saved to %s):\n%s", output_dir / "config.yaml", config.to_yaml())
        log.info("model: %s", model_config.to_dict())

    # 3. Data: every rank builds the same small sample index from sentence lengths (no barrier).
    masking = MaskingConfig(config.data.mask_rate, config.data.mask_token_prob, config.data.random_token_prob)
    data = PretrainingData.open(
        str(config.dataset_dir), config.data.seq_length, masking, config.seed,
        coarse_length=config.data.coarse_seq_length, with_valid=config.data.valid_every > 0,
        blend=[(b["path"], b["weight"]) for b in blend], weight=config.data.weight,
    )
    log.info(
        "data: %d train samples, fine length %d, coarse length %d (%s)",
        len(data.train), data.fine_length, data.coarse_length, config.dataset_dir,
    )
    if blend:
        log.info("data: a blend, shares of the train samples: %s", ", ".join(
            f"{share:.4f} {path} ({len(part)} samples)" for share, path, part
            in zip(data.train.shares, [str(config.dataset_dir)] + [b["path"] for b in blend], data.train.parts)))
    global_samples = config.parallelism.micro_batch_size * config.parallelism.gradient_accumulation_steps * (
        world_size // config.parallelism.tensor_parallel)
    if len(data.train) < global_samples and rank == 0:
        log.warning("the train split has %d samples, fewer than one global batch (%d): every step repeats them "
                    "(use a larger dataset or a smaller batch)", len(data.train), global_samples)
    small_valid = valid_set_warning(config, len(data.valid)) if data.valid is not None else None  # (not opened: no evaluation)
    if small_valid and rank == 0:
        log.warning(small_valid)

    # 4. Model, optimizer, schedule, engine.
    engine = build_engine(config, model_config, ds_config, init_weights)
    if init_weights is not None:
        log.info("initialised the model from checkpointing.init_from=%s (%d tensors); a fresh optimizer state and "
                 "schedule from step 0", config.checkpointing.init_from, len(init_weights))
        init_weights = None  # a full fp32 copy of the model: not kept for the whole run

    # 5. Resume: engine state from DeepSpeed, the rest (data position, RNG) from client_state.
    step, consumed_samples = 0, 0
    consumed_flops: float | None = 0.0  # training FLOPs so far (real lengths, every rank); None: unknown
    if resume_path is not None:
        if resume_universal:
            from pipeline.convert import prepare_universal_load

            prepare_universal_load(engine.module)
        # DeepSpeed's ZeRO-3 universal load copies param group 0's hyperparameters onto every group
        # (our no-decay group would get weight decay): keep ours.
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        group_settings = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in inner.param_groups]
        client_state = ckpt.load(engine, resume_path)
        if resume_universal:
            for group, settings in zip(inner.param_groups, group_settings):
                group.update(settings)
            # ...and it gives every group's state the SAME `step` tensor, which torch's Adam then
            # increments once per group and step (wrong bias correction): give each its own.
            for state in inner.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
        step, consumed_samples = int(client_state["step"]), int(client_state["consumed_samples"])
        consumed_flops = client_state.get("consumed_flops")  # checkpoints from before this count have none
        log.info("resumed from %s at step %d (%d samples consumed)", resume_path, step, consumed_samples)

    p = config.parallelism
    global_batch = p.micro_batch_size * p.gradient_accumulation_steps * dp_size
    loader = data.loader("train", consumed_samples, p.micro_batch_size, p.gradient_accumulation_steps, dp_rank, dp_size, config.data.num_workers)

    peak_flops = config.logging.peak_flops or default_peak_flops(p.precision)
    metrics_log = MetricsLogger(output_dir, rank == 0, config.logging.tensorboard, config.schedule.train_steps,
                                resumed_step=step if resume_path else None)

    def save(reason: str) -> None:
        client_state = {
            "step": step,
            "consumed_samples": consumed_samples,
            "consumed_flops": consumed_flops,
            "rng_states": ckpt.gather_rng_states(parallel.rng_state()),
            "config": config.to_dict(),
            "model_config": model_config.to_dict(),
            "dataset_fingerprint": dataset.fingerprint,
            "universal_checkpoint_info": universal_checkpoint_info(engine.module),
        }
        marker = {
            "reason": reason,
            "consumed_samples": consumed_samples,
            "consumed_flops": consumed_flops,
            "dataset_path": str(config.dataset_dir),
            "dataset_fingerprint": dataset.fingerprint,
            **({"data_blend": [{"path": str(config.dataset_dir), "weight": config.data.weight,
                                "fingerprint": dataset.fingerprint}, *blend]} if blend else {}),
            # the token ids' meaning, checked by a later run's checkpointing.init_from even after the
            # dataset at dataset_path was rebuilt (the dataset fingerprint also covers the text)
            "vocab_fingerprints": ckpt.vocab_fingerprints(dataset),
            "model_config": model_config.to_dict(),
            "tensor_parallel": p.tensor_parallel,
            "data_parallel": dp_size,
            "global_batch_size": global_batch,
            "world_size": dist.get_world_size(),
            "zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0),
            "data_order": data_order_settings(config),
            "started_from": started_from,
        }
        ckpt.save(engine, config.checkpoint_dir, step, client_state, marker, config.checkpointing.keep_last)

    # RNG state last, right before the loop: anything above may draw random numbers.
    if resume_path is not None:
        state = ckpt.rng_state_for_rank(client_state, dist.get_rank(), dist.get_world_size(), p.tensor_parallel)
        if state is not None and not parallel.rng_state_fits(state):
            if rank == 0:  # (every rank's alike: said once)
                log.warning("the checkpoint's RNG state was saved on another kind of device (CPU vs GPU)")
            state = None
        if state is not None:
            parallel.set_rng_state(state)
        else:  # another layout (a converted checkpoint): fresh, but distinct, dropout streams
            if rank == 0:
                log.warning("checkpoint has no RNG state for this layout: re-seeding dropout")
            parallel.set_seed(config.seed + step)

    # 6. Train.
    if step >= config.schedule.train_steps and rank == 0:
        log.warning("resumed at step %d, already >= schedule.train_steps=%d: nothing to train (raise "
                    "schedule.train_steps to continue)", step, config.schedule.train_steps)
    engine.train()
    job_start, job_first_step = time.time(), step
    profiler = StepProfiler(parse_profile_steps(config.logging.profile_steps),
                            rank in parse_profile_ranks(config.logging.profile_ranks, world_size), output_dir, rank)
    # The loader's workers start here, right before the loop whose `finally` stops them: an error
    # between the two left the rank waiting for its live workers at exit, forever.
    batches = iter(loader)
    try:
        while step < config.schedule.train_steps:
            start = time.perf_counter()
            lr = engine.get_lr()[0]
            with profiler.step(step + 1):
                metrics = train_step(engine, batches, p.gradient_accumulation_steps, dp_group, _nan_injection(step + 1))
            step += 1
            if config.optimizer.stop_on_nonfinite:
                norm = engine.get_global_grad_norm() if p.precision != "fp16" else None
                weights_finite = True
                if norm is None and p.precision != "fp16":
                    # No norm kept (ZeRO stage 0 in fp32 clips without keeping it): an inf gradient with a
                    # finite loss would reach the weights, and the next save, unseen. Check the weights,
                    # all ranks together (tensor-parallel ranks hold other slices).
                    flag = torch.tensor([0.0 if weights_are_finite(engine.module) else 1.0], device=parallel.collective_device())
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    weights_finite = not flag.item()
                check_finite(step, metrics, None if norm is None else float(norm), config.checkpoint_dir, weights_finite)
            consumed_samples += global_batch
            if consumed_flops is not None:
                consumed_flops += metrics["flops"]
            step_time = time.perf_counter() - start
            _step_fault_injection(step)

            if step % config.logging.every == 0 or step == config.schedule.train_steps:
                flops = metrics.pop("flops")
                grad_norm = engine.get_global_grad_norm()
                metrics.update(
                    lr=lr,
                    grad_norm=float(grad_norm) if grad_norm is not None else 0.0,
                    step_time=step_time,
                    tokens_per_s=metrics["tokens"] / step_time,
                    samples_per_s=global_batch / step_time,
                    mfu=flops / step_time / (dist.get_world_size() * peak_flops),
                    memory_mb=memory_mb(),
                    consumed_samples=consumed_samples,
                    **({} if consumed_flops is None else {"consumed_flops": consumed_flops}),
                )
                metrics_log.log(step, metrics)
            if config.data.valid_every and step % config.data.valid_every == 0:
                metrics_log.log(step, evaluate(engine, data, config, dp_rank, dp_size, dp_group), split="valid")
            profiler.close_if_done()

            if preemption.any_rank(job_start, config.schedule.stop_after_minutes):
                if rank == 0:  # every rank saves; one line says so
                    log.warning("preemption signal or job time limit: saving at step %d, then exiting", step)
                save("preemption")
                break
            if config.schedule.stop_after and step - job_first_step >= config.schedule.stop_after:
                log.info("schedule.stop_after=%d steps reached: saving at step %d, then exiting", config.schedule.stop_after, step)
                save("stop_after")
                break
            if config.checkpointing.save_every and step % config.checkpointing.save_every == 0:
                save("periodic")
            elif step == config.schedule.train_steps and config.checkpointing.save_at_end:
                save("end")

    finally:
        profiler.close()
        stop_loader_workers(batches)

    metrics_log.close()
    log.info("done at step %d", step)
    dist.barrier()
    parallel.shutdown_distributed()
    if preemption.interrupted:
        if rank == 0:
            log.warning("stopped by Ctrl-C after saving step %d: the same command with --resume auto continues from it", step)
        return 130
    return 0


def stop_loader_workers(batches) -> None:
    """Stop a DataLoader iterator's workers now, on every way out of the loop. They ignore SIGTERM
    (preemption signals are the rank's), so if an exception kept the iterator alive until exit,
    multiprocessing's exit handler would SIGTERM them and then wait for them forever."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own clean shutdown (sentinel, join)
    if shutdown is not None:
        shutdown()


def universal_checkpoint_info(module: torch.nn.Module) -> dict:
    """What DeepSpeed's universal-checkpoint conversion needs to merge tensor-parallel shards
    correctly: which parameters are replicated, and along which dim the others are split.
    (Without it, ds_to_universal concatenates replicated LayerNorm weights across TP ranks.)"""
    from pipeline.convert import universal_checkpoint_info as info

    return info(module)


def _exit_job(code: int) -> None:
    """Exit with ``code`` after an error this rank has printed. Under plain `mpirun` (mpi4py up, more
    than one rank) a normal exit would sit in MPI_Finalize, which mpi4py calls at exit and which
    waits for the other ranks, while they wait for this one in a collective: abort the MPI job
    instead, so mpirun ends every rank now with this code."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.Get_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        mpi.COMM_WORLD.Abort(code)
    parallel = sys.modules.get("pipeline.parallel")
    if parallel is not None and parallel.startup_stopped and torch.distributed.is_initialized():
        # Every rank learned at start-up that the job stops (``parallel.agree_on_startup``), before it
        # wrote anything but logs: leave without the interpreter's teardown. Destroying the live gloo
        # process group there (its threads never joined) aborted a rank now and then ("terminate called
        # without an active exception": 3 runs in 12 on a loaded machine), and the launcher reported
        # SIGABRT instead of this exit code.
        logging.shutdown()  # (flushes and closes the log files)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def bf16_emulated(precision: str) -> str | None:
    """A warning when bf16 runs on a GPU without bf16 units (before Ampere: V100, T4): torch counts its
    emulation as support, so DeepSpeed accepts it and the run is many times slower than in fp16."""
    from pipeline.config import uses_gpu

    if precision != "bf16" or not uses_gpu():
        return None
    major, minor = torch.cuda.get_device_capability()
    if major >= 8:
        return None
    return (f"parallelism.precision=bf16 on {torch.cuda.get_device_name()} (compute capability {major}.{minor}): "
            f"GPUs before Ampere have no bf16 units and emulate it, many times slower; use "
            f"parallelism.precision=fp16 on them")


class SameOnEveryRank(ConfigError):
    """A command-line or recipe error, found alike by every rank before any process group: only each
    node's local rank 0 prints it (a line per rank said the same thing 8 or 64 times)."""


def report_error(message: str) -> None:
    """A stopping error: on stderr, and in this rank's log file; on the console's log lines too (with
    the rank in front) only when several ranks share the console, where it says whose error it is."""
    log = logging.getLogger("pretrain")
    parallel = sys.modules.get("pipeline.parallel")
    if parallel is not None and parallel.startup_error_logged == message:
        # logged (console and log file) when it was found; a lower rank with the same error prints the line
        if parallel.startup_error_same_as_rank is None:
            print(f"error: {message}", file=sys.stderr)
        return
    if launch_env()[1] > 1:
        log.error("%s", message)
    else:  # one process: the stderr line alone (the same message twice read as two errors)
        log_to_file_only(message)
    print(f"error: {message}", file=sys.stderr)


def log_to_file_only(message: str) -> None:
    """An error line in this rank's log file (logs/rank<k>.log), not on the console."""
    log = logging.getLogger("pretrain")
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


if __name__ == "__main__":
    skip_final_garbage_collection()
    try:
        sys.exit(main())
    except SameOnEveryRank:
        time.sleep(1.0)  # the node's local rank 0 prints it first (a launcher stops the others when one exits)
        _exit_job(2)
    except (ConfigError, ckpt.CheckpointError, FormatError) as exc:
        message = str(exc).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: its message is the last line
            message = message.splitlines()[-1].split(": ", 1)[-1]
        report_error(message)
        _exit_job(2)
    except TrainingDiverged as exc:  # every rank sees the same averaged values: one error line, rank 0's
        if launch_env()[0] == 0:
            report_error(str(exc))
        else:
            log_to_file_only(f"error: {exc}")
        _exit_job(1)
    except RuntimeError as exc:  # torch.distributed's errors when a peer stops answering
        text = str(exc)
        if "Timed out" in text or "timed out" in text:
            cause = "another rank stopped answering for parallelism.collective_timeout_minutes (hung, or its node is gone)"
        elif "Connection closed by peer" in text or "Connection reset by peer" in text:
            cause = "another rank died"
        elif "EADDRINUSE" in text or "address already in use" in text.lower():
            message = (f"the rendezvous port MASTER_PORT={os.environ.get('MASTER_PORT', '29500')} is in use (another job "
                       f"on this host?): start again with a free port (export MASTER_PORT=..., or the launcher's "
                       f"--master_port / --master-port)")
            report_error(message)
            _exit_job(2)
        else:
            raise
        message = (f"{cause}; its own log (OUTPUT/logs/rank<k>.log) says why. Once that is fixed, rerun the job with "
                   f"--resume auto to continue from the newest complete checkpoint. ({text.strip().splitlines()[-1]})")
        report_error(message)
        _exit_job(1)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now (the first one asks for a save at the end of the step)
        report_error("stopped by a second Ctrl-C, without saving: --resume auto continues from the newest complete "
                     "checkpoint")
        _exit_job(130)
