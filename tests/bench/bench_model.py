"""Model throughput: our `ambert` vs HF transformers BertForMaskedLM of the same size, side by side.

    .venv/bin/python tests/bench/bench_model.py                # bert-base width, 12 layers
    .venv/bin/python tests/bench/bench_model.py --layers 4 --steps 3

One process, CPU (or the GPU if there is one), fp32. For each model: forward + backward + fused
AdamW step on the SAME fine and coarse batches (fine then coarse for HF, stacked in one call for
us), tokens/s counted over real (non-padding) fine + coarse tokens. Steps of the two models and
matmul-peak probes are interleaved round by round, medians reported. The peer:

  1. HF BertForMaskedLM with one embedding table of fine + coarse rows (coarse ids shifted): the
     same parameter count as AMBERT's two tables + shared encoder.
  2. Two HF BertForMaskedLM (fine vocabulary, coarse vocabulary) sharing ONE encoder module:
     AMBERT's structure from HF parts, each granularity's logits over its own vocabulary.
  HF computes logits at every position (its only mode) and runs on padded batches.

Achieved FLOP/s (useful FLOPs from pipeline.model.flops_per_sample, padding not counted) is
reported as a fraction of this machine's fp32 matmul peak measured in the same run (best torch.mm
on large squares, probed before the models and again after every round). The machine may be
shared: the load average is printed next to the figures, and every figure is also given by
process CPU time (seconds the cores actually worked for us / threads), which other jobs distort
far less than wall-clock time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch
import torch.distributed as dist

from pipeline.batch import IGNORE_INDEX


def load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def matmul_peak(device: torch.device, sizes=(2048, 3072, 4096), repeats: int = 4) -> tuple[float, float]:
    """Best fp32 torch.mm FLOP/s over a few large squares: (per wall-clock second, per CPU second of
    the process divided by the thread count). The second is what the cores did while we had them."""
    best_wall = best_cpu = 0.0
    threads = torch.get_num_threads()
    for n in sizes:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        torch.mm(a, b)
        for _ in range(repeats):
            wall, cpu = timed(lambda a=a, b=b: torch.mm(a, b), device)
            best_wall = max(best_wall, 2 * n**3 / wall)
            best_cpu = max(best_cpu, 2 * n**3 / (cpu / threads))
    return best_wall, best_cpu


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--fine-len", type=int, default=128)
    parser.add_argument("--coarse-len", type=int, default=84, help="paper zh: coarse ~0.6-0.7x fine")
    parser.add_argument("--fine-vocab", type=int, default=21_128)
    parser.add_argument("--coarse-vocab", type=int, default=93_763)
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (after one warm-up step each)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    from transformers import BertConfig, BertForMaskedLM

    from pipeline import parallel
    from pipeline.model import build_model, flops_per_sample, model_recipe
    from pipeline.model.synthetic import synthetic_batch

    device = parallel.accelerator_device()
    parallel.initialize_parallel(tensor_parallel_size=1, seed=1234)
    heads = args.hidden // 64
    config = model_recipe(
        "bert-base", hidden_size=args.hidden, num_layers=args.layers, num_attention_heads=heads,
        ffn_hidden_size=4 * args.hidden, fine_vocab_size=args.fine_vocab, coarse_vocab_size=args.coarse_vocab,
        hidden_dropout=0.1, attention_dropout=0.1,
    )
    batch = synthetic_batch(args.fine_vocab, args.coarse_vocab, batch_size=args.batch, fine_len=args.fine_len,
                            coarse_len=args.coarse_len, seed=0)
    batch = {k: v.to(device) for k, v in batch.items()}
    real_tokens = int(batch["fine_attention_mask"].sum() + batch["coarse_attention_mask"].sum())
    padded_tokens = batch["fine_ids"].numel() + batch["coarse_ids"].numel()
    masked = {g: int((batch[f"{g}_labels"] != IGNORE_INDEX).sum()) for g in ("fine", "coarse")}
    fine_lengths = batch["fine_attention_mask"].sum(1).tolist()
    coarse_lengths = batch["coarse_attention_mask"].sum(1).tolist()
    useful_flops = sum(
        flops_per_sample(config, lf, lc, 0, 0) for lf, lc in zip(fine_lengths, coarse_lengths)
    ) + flops_per_sample(config, 0, 0, masked["fine"], masked["coarse"])

    from tests.bench.machine import machine_line

    print(machine_line())
    print(f"torch {torch.__version__}, threads {args.threads}, device {device}; "
          f"load average before: {load()} (shared machine: other jobs may be running)")
    peak_before, cpu_peak_before = matmul_peak(device)
    print(f"fp32 matmul peak (torch.mm, best of large squares): {peak_before / 1e9:.1f} GFLOP/s wall-clock, "
          f"{cpu_peak_before / 1e9:.1f} GFLOP/s by CPU time (as if all {torch.get_num_threads()} threads had "
          "their cores to themselves)")
    print(f"shape: hidden {args.hidden}, {args.layers} layers, {heads} heads, batch {args.batch}, fine len "
          f"{args.fine_len}, coarse len {args.coarse_len} (ragged; {real_tokens} real of {padded_tokens} "
          f"tokens), vocab fine {args.fine_vocab} / coarse {args.coarse_vocab}")

    # Both models live side by side; their steps and the matmul-peak probes are INTERLEAVED
    # (ours, HF, peak, ours, HF, peak, ...) so that load from other jobs hits all of them alike.
    ours = build_model(config).to(device).train()
    ours_optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)

    def ours_step():
        out = ours(batch)
        out["loss"].backward()
        ours_optimizer.step()
        ours_optimizer.zero_grad(set_to_none=True)

    def hf_bert(vocab_size: int) -> BertForMaskedLM:
        hf_config = BertConfig(
            vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
            intermediate_size=4 * args.hidden, max_position_embeddings=config.max_position_embeddings,
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attn_implementation="sdpa",
        )
        return BertForMaskedLM(hf_config).to(device).train()

    def hf_inputs(g: str, offset: int = 0) -> dict:
        labels = batch[f"{g}_labels"]
        return dict(
            input_ids=batch[f"{g}_ids"] + offset,
            attention_mask=batch[f"{g}_attention_mask"],
            token_type_ids=batch[f"{g}_token_types"],
            labels=torch.where(labels == IGNORE_INDEX, labels, labels + offset),
        )

    def make_step(module: torch.nn.Module, calls):
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)

        def step():
            loss = sum(model(**inputs).loss for model, inputs in calls)  # fine batch, then coarse batch
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    torch.manual_seed(0)
    fine_rows, coarse_rows = config.padded_vocab_size("fine"), config.padded_vocab_size("coarse")
    # Peer 1: one BertForMaskedLM whose table holds fine + coarse rows (coarse ids shifted).
    joint = hf_bert(fine_rows + coarse_rows)
    joint_step = make_step(joint, [(joint, hf_inputs("fine")), (joint, hf_inputs("coarse", fine_rows))])
    # Peer 2: two BertForMaskedLM (own table and head each) sharing ONE encoder module: AMBERT's
    # structure built from HF parts; logits over each granularity's own vocabulary.
    pair_fine, pair_coarse = hf_bert(fine_rows), hf_bert(coarse_rows)
    pair_coarse.bert.encoder = pair_fine.bert.encoder
    pair = torch.nn.ModuleList([pair_fine, pair_coarse])
    pair_step = make_step(pair, [(pair_fine, hf_inputs("fine")), (pair_coarse, hf_inputs("coarse"))])

    contenders = [
        ("ours: ambert (shared encoder, masked-only heads)", ours, ours_step),
        ("HF-joint: BertForMaskedLM, one fine+coarse table", joint, joint_step),
        ("HF-pair: 2 BertForMaskedLM sharing one encoder", pair, pair_step),
    ]
    for _, _, step in contenders:
        step()  # warm-up
    threads = torch.get_num_threads()
    walls = {name: [] for name, _, _ in contenders}
    cpus = {name: [] for name, _, _ in contenders}
    peaks, cpu_peaks, mfus = [], [], []
    ours_name = contenders[0][0]
    for i in range(args.steps):
        for name, _, step in contenders:
            wall, cpu = timed(step, device)
            walls[name].append(wall)
            cpus[name].append(cpu / threads)
        peak_wall, peak_cpu = matmul_peak(device, sizes=(3072,), repeats=2)
        peaks.append(peak_wall)
        cpu_peaks.append(peak_cpu)
        mfus.append(useful_flops / walls[ours_name][-1] / peaks[-1])
        times = "  ".join(f"{short} {walls[name][-1]:.2f}s" for short, (name, _, _) in zip(("ours", "HF-joint", "HF-pair"), contenders))
        print(f"  round {i + 1}/{args.steps}: {times}  peak {peaks[-1] / 1e9:.1f} GFLOP/s  load {load()}", flush=True)

    peak = max(peaks + [peak_before])
    cpu_peak = max(cpu_peaks + [cpu_peak_before])
    ours_time, ours_cpu = median(walls[ours_name]), median(cpus[ours_name])
    print()
    print(f"{'model':<52}{'params':>10}{'s/step':>9}{'tokens/s':>10}{'CPU-s/thread':>14}{'ours is':>22}")
    for name, module, _ in contenders:
        params = sum(p.numel() for p in module.parameters())
        wall, cpu = median(walls[name]), median(cpus[name])
        ratio = "" if name == ours_name else f"{wall / ours_time:.2f}x ({cpu / ours_cpu:.2f}x CPU)"
        print(f"{name:<52}{params / 1e6:>9.1f}M{wall:>9.2f}{real_tokens / wall:>10.0f}{cpu:>14.2f}{ratio:>22}")
    print()
    print(f"speed-up vs HF: medians of {args.steps} interleaved rounds, wall-clock (CPU time); goal >= 1.3x")
    mfu = median(mfus)
    print(f"achieved: {useful_flops / ours_time / 1e9:.1f} GFLOP/s useful; median per-round fraction of the fp32 "
          f"matmul peak measured right after it: {100 * mfu:.1f}% (goal >= 50%); best peak seen "
          f"{peak / 1e9:.1f} GFLOP/s -> {100 * useful_flops / ours_time / peak:.1f}% of it")
    print(f"by CPU time (less sensitive to other jobs): {useful_flops / ours_cpu / 1e9:.1f} GFLOP/s useful "
          f"= {100 * useful_flops / ours_cpu / cpu_peak:.1f}% of the matmul peak measured the same way "
          f"({cpu_peak / 1e9:.1f} GFLOP/s)")
    print(f"load average after: {load()}")


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def timed(step, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


if __name__ == "__main__":
    main()
