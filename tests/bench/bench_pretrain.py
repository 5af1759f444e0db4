"""Pre-training benchmark (CPU, gloo, 2 ranks): one command, every ratio measured side by side.

    python tests/bench/bench_pretrain.py [--data DIR] [--steps 40] [--recipe tiny] [--seq 64] [--micro 8]

1. ZeRO-3 vs ZeRO-1 step time at 2 ranks, same model and data (goal: ZeRO-3 <= 1.5x ZeRO-1).
2. Data loader samples/s (one rank, in-process and with 1 worker) vs the samples/s one rank consumes
   in training (goal: >= 20x, so the loader never limits a step).
3. Tokens/s and MFU of the ZeRO-3 run, MFU against the measured fp32 matmul peak of one process.

Data: --data, else data/demo-zh if it exists, else a synthetic paired dataset (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def run_training(stage_config: str, data: str, out: Path, args) -> dict:
    from tests.distributed import free_port

    cmd = [
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
        str(ROOT / "pipeline" / "pretrain.py"), f"data.path={data}", f"output_dir={out}", f"model.recipe={args.recipe}",
        f"data.seq_length={args.seq}", f"parallelism.micro_batch_size={args.micro}", f"schedule.train_steps={args.steps}",
        "schedule.warmup_steps=2", f"parallelism.deepspeed_config={stage_config}", "checkpointing.save_at_end=false",
        "data.valid_every=0", "logging.tensorboard=false", "data.num_workers=1",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"training with {stage_config} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"][5:]  # skip warm-up steps (allocations, first gathers)
    return {
        "step_time": statistics.median(r["step_time"] for r in train),
        "samples_per_s": statistics.median(r["samples_per_s"] for r in train),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
        "mfu": statistics.median(r["mfu"] for r in train),
        "final_loss": train[-1]["loss"],
    }


def loader_throughput(data: str, args, workers: int, batches: int = 60) -> float:
    from pipeline.data import MaskingConfig, PretrainingData

    pdata = PretrainingData.open(data, args.seq, MaskingConfig(), seed=1, with_valid=False)
    loader = pdata.loader("train", 0, args.micro, 1, dp_rank=0, dp_size=2, num_workers=workers)
    it = iter(loader)
    next(it)  # worker start-up is a one-off cost, not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * args.micro / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="paired dataset directory")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--micro", type=int, default=8)
    args = parser.parse_args()
    if args.steps < 6:  # the medians skip 5 warm-up steps
        parser.error(f"--steps {args.steps}: give at least 6 (the first 5 steps are warm-up, left out of the medians)")

    work = Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
    data = args.data
    if data is None:
        demo = ROOT / "data" / "demo-zh"
        if (demo / "meta.json").is_file():
            data = str(demo)
        else:
            from tests.test_data_loader import write_synthetic_dataset

            data = str(write_synthetic_dataset(work / "synthetic", num_docs=2000))
    from tests.bench.machine import machine_line

    print(machine_line())
    print(f"data: {data}\nmodel recipe {args.recipe}, fine length {args.seq}, micro-batch {args.micro}, 2 ranks, {args.steps} steps each, medians after 5 warm-up steps\n")

    zero1 = run_training("ds_configs/zero1_cpu.json", data, work / "zero1", args)
    zero3 = run_training("ds_configs/zero3_cpu.json", data, work / "zero3", args)
    in_process = loader_throughput(data, args, workers=0)
    one_worker = loader_throughput(data, args, workers=1)
    per_rank_consumption = zero3["samples_per_s"] / 2

    print("| measurement | value |")
    print("|---|---|")
    print(f"| ZeRO-1 step time (s) | {zero1['step_time']:.4f} |")
    print(f"| ZeRO-3 step time (s) | {zero3['step_time']:.4f} |")
    print(f"| **ZeRO-3 / ZeRO-1 step time** (goal <= 1.5) | **{zero3['step_time'] / zero1['step_time']:.2f}x** |")
    print(f"| loss after {args.steps} steps, ZeRO-1 / ZeRO-3 | {zero1['final_loss']:.4f} / {zero3['final_loss']:.4f} |")
    print(f"| training consumption per rank (samples/s) | {per_rank_consumption:.1f} |")
    print(f"| loader, in-process (samples/s, one rank) | {in_process:.1f} |")
    print(f"| loader, 1 worker (samples/s, one rank) | {one_worker:.1f} |")
    print(f"| **loader / consumption** (in-process; goal >= 20) | **{in_process / per_rank_consumption:.1f}x** |")
    print(f"| ZeRO-3 tokens/s (fine + coarse, non-pad, 2 ranks) | {zero3['tokens_per_s']:.0f} |")
    print(f"| ZeRO-3 MFU (vs measured fp32 matmul peak per process) | {100 * zero3['mfu']:.2f}% |")
    print(f"| ZeRO-1 MFU | {100 * zero1['mfu']:.2f}% |")
    print(f"\nruns kept in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
