"""End-to-end pre-training through the real `deepspeed` launcher on gloo (CPU).

Launches are the expensive part (~20 s each on 2 loaded cores), so they are shared: one 20-step
ZeRO-3 reference run (dropout on) serves the loss-falls check here and the exact-resume and
multi-node checks in test_resume.py / test_launchers.py; the (TP, DP) layout runs also provide the
checkpoint the layout-conversion test continues from.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.metrics import read_metrics
from tests.distributed import free_port
from tests.test_data_loader import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEEPSPEED = str(VENV_BIN / "deepspeed")
TORCHRUN = str(VENV_BIN / "torchrun")
PRETRAIN = str(ROOT / "pipeline" / "pretrain.py")
# A tiny model on short sequences: ~0.1 s/step for 2 ranks on 2 cores.
BASE = [
    "model.recipe=tiny",
    "data.seq_length=32",
    "parallelism.micro_batch_size=4",
    "optimizer.lr=3e-3",
    "schedule.warmup_steps=2",
    "logging.tensorboard=false",
    "data.valid_every=0",
]


def run_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    # A run without a launcher rendezvouses on MASTER_PORT (29500 if unset): a free one, so it never
    # collides with another job on this host (launchers pass their own --master_port).
    env["MASTER_PORT"] = str(free_port())
    env.pop("AMBERT_FAULT", None)
    env.update(extra or {})
    return env


def deepspeed_command(overrides: list[str], nproc: int = 2, launcher: str = "deepspeed") -> list[str]:
    if launcher == "torchrun":  # the same script under torchrun (and one launcher process fewer to start)
        return [TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), PRETRAIN, *BASE, *overrides]
    return [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(free_port()), PRETRAIN, *BASE, *overrides]


def launch(overrides: list[str], nproc: int = 2, env: dict | None = None, timeout: float = 300, log: Path | None = None,
           launcher: str = "deepspeed"):
    """Run one training job to completion; returns (exit code, combined output)."""
    proc = subprocess.run(
        deepspeed_command(overrides, nproc, launcher), cwd=ROOT, env=run_env(env), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )
    if log is not None:
        log.write_text(proc.stdout)
    return proc.returncode, proc.stdout


def train_one_process(dataset: Path, output_dir: Path, steps: int, save_every: int) -> Path:
    """A tiny pre-training run (torchrun, 1 process: a few seconds); its checkpoints directory."""
    from tests.distributed import free_port

    command = [TORCHRUN, "--nproc_per_node", "1", "--master_port", str(free_port()), PRETRAIN, *BASE,
               f"data.path={dataset}", f"output_dir={output_dir}", f"schedule.train_steps={steps}",
               f"checkpointing.save_every={save_every}", "data.num_workers=0"]
    proc = subprocess.run(command, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return output_dir / "checkpoints"


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {step: rec[key] for step, rec in read_metrics(run_dir).items()}


def assert_ok(code: int, output: str) -> None:
    assert code == 0, output[-4000:]


# Runs shared between test modules (test_resume.py, test_launchers.py import these getters): a
# plain per-process memo, since a fixture imported into another module would run twice. Under
# pytest-xdist (launchers/test.sh) the memo is also on disk, in the directory all workers' temporary
# directories share, behind a file lock: one worker builds a run, the others wait for it and read it.
_SHARED: dict[str, object] = {}


def _shared(name: str, build, tmp_path_factory):
    if name in _SHARED:
        return _SHARED[name]
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        _SHARED[name] = build()
        return _SHARED[name]
    import pickle

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # the session's directory (each worker's is below it)
    saved = root / f"shared-{name}.pickle"
    with FileLock(str(root / f"shared-{name}.lock")):
        if saved.is_file():
            value = pickle.loads(saved.read_bytes())
        else:
            value = build()
            saved.write_bytes(pickle.dumps(value))
    _SHARED[name] = value
    return value


def get_dataset(tmp_path_factory) -> Path:
    return _shared("dataset", lambda: write_synthetic_dataset(tmp_path_factory.mktemp("pretrain_data") / "ds", num_docs=300),
                   tmp_path_factory)


REFERENCE_OVERRIDES = ["schedule.train_steps=20", "data.num_workers=1", "data.valid_every=10"]


def get_reference_run(tmp_path_factory) -> Path:
    """20 steps, TP=1 DP=2, ZeRO-3, dropout on, one loader worker, checkpoints at 10 and 20."""

    def build() -> Path:
        out = tmp_path_factory.mktemp("reference")
        code, output = launch(
            [f"data.path={get_dataset(tmp_path_factory)}", f"output_dir={out}", *REFERENCE_OVERRIDES, "checkpointing.save_every=10"],
            log=out / "log.txt",
        )
        assert_ok(code, output)
        return out

    return _shared("reference", build, tmp_path_factory)


@pytest.fixture
def synthetic_dataset(tmp_path_factory) -> Path:
    return get_dataset(tmp_path_factory)


@pytest.fixture
def reference_run(tmp_path_factory) -> Path:
    return get_reference_run(tmp_path_factory)


def test_zero3_both_losses_fall(reference_run):
    metrics = read_metrics(reference_run)
    assert sorted(metrics) == list(range(1, 21))
    for key in ("fine_loss", "coarse_loss"):
        curve = [metrics[s][key] for s in range(1, 21)]
        first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
        assert last < first - 0.05, (key, curve)
    valid = read_metrics(reference_run, split="valid")
    # Evaluation sees the trained weights (gathered from their ZeRO-3 partitions): the valid loss
    # falls, and is well below the untrained model's training loss.
    assert sorted(valid) == [10, 20], valid
    assert valid[20]["loss"] < valid[10]["loss"] < metrics[1]["loss"] - 1.0, (valid, metrics[1]["loss"])
    first = metrics[1]
    for key in ("lr", "grad_norm", "tokens_per_s", "samples_per_s", "mfu", "memory_mb"):
        assert first[key] > 0, (key, first)  # grad_norm 0.0 would mean DeepSpeed gave none
    for key in ("fine_accuracy", "coarse_accuracy"):
        assert 0 <= first[key] <= 1, (key, first)
    assert (reference_run / "config.yaml").is_file()
    # The console log is also in files: rank 0 at INFO (through the last step), every rank its own.
    rank0 = (reference_run / "logs" / "rank0.log").read_text(encoding="utf-8")
    assert "step 20/20" in rank0 and "done at step 20" in rank0, rank0[-2000:]
    assert (reference_run / "logs" / "rank1.log").is_file()
    assert sorted(p.name for p in (reference_run / "checkpoints").glob("step_*")) == ["step_00000010", "step_00000020"]


LAYOUTS = [(1, 1), (1, 2), (2, 1), (2, 2)]


def get_layout_runs(tmp_path_factory) -> dict[tuple[int, int], Path]:
    """10 steps at each (TP, DP), same global batch (8), dropout off; the (2, 2) and (1, 2) runs save at step 5."""

    def build():
        runs = {}
        for tp, dp in LAYOUTS:
            out = tmp_path_factory.mktemp(f"layout_tp{tp}_dp{dp}")
            overrides = [
                f"data.path={get_dataset(tmp_path_factory)}", f"output_dir={out}", *layout_overrides(tp, dp),
                "checkpointing.save_every=5" if (tp, dp) in ((2, 2), (1, 2)) else f"checkpointing.save_at_end={str((tp, dp) == (1, 1)).lower()}",
            ]
            code, output = launch(overrides, nproc=tp * dp, log=out / "log.txt", timeout=420, launcher="torchrun")
            assert_ok(code, output)
            runs[(tp, dp)] = out
        return runs

    return _shared("layouts", build, tmp_path_factory)


def layout_overrides(tp: int, dp: int) -> list[str]:
    return [
        "schedule.train_steps=10", "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
        f"parallelism.tensor_parallel={tp}", f"parallelism.gradient_accumulation_steps={2 // dp}", "data.num_workers=0",
    ]


@pytest.fixture
def layout_runs(tmp_path_factory):
    return get_layout_runs(tmp_path_factory)


def test_layouts_give_the_same_loss_curve(layout_runs):
    reference = losses(layout_runs[(1, 1)])
    assert len(reference) == 10
    for layout, run in layout_runs.items():
        for key in ("loss", "fine_loss", "coarse_loss"):
            got, ref = losses(run, key), losses(layout_runs[(1, 1)], key)
            for step in ref:
                assert abs(got[step] - ref[step]) <= 1e-5 * abs(ref[step]), (layout, key, step, got[step], ref[step])


def test_bad_configs_fail_before_training(synthetic_dataset, tmp_path, monkeypatch, capsys):
    """Validation happens before any collective: main() raises without a process group. A mistake
    in the command line stops every rank alike; one found in what the rank reads from its node (the
    dataset) is first handed to the peers (``parallel.startup_failed``, tests/test_startup_agreement.py)."""
    from pipeline import parallel, pretrain
    from pipeline.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    common = [*BASE, f"data.path={synthetic_dataset}", f"output_dir={tmp_path}"]
    cases = [  # (overrides, message, found on the node)
        (["parallelism.tensor_parallel=3"], "parallelism.tensor_parallel=3 does not divide the world size 4", False),
        # checked on the model, which needs the dataset's vocabularies: after the dataset is read
        (["parallelism.tensor_parallel=4", "model.num_attention_heads=2"], "does not divide model.num_attention_heads=2", True),
        (["parallelism.global_batch_size=24"], "parallelism.global_batch_size=24 != micro_batch_size 4", False),
        (["model.fine_vocab_size=10"], "model.fine_vocab_size=10 is smaller than the dataset's fine_vocab_size=64", True),
        (["data.path=/no/such/dataset"], "data.path=/no/such/dataset", True),
        (["data.seq_length=128"], "data.seq_length=128 exceeds the model's limit", True),
    ]
    told: list[tuple[str, int]] = []
    monkeypatch.setattr(parallel, "startup_failed", lambda exc, world, *a: told.append((str(exc), world)))
    import deepspeed
    import torch.distributed as dist

    # Earlier in-process tests may have left a 1-rank group behind (load_exported does), so the
    # check is that main() never *tries* to initialise one before it has validated the config.
    def no_collectives(*args, **kwargs):
        raise AssertionError("pretrain.main initialised torch.distributed before validating the config")

    monkeypatch.setattr(deepspeed, "init_distributed", no_collectives)
    monkeypatch.setattr(dist, "init_process_group", no_collectives)
    for overrides, message, on_node in cases:
        told.clear()
        with pytest.raises(ConfigError, match=message):
            pretrain.main([*common, *overrides])
        if on_node:
            assert len(told) == 1 and message in told[0][0] and told[0][1] == 4, (overrides, told)
        else:
            assert told == [], (overrides, told)
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing started


def test_damaged_dataset_is_one_error_line_not_a_traceback(tmp_path):
    """Dataset defects found when the splits are opened (after start-up) end the run with the
    project's `error:` line and exit code 2, like a bad config."""
    dataset = write_synthetic_dataset(tmp_path / "ds", num_docs=20)
    (dataset / "train_align.idx").unlink()
    result = subprocess.run(
        [sys.executable, str(ROOT / "pipeline" / "pretrain.py"), *BASE, f"data.path={dataset}", f"output_dir={tmp_path / 'run'}"],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    message = f"{dataset / 'train_align.idx'} is missing: {dataset} is not a complete paired dataset"
    assert f"error: {message}" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    # Once on the console (one process: not repeated as a log line on stdout), and in the rank's log file.
    assert message not in result.stdout and result.stderr.count(message) == 1, (result.stdout, result.stderr)
    assert message in (tmp_path / "run" / "logs" / "rank0.log").read_text(encoding="utf-8")


def test_tiny_dataset_and_resume_past_the_end_are_warned_about(tmp_path):
    import re

    dataset = write_synthetic_dataset(tmp_path / "ds", num_docs=3)  # fewer samples than one global batch of 32
    outputs = []
    for extra in ([], ["--resume", "auto"]):
        result = subprocess.run(
            [sys.executable, str(ROOT / "pipeline" / "pretrain.py"), *BASE, f"data.path={dataset}",
             f"output_dir={tmp_path / 'run'}", "schedule.train_steps=2", "schedule.warmup_steps=1",
             "parallelism.micro_batch_size=32", "checkpointing.save_at_end=true", *extra],
            cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout + result.stderr)
    found = re.search(r"the train split has (\d+) samples, fewer than one global batch \(32\): every step repeats", outputs[0])
    assert found and int(found.group(1)) < 32, outputs[0][-3000:]
    assert "resumed at step 2, already >= schedule.train_steps=2: nothing to train" in outputs[1]


def test_continue_on_another_tp_dp_layout(layout_runs, tmp_path, tmp_path_factory):
    """The (TP=2, DP=2) checkpoint of step 5, converted once, continues at (1, 2) and (2, 1)."""
    from pipeline.convert import to_universal

    source = layout_runs[(2, 2)] / "checkpoints" / "step_00000005"
    converted = to_universal(source, tmp_path / "universal")
    assert converted.name == "step_00000005" and (converted / "COMPLETE").is_file()
    reference = losses(layout_runs[(2, 2)])
    for tp, dp in ((1, 2), (2, 1)):
        out = tmp_path / f"continued_tp{tp}_dp{dp}"
        code, output = launch(
            [f"data.path={get_dataset(tmp_path_factory)}", f"output_dir={out}", *layout_overrides(tp, dp),
             f"checkpointing.dir={tmp_path / 'universal'}", "checkpointing.save_at_end=false", "--resume", "auto"],
            log=tmp_path / f"tp{tp}_dp{dp}.log", launcher="torchrun",
        )
        assert_ok(code, output)
        assert output.count("re-seeding dropout") == 1, output[-3000:]  # said once, not by every rank
        got = losses(out)
        assert sorted(got) == [6, 7, 8, 9, 10], sorted(got)
        for step, value in got.items():
            assert abs(value - reference[step]) <= 1e-5 * abs(reference[step]), ((tp, dp), step, value, reference[step])


def test_a_zero1_checkpoint_converts_exports_and_continues(layout_runs, tmp_path, tmp_path_factory):
    """ZeRO-1/2 checkpoints (the bert-base and modern-base recipes') could not be converted nor exported:
    DeepSpeed's converter called .float() on the None ``_extra_state`` entries megatron-core's layers
    put in the model states. Now a ZeRO-1 run at (TP, DP) = (1, 2) converts, exports the weights its
    model states hold, and its universal checkpoint continues at DP=1 on the layouts' curve; the ZeRO-3
    universal checkpoint, which DeepSpeed cannot load below stage 3, is refused up front."""
    import torch
    from safetensors.torch import load_file

    from pipeline import pretrain
    from pipeline.checkpoint import CheckpointError
    from pipeline.convert import export, to_universal

    dataset = get_dataset(tmp_path_factory)
    zero1 = "parallelism.deepspeed_config=ds_configs/zero1_cpu.json"
    run = tmp_path / "zero1"
    code, output = launch([f"data.path={dataset}", f"output_dir={run}", *layout_overrides(1, 2), zero1,
                           "checkpointing.save_every=5"], log=tmp_path / "zero1.log",
                          launcher="torchrun")
    assert_ok(code, output)
    reference = losses(layout_runs[(1, 1)])
    assert sorted(losses(run)) == list(range(1, 11))
    for step, value in losses(run).items():  # ZeRO-1 trains as ZeRO-3 does
        assert abs(value - reference[step]) <= 1e-5 * abs(reference[step]), (step, value, reference[step])
    source = run / "checkpoints" / "step_00000005"

    exported = export(source, tmp_path / "export")
    weights = load_file(str(next(exported.glob("*.safetensors"))))
    module = torch.load(source / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    tensors = {k: v for k, v in module.items() if isinstance(v, torch.Tensor)}
    assert len(tensors) < len(module)  # the None entries that broke the conversion are there
    assert sorted(weights) == sorted(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(weights[name], tensor.float()), name

    to_universal(source, tmp_path / "universal")
    # it continues at (TP, DP) = (2, 1), still ZeRO-1; not at ZeRO-3, which DeepSpeed cannot load it at: refused up front
    out = tmp_path / "continued_tp2_dp1"
    code, output = launch([f"data.path={dataset}", f"output_dir={out}", *layout_overrides(2, 1), zero1,
                           f"checkpointing.dir={tmp_path / 'universal'}", "checkpointing.save_at_end=false",
                           "--resume", "auto"], nproc=2, log=tmp_path / f"{out.name}.log", launcher="torchrun")
    assert_ok(code, output)
    got = losses(out)
    assert sorted(got) == [6, 7, 8, 9, 10], sorted(got)
    for step, value in got.items():
        assert abs(value - reference[step]) <= 1e-5 * abs(reference[step]), (step, value, reference[step])
    with pytest.raises(CheckpointError, match=r"converted from a ZeRO-1 checkpoint, which DeepSpeed loads only at ZeRO "
                                              r"stage 1 or 2; this run has stage 3\."):
        pretrain.main([*BASE, f"data.path={dataset}", f"output_dir={tmp_path / 'refused3'}", *layout_overrides(1, 1),
                       "parallelism.deepspeed_config=ds_configs/zero3_cpu.json", f"checkpointing.dir={tmp_path / 'universal'}",
                       "--resume", "auto"])

    zero3 = to_universal(layout_runs[(1, 2)] / "checkpoints" / "step_00000005", tmp_path / "universal_zero3")
    with pytest.raises(CheckpointError, match=r"converted from a ZeRO-3 checkpoint, which DeepSpeed loads only at ZeRO stage 3; this "
                                              r"run has stage 1\. Continue it with such a config \(parallelism.deepspeed_config=ds_configs/zero3.json.*init_from=EXPORT"):
        pretrain.main([*BASE, f"data.path={dataset}", f"output_dir={tmp_path / 'refused'}", *layout_overrides(1, 1),
                       zero1, f"checkpointing.dir={zero3.parent}", "--resume", "auto"])


def test_continue_a_tp1_checkpoint_at_tp2(layout_runs, tmp_path, tmp_path_factory, monkeypatch):
    """A ZeRO-3 checkpoint saved at TP=1 (DP=2), converted, continues at TP=2 (DP=1) on the same curve.

    DeepSpeed's DP-only ZeRO-3 merge (TP=1 sources) writes bare flat tensors, which its ZeRO-3 loader
    never slices for TP: every rank took whole word-embedding tables ("start + length exceeds dimension
    size"). A checkpoint converted that way (no universal_format in its marker) is refused up front."""
    import json

    import torch
    from deepspeed.checkpoint.constants import PARAM

    from pipeline import pretrain
    from pipeline.checkpoint import CheckpointError
    from pipeline.convert import to_universal

    source = layout_runs[(1, 2)] / "checkpoints" / "step_00000005"
    converted = to_universal(source, tmp_path / "universal")
    shapes = {}
    for group in torch.load(next(converted.glob("*mp_rank_00_model_states.pt")), weights_only=False)["param_shapes"]:
        shapes.update(group)
    for name, shape in shapes.items():
        state = torch.load(converted / "zero" / name / "fp32.pt", weights_only=False)
        assert isinstance(state, dict) and state[PARAM].shape == shape, (name, type(state))
    out = tmp_path / "continued_tp2_dp1"
    code, output = launch(
        [f"data.path={get_dataset(tmp_path_factory)}", f"output_dir={out}", *layout_overrides(2, 1),
         f"checkpointing.dir={tmp_path / 'universal'}", "checkpointing.save_at_end=false", "--resume", "auto"],
        log=tmp_path / "tp2_dp1.log", launcher="torchrun",
    )
    assert_ok(code, output)
    got, reference = losses(out), losses(layout_runs[(1, 2)])
    assert sorted(got) == [6, 7, 8, 9, 10], sorted(got)
    for step, value in got.items():
        assert abs(value - reference[step]) <= 1e-5 * abs(reference[step]), (step, value, reference[step])

    # A conversion by the older code (marker without universal_format) is refused before any collective.
    marker_path = converted / "COMPLETE"
    marker = json.loads(marker_path.read_text(encoding="utf-8"))
    marker.pop("universal_format")
    marker_path.write_text(json.dumps(marker), encoding="utf-8")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(CheckpointError, match="convert .* again"):
        pretrain.main([*BASE, f"data.path={get_dataset(tmp_path_factory)}", f"output_dir={tmp_path / 'refused'}",
                       *layout_overrides(2, 1), f"checkpointing.dir={tmp_path / 'universal'}", "--resume", "auto"])


def test_export_consolidated_fp32_weights(layout_runs, tmp_path):
    """Weights exported from TP=2/DP=2 ZeRO-3 shards equal those of the TP=1/DP=1 run (same curve),
    and load into a plain model without DeepSpeed."""
    import torch
    from safetensors.torch import load_file

    from pipeline.convert import export

    from_tp2 = export(layout_runs[(2, 2)] / "checkpoints" / "step_00000010", tmp_path / "tp2")
    from_tp1 = export(layout_runs[(1, 1)] / "checkpoints" / "step_00000010", tmp_path / "tp1")
    a, b = load_file(str(from_tp2 / "model.safetensors")), load_file(str(from_tp1 / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    assert (from_tp2 / "config.json").is_file() and (from_tp2 / "fine_vocab.txt").is_file()  # tokenizers travel along
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), (name, (a[name] - b[name]).abs().max())
    result = subprocess.run(
        [sys.executable, "-c", "from pipeline.convert import load_exported; import sys; "
         "m = load_exported(sys.argv[1]); print(sum(p.numel() for p in m.parameters()))", str(from_tp2)],
        cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip().splitlines()[-1]) == sum(t.numel() for t in a.values())


def test_resume_with_more_train_steps_follows_the_new_schedule(tmp_path):
    """`nothing to train (raise schedule.train_steps to continue)`: doing so used to restore the old
    schedule from the checkpoint (LambdaLR saves its function's fields), so every extra step trained
    at learning rate 0. The new schedule is followed from the resumed step, with a warning."""
    from pipeline.metrics import read_metrics

    dataset = write_synthetic_dataset(tmp_path / "ds", num_docs=40)
    run = tmp_path / "run"
    outputs = []
    for steps, extra in ((4, []), (8, ["--resume", "auto"])):
        result = subprocess.run(
            [sys.executable, str(ROOT / "pipeline" / "pretrain.py"), *BASE, f"data.path={dataset}", f"output_dir={run}",
             f"schedule.train_steps={steps}", "schedule.style=linear", "schedule.min_lr_ratio=0.0",
             "checkpointing.save_at_end=true", *extra],
            cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout + result.stderr)
    train = read_metrics(run, "train")
    assert sorted(train) == list(range(1, 9))
    # the new schedule: 2 warm-up steps, then linear from 3e-3 to 0 over steps 3..8 (step s trains at
    # lr x f(s - 1), f(s) = (8 - s) / 6)
    for step, expected in zip(range(5, 9), (2 / 3, 1 / 2, 1 / 3, 1 / 6)):
        assert train[step]["lr"] == pytest.approx(3e-3 * expected, rel=1e-6), (step, train[step]["lr"])
    assert "schedule changed since the checkpoint (train_steps 4 -> 8)" in outputs[1], outputs[1][-3000:]
