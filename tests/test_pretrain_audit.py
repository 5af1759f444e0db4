"""Pre-training metrics and settings a user reads as facts: what a variant reports, and the useful
work (tokens, FLOPs) behind tokens/s and MFU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import data as D
from pipeline.model import flops_per_sample, model_recipe
from pipeline.pretrain import metric_keys, micro_batch_work
from tests.test_data_loader import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]


def _batch(fine_lengths, coarse_widths, fine_length=32, coarse_length=24):
    """A collated batch of samples of the given real lengths (coarse token k covers coarse_widths[k] fine tokens)."""
    samples = []
    for i, widths in enumerate(coarse_widths):
        align = np.asarray(widths, dtype=np.int64)
        assert align.sum() == fine_lengths[i]
        raw = D.RawSample(np.full(int(align.sum()), 9), np.full(len(align), 9), align)
        samples.append(D.mask_sample(raw, D.mask_rng(0, 0, i), D.MaskingConfig(), 30, 30))
    return D.collate(samples, fine_length, coarse_length)


@pytest.mark.parametrize("variant", ["ambert", "ambert-hybrid", "bert-fine", "bert-coarse"])
def test_work_counts_real_tokens_of_the_sides_the_model_reads(variant):
    config = model_recipe("tiny", variant=variant)
    batch = _batch([4, 20], [[1, 3], [2] * 10])
    tokens, fine_masked, coarse_masked, flops = micro_batch_work(config, batch).tolist()
    fine_real = batch["fine_attention_mask"].sum(1).tolist()  # [6, 22]: [CLS] text [SEP]
    coarse_real = batch["coarse_attention_mask"].sum(1).tolist()  # [4, 12]
    masked = {g: (batch[f"{g}_labels"] >= 0).sum(1).tolist() for g in ("fine", "coarse")}
    uses = config.granularities
    assert tokens == ("fine" in uses) * sum(fine_real) + ("coarse" in uses) * sum(coarse_real)
    assert fine_masked == ("fine" in uses) * sum(masked["fine"])
    assert coarse_masked == ("coarse" in uses) * sum(masked["coarse"])
    expected = sum(
        flops_per_sample(config, fine_real[i], coarse_real[i], masked["fine"][i], masked["coarse"][i]) for i in range(2)
    )
    assert flops == pytest.approx(expected)
    # what was logged before: every sample at the padded lengths 32 / 24
    padded = 2 * flops_per_sample(config, 32, 24, sum(masked["fine"]) / 2, sum(masked["coarse"]) / 2)
    assert flops < 0.8 * padded


def test_single_granularity_baselines_report_only_their_side():
    assert metric_keys(model_recipe("tiny", variant="ambert")) == (
        "loss", "fine_loss", "coarse_loss", "fine_accuracy", "coarse_accuracy")
    assert metric_keys(model_recipe("tiny", variant="bert-fine")) == ("loss", "fine_loss", "fine_accuracy")
    assert metric_keys(model_recipe("tiny", variant="bert-coarse")) == ("loss", "coarse_loss", "coarse_accuracy")


def test_bert_fine_run_logs_no_coarse_loss(tmp_path):
    """One process, 2 steps: the train and valid records of a bert-fine run hold no coarse metric
    (they held coarse_loss 0.0 and coarse_accuracy 0.0: a 'perfect' loss in every plot)."""
    dataset = write_synthetic_dataset(tmp_path / "ds", num_docs=40)
    out = tmp_path / "run"
    from tests.test_pretrain import run_env

    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / "pretrain.py"), "model.recipe=tiny", "model.variant=bert-fine",
         "data.seq_length=32", "parallelism.micro_batch_size=4", "schedule.train_steps=2", "schedule.warmup_steps=1",
         "data.valid_every=2", "data.valid_batches=1", "data.num_workers=0", "logging.tensorboard=false",
         "checkpointing.save_at_end=false", "parallelism.deepspeed_config=ds_configs/zero1_cpu.json",
         f"data.path={dataset}", f"output_dir={out}"],
        cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (2, "valid")]
    for record in records:
        assert "fine_loss" in record and not any(k.startswith("coarse_") for k in record), record
    assert all(r["mfu"] > 0 and r["tokens"] > 0 for r in records[:2])


def _optimizer_groups(ds_config_path):
    from pipeline import parallel
    from pipeline.config import build_model_config, deepspeed_config, load_config
    from pipeline.pretrain import build_engine

    config = load_config(None, ["model.recipe=tiny", "optimizer.name=deepspeed_adamw",
                                f"parallelism.deepspeed_config={ds_config_path}"])
    parallel.initialize_parallel(1, seed=1)
    model_config = build_model_config(config, {"fine_vocab_size": 64, "coarse_vocab_size": 200})
    engine = build_engine(config, model_config, deepspeed_config(config, 1))
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return [group["weight_decay"] for group in inner.param_groups]


def test_deepspeed_adamw_does_not_decay_biases_and_norms():
    """optimizer.name=deepspeed_adamw got model.parameters(): ONE group, weight decay on every bias and
    norm weight, unlike adamw / stable_adamw (the documented rule: matrices only)."""
    from tests.distributed import run_distributed

    [groups] = run_distributed(_optimizer_groups, world_size=1, args=("ds_configs/zero1_cpu.json",), timeout=400,
                               init="deepspeed")
    assert groups == [0.01, 0.0]


def _parameter_groups_under_zero_init():
    """parameter_groups' split of the tiny model's parameters by name, built plainly and under
    deepspeed.zero.Init (ZeRO-3: every parameter is a 0-size partition there, its shape in ds_shape)."""
    import deepspeed

    from pipeline import parallel
    from pipeline.config import build_model_config, deepspeed_config, load_config
    from pipeline.model import build_model
    from pipeline.optim import parameter_groups

    config = load_config(None, ["model.recipe=tiny", "parallelism.deepspeed_config=ds_configs/zero3_cpu.json"])
    parallel.initialize_parallel(1, seed=1)
    model_config = build_model_config(config, {"fine_vocab_size": 64, "coarse_vocab_size": 200})
    split = []
    for zero3 in (False, True):
        with deepspeed.zero.Init(data_parallel_group=parallel.data_parallel_group(), mpu=parallel.DeepSpeedMPU(),
                                 config_dict_or_path=deepspeed_config(config, 1), enabled=zero3):
            model = build_model(model_config)
        names = {id(p): n for n, p in model.named_parameters()}
        split.append([(group["weight_decay"], sorted(names[id(p)] for p in group["params"]))
                      for group in parameter_groups(model, 0.01)])
        if zero3:
            assert all(p.numel() == 0 for p in model.parameters()), "not partitioned: the test would not test ds_shape"
    return split, {n: tuple(p.shape) for n, p in build_model(model_config).named_parameters()}


def test_parameter_groups_decay_matrices_only_also_under_zero3():
    """Weight decay on the matrices, none on biases and norm weights: the same split when the model
    is built partitioned (ZeRO-3, the default), where ``len(p.shape)`` would put everything in one group."""
    from tests.distributed import run_distributed

    [(split, shapes)] = run_distributed(_parameter_groups_under_zero_init, world_size=1, timeout=400, init="deepspeed")
    plain, zero3 = split
    assert plain == zero3
    (wd_decay, decay), (wd_none, none) = plain
    assert (wd_decay, wd_none) == (0.01, 0.0)
    assert decay and none and sorted(decay + none) == sorted(shapes)
    assert all(len(shapes[n]) >= 2 for n in decay) and all(len(shapes[n]) == 1 for n in none)
    assert any("bias" in n for n in none) and any("norm" in n.lower() for n in none), none


def test_resume_names_a_changed_pre_norm_and_tells_other_architecture_changes(tmp_path):
    """model.pre_norm changed on resume failed inside DeepSpeed's load, reported as 'one of its files is
    missing or damaged ... restore the files, or start a fresh run'; a changed local_window / rope_theta
    resumed silently under another attention pattern."""
    from pipeline.checkpoint import CheckpointError, changed_function_fields, check_compatible

    saved = model_recipe("tiny-modern").to_dict()
    marker = {"dataset_fingerprint": "f", "model_config": saved}
    with pytest.raises(CheckpointError, match="another model shape .*pre_norm: checkpoint True vs run False"):
        check_compatible(marker, "f", {**saved, "pre_norm": False}, tmp_path)
    longer = {**saved, "rope_theta": 160_000.0, "local_window": 16, "hidden_dropout": 0.1}
    check_compatible(marker, "f", longer, tmp_path)  # same shapes: allowed...
    # ...and told (dropout is a training setting, not the function of the weights)
    assert changed_function_fields(saved, longer) == {"local_window": (8, 16), "rope_theta": (10_000.0, 160_000.0)}
    assert changed_function_fields(saved, saved) == {}


class _Engine:
    """What evaluate needs of a DeepSpeed engine, around a plain model (TP=1)."""

    device = "cpu"

    def __init__(self, model):
        self.module = model

    def __call__(self, batch):
        return self.module(batch)


@pytest.fixture(scope="module")
def one_rank_group():
    from tests import distributed

    yield from distributed.one_rank_group()


@pytest.mark.parametrize("variant", ["ambert", "bert-coarse"])
def test_valid_loss_is_the_same_samples_and_value_at_any_layout(tmp_path, one_rank_group, variant):
    """The valid set was valid_batches micro-batches PER RANK (twice the samples at DP=2) and its loss a
    mean of micro-batch means: runs on other cluster sizes reported losses over other samples."""
    import torch

    from pipeline.config import load_config
    from pipeline.model import build_model
    from pipeline.pretrain import valid_metrics, valid_sums

    dataset = write_synthetic_dataset(tmp_path / "ds", num_docs=200)
    data = D.PretrainingData.open(str(dataset), 32, D.MaskingConfig(), seed=0)
    config = load_config(None, ["data.valid_batches=5", "parallelism.micro_batch_size=3"])
    torch.manual_seed(0)
    model = build_model(model_recipe("tiny", variant=variant, fine_vocab_size=64, coarse_vocab_size=200)).eval()
    engine = _Engine(model)
    granularities = model.config.granularities
    with torch.no_grad():
        results = {dp: valid_metrics(sum(valid_sums(engine, data, config, r, dp) for r in range(dp)), granularities)
                   for dp in (1, 2, 3)}
        # the reference: the first 5 x 3 valid samples in one batch, token-weighted by construction
        batch = D.collate([data.valid[p] for p in range(15)], data.fine_length, data.coarse_length)
        direct = model(batch)
    for dp in (2, 3):
        assert results[dp] == pytest.approx(results[1], rel=1e-5), dp
    for key in results[1]:
        assert results[1][key] == pytest.approx(float(direct[key]), rel=1e-5), key


def test_stable_adamw_is_refused_where_deepspeed_flattens_and_trains_without_zero(tmp_path, tmp_path_factory, monkeypatch):
    """optimizer.name=stable_adamw (and the modern-base recipe, which used it) crashed inside
    deepspeed.initialize with DeepSpeed's "untested ZeRO Optimizer" assertion: ZeRO and the bf16/fp16
    optimizers step flat partitions of many tensors, where its per-tensor clipping cannot be per
    tensor. Now: refused before any process group, naming the fix; it trains without ZeRO in fp32;
    the modern-base recipe (AdamW now) trains at ZeRO-3."""
    from pipeline import parallel, pretrain
    from pipeline.config import ConfigError
    from pipeline.metrics import read_metrics
    from tests.test_pretrain import BASE, assert_ok, get_dataset, launch, losses

    dataset = get_dataset(tmp_path_factory)
    monkeypatch.setattr(parallel, "startup_failed", lambda *a, **k: None)
    with pytest.raises(ConfigError, match="optimizer.name=stable_adamw clips each tensor's update") as info:
        pretrain.main([*BASE, f"data.path={dataset}", f"output_dir={tmp_path / 'refused'}", "optimizer.name=stable_adamw"])
    assert "ZeRO stage 3" in str(info.value) and "ds_configs/zero0.json" in str(info.value)
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()

    common = [f"data.path={dataset}", "schedule.train_steps=3", "schedule.warmup_steps=1", "data.num_workers=0"]
    code, output = launch([*common, f"output_dir={tmp_path / 'stable'}", "optimizer.name=stable_adamw",
                           "parallelism.deepspeed_config=ds_configs/zero0.json"], nproc=1, launcher="torchrun")
    assert_ok(code, output)
    stable = losses(tmp_path / "stable")
    assert sorted(stable) == [1, 2, 3] and all(np.isfinite(list(stable.values()))), stable
    assert stable[3] < stable[1] - 0.3, stable  # it updates the weights (9.6 -> 8.8 when written)

    # The modern recipe (GeGLU: fc1 holds [gate ; up], each TP rank a slice of both halves) at TP=2.
    # Its first checkpoint save raised ("partition_stride != 1"). Now the halves are merged on export
    # and universal conversion, and sliced again by init_from and by a universal load at TP=2:
    # - the export's weights, loaded at TP=2 (a tiny lr: they do not move), give the run's valid loss;
    # - the run's curve continues exactly through TP 2 -> 1 -> 2 (universal conversions).
    from pipeline.convert import export, to_universal

    modern = ["--config", "pipeline/recipes/modern-base.yaml", f"data.path={dataset}", "model.recipe=tiny-modern",
              "data.seq_length=64", "parallelism.micro_batch_size=2", "parallelism.precision=fp32",
              "parallelism.deepspeed_config=ds_configs/zero3_cpu.json", "data.num_workers=0", "model.hidden_dropout=0.0",
              "model.attention_dropout=0.0", "schedule.warmup_steps=1", "logging.every=1", "schedule.train_steps=5"]

    def run(name: str, tp: int, *extra: str) -> dict[int, float]:
        # the same global batch at every layout: TP=1 runs on 1 process, TP=2 on 2
        code, output = launch([*modern, f"output_dir={tmp_path / name}", f"parallelism.tensor_parallel={tp}", *extra],
                              nproc=tp, launcher="torchrun")
        assert_ok(code, output)
        return losses(tmp_path / name)

    reference = run("modern", 2, "data.valid_every=3", "checkpointing.save_every=3")
    trained = read_metrics(tmp_path / "modern", split="valid")[3]["loss"]
    exported = export(tmp_path / "modern" / "checkpoints" / "step_00000003", tmp_path / "modern_export")
    run("from_export", 2, "schedule.train_steps=1", "data.valid_every=1", "optimizer.lr=1e-30",
        f"checkpointing.init_from={exported}", "checkpointing.save_at_end=false")
    again = read_metrics(tmp_path / "from_export", split="valid")[1]["loss"]
    assert abs(again - trained) <= 1e-5 * abs(trained), (again, trained)

    to_universal(tmp_path / "modern" / "checkpoints" / "step_00000003", tmp_path / "universal_tp1")
    tp1 = run("continued_tp1", 1, "schedule.train_steps=4", f"checkpointing.dir={tmp_path / 'universal_tp1'}", "--resume", "auto")
    to_universal(tmp_path / "universal_tp1" / "step_00000004", tmp_path / "universal_tp2")
    tp2 = run("continued_tp2", 2, f"checkpointing.dir={tmp_path / 'universal_tp2'}", "checkpointing.save_at_end=false",
              "--resume", "auto")
    got = {**tp1, **tp2}
    assert sorted(got) == [4, 5], sorted(got)
    for step, value in got.items():  # the same sums in another order: ~1e-7 (halves sliced as one block: ~1e-5)
        assert abs(value - reference[step]) <= 1e-6 * abs(reference[step]), (step, value, reference[step])

def test_rng_states_are_restored_only_at_the_layout_they_were_saved_at():
    """A universal conversion continued at the same world size but another TP size (TP=1 x DP=2 ->
    TP=2 x DP=1) gave new rank k old rank k's RNG stream: the two TP ranks of one data-parallel group
    drew different dropout for replicated tensors, their LayerNorm weights drifted apart, and the next
    `convert export` failed inside DeepSpeed's merge. Such a resume re-seeds instead."""
    from pipeline.checkpoint import rng_state_for_rank

    client_state = {"rng_states": [{"rank": 0}, {"rank": 1}], "config": {"parallelism": {"tensor_parallel": 1}}}
    assert rng_state_for_rank(client_state, 1, 2, tensor_parallel=1) == {"rank": 1}  # same layout: exact resume
    assert rng_state_for_rank(client_state, 1, 2, tensor_parallel=2) is None  # same world, other TP: re-seed
    assert rng_state_for_rank(client_state, 1, 4, tensor_parallel=1) is None  # other world size
    assert rng_state_for_rank({"rng_states": [{}, {}]}, 0, 2, tensor_parallel=2) == {}  # no recorded layout: as before


def test_finished_check_refuses_a_config_training_would_refuse(tmp_path):
    """`pretrain.py --finished` (the job scripts' "requeue?" check) said "finished" (exit 0) for a
    command line that training refuses, when a checkpoint at schedule.train_steps existed: the
    config's own checks run first now (a ConfigError: exit 2 from the command line)."""
    from pipeline import pretrain
    from pipeline.config import ConfigError

    last = tmp_path / "checkpoints" / "step_00000010"
    last.mkdir(parents=True)
    (last / "COMPLETE").write_text("{}", encoding="utf-8")
    args = ["--finished", "--config", str(ROOT / "pipeline" / "recipes" / "demo.yaml"), f"output_dir={tmp_path}",
            "schedule.train_steps=10"]
    assert pretrain.main([*args, "schedule.warmup_steps=2"]) == 0
    assert pretrain.main([*args, "schedule.train_steps=11", "schedule.warmup_steps=2"]) == pretrain.STOPPED_EARLY
    with pytest.raises(ConfigError, match="schedule.warmup_steps=50"):
        pretrain.main([*args, "schedule.warmup_steps=50"])
    # The model's settings too (they said "finished" or "not finished"): checked on the recipe,
    # without the dataset, and without importing the model's megatron-core layers.
    import sys

    for override, message in (("model.variant=foo", "unknown variant 'foo'"), ("model.recipe=nope", "unknown model recipe"),
                              ("model.num_layers=abc", "expected an integer"),
                              ("data.seq_length=100000", "exceeds the model's limit"),
                              ("model.num_attention_heads=3", "not divisible by num_attention_heads=3")):
        with pytest.raises(ConfigError, match=message):
            pretrain.main([*args, "schedule.warmup_steps=2", override])
    # (in a process of its own: a test before this one may have loaded megatron-core into pytest's)
    probe = ("import sys; from pipeline import pretrain; code = pretrain.main(sys.argv[1:]); "
             "print(code, 'megatron.core' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe, *args, "schedule.warmup_steps=2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "0 False", proc.stdout + proc.stderr
    # logging.profile_ranks=all: the check ran out of memory (a set of 2^30 ranks for "all ranks")
    assert pretrain.main([*args, "schedule.warmup_steps=2", "logging.profile_steps=2", "logging.profile_ranks=all"]) == 0
    with pytest.raises(ConfigError, match="logging.profile_ranks='x'"):
        pretrain.main([*args, "schedule.warmup_steps=2", "logging.profile_steps=2", "logging.profile_ranks=x"])
    # A checkpoint of another model (the recipe changed, the output_dir not) is not "finished": training
    # would refuse it. Its vocabulary sizes are the dataset's, which the check does not read.
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import build_model_config, load_config

    tiny = build_model_config(load_config(str(ROOT / "pipeline" / "recipes" / "demo.yaml"), ["model.recipe=tiny"])).to_dict()
    (last / "COMPLETE").write_text(json.dumps({"model_config": {**tiny, "fine_vocab_size": 21128}}), encoding="utf-8")
    assert pretrain.main([*args, "schedule.warmup_steps=2", "model.recipe=tiny"]) == 0
    with pytest.raises(CheckpointError, match=r"has another model shape than this command line \(hidden_size: "
                                              r"checkpoint 64 vs command line 128.*another output_dir"):
        pretrain.main([*args, "schedule.warmup_steps=2", "model.recipe=tiny", "model.hidden_size=128"])
    (last / "COMPLETE").write_text("{}", encoding="utf-8")
    # The check runs without the job's layout: a global batch size of 8 ranks' worth (the bert-base
    # recipe's 256) is not refused there, nor on 8 data-parallel ranks; on 16 the fix is named.
    base = ["--config", str(ROOT / "pipeline" / "recipes" / "bert-base.yaml"), f"output_dir={tmp_path}"]
    assert pretrain.main(["--finished", *base, "schedule.train_steps=10", "schedule.warmup_steps=2"]) == 0
    from pipeline.config import load_config, validate

    validate(load_config(base[1], []), 8, paths=False)
    with pytest.raises(ConfigError, match=r"global_batch_size=256 .* set parallelism.micro_batch_size=16 and "
                                          r"parallelism.gradient_accumulation_steps=1"):
        validate(load_config(base[1], ["parallelism.tensor_parallel=2"]), 32, paths=False)


def test_console_line_shows_only_the_sides_the_variant_trains(tmp_path, caplog):
    """bert-fine / bert-coarse printed "coarse nan" / "fine nan" on every console step line."""
    import logging

    from pipeline.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, True, False, 10)
    with caplog.at_level(logging.INFO, logger="pretrain"):
        logger.log(1, {"loss": 1.5, "fine_loss": 1.5, "fine_accuracy": 0.5, "lr": 1e-3, "step_time": 0.1})
        logger.log(2, {"loss": 3.0, "fine_loss": 1.0, "coarse_loss": 2.0, "fine_accuracy": 0.5,
                       "coarse_accuracy": 0.25, "lr": 1e-3, "step_time": 0.1})
    logger.close()
    one, both = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert "nan" not in one and "| loss 1.5000 | acc fine 0.500 |" in one, one
    assert "| loss 3.0000 (fine 1.0000, coarse 2.0000) | acc fine 0.500 coarse 0.250 |" in both, both


def test_an_rng_state_of_another_device_kind_is_not_restored(monkeypatch):
    """A checkpoint saved on GPUs holds megatron's CUDA generator states (16 bytes each), one saved on CPU
    CPU generator states (5056 bytes): restoring one kind on the other raised in set_rng_state at the
    resume. rng_state_fits tells them apart, and the resume re-seeds instead."""
    import torch

    from pipeline import parallel

    cpu_state = torch.get_rng_state()

    class Tracker:
        def __init__(self, size):
            self.states = {"model-parallel-rng": torch.zeros(size, dtype=torch.uint8)}

        def get_states(self):
            return self.states

    monkeypatch.setattr(parallel, "rng_tracker", lambda: Tracker(cpu_state.numel()))  # this run: CPU
    assert parallel.rng_state_fits({"tracker": {"model-parallel-rng": cpu_state}})
    assert not parallel.rng_state_fits({"tracker": {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)}})
    assert not parallel.rng_state_fits({"tracker": {}})


def test_the_accelerator_follows_what_torch_can_use():
    """pretrain.py sets DeepSpeed's accelerator from torch.cuda.is_available(), not from /dev/nvidia0
    (absent in a Kubernetes pod given GPU 1, or under WSL2; present on a GPU node with a CPU build of
    torch): with torch seeing a GPU it is cuda, without it cpu; a DS_ACCELERATOR already set is kept."""
    import os

    def accelerator(cuda: bool, preset: str | None = None) -> str:
        env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
        if preset:
            env["DS_ACCELERATOR"] = preset
        code = (f"import torch; torch.cuda.is_available = lambda: {cuda}; import pipeline.pretrain, os; "
                f"print(os.environ['DS_ACCELERATOR'])")
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()

    assert accelerator(cuda=True) == "cuda"
    assert accelerator(cuda=False) == "cpu"
    assert accelerator(cuda=True, preset="cpu") == "cpu"


def test_a_resumed_run_logs_one_point_a_step_and_its_records_on_their_own_line(tmp_path):
    """After kill -9 + --resume: TensorBoard showed the replayed steps twice (1..27 then 21..40: the curve
    doubled back), and a metrics.jsonl line the kill had cut swallowed the resumed run's first record."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.metrics import MetricsLogger, read_metrics

    first = MetricsLogger(tmp_path, True, True, 10)
    for step in range(1, 8):  # checkpoint at 5, killed after logging 7
        first.log(step, {"loss": 10.0 - step, "step_time": 0.1})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 8, "split": "tra')  # the kill cut the last line
    resumed = MetricsLogger(tmp_path, True, True, 10, resumed_step=5)
    for step in range(6, 11):
        resumed.log(step, {"loss": 100.0 + step, "step_time": 0.1})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    points = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in points] == list(range(1, 11)), points
    assert dict(points)[6] == 106.0 and dict(points)[5] == 5.0
    lines = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines[-6] == '{"step": 8, "split": "tra' and json.loads(lines[-5])["step"] == 6
    train = read_metrics(tmp_path, split="train")
    assert sorted(train) == list(range(1, 11)) and train[8]["loss"] == 108.0


def test_an_evaluation_larger_than_the_valid_split_is_warned_about():
    """data.valid_batches x micro_batch_size beyond the valid split wrapped around into the same samples
    (other masks) without a word; the train split gets this warning at start-up."""
    from pipeline.config import load_config
    from pipeline.pretrain import valid_set_warning

    config = load_config(None, ["data.valid_batches=50", "parallelism.micro_batch_size=8", "data.valid_every=10"])
    assert valid_set_warning(config, 400) is None
    assert valid_set_warning(config, 30) == (
        "the valid split has 30 samples, fewer than an evaluation's data.valid_batches x micro_batch_size = 400: each "
        "evaluation repeats them (with other masks); set data.valid_batches=3 to use each once")
    config.data.valid_every = 0  # no evaluation: nothing to say
    assert valid_set_warning(config, 30) is None
