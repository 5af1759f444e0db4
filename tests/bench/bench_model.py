"""Model throughput: our `ambert` vs HF transformers BertForMaskedLM of the same size, side by side.

    .venv/bin/python tests/bench/bench_model.py                # bert-base width, 12 layers
    .venv/bin/python tests/bench/bench_model.py --layers 4 --steps 3

One process, CPU (or the GPU if there is one), fp32. For each model: forward + backward + fused
AdamW step on the SAME fine and coarse batches (fine then coarse for HF, stacked in one call for
us), tokens/s counted over real (non-padding) fine + coarse tokens. Steps of the two models and
matmul-peak probes are interleaved round by round, medians reported. The peer:

  HF BertForMaskedLM with one embedding table of fine + coarse rows (coarse ids shifted), i.e. the
  same parameter count as AMBERT's two tables + shared encoder; it computes logits at every
  position (its only mode) and runs on padded batches.

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

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pipeline.batch import IGNORE_INDEX  # noqa: E402


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
            wall, cpu = timed(lambda: torch.mm(a, b), device)
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

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {args.threads}, device {device}; "
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

    hf_config = BertConfig(
        vocab_size=config.padded_vocab_size("fine") + config.padded_vocab_size("coarse"),
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
        intermediate_size=4 * args.hidden, max_position_embeddings=config.max_position_embeddings,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    hf = BertForMaskedLM(hf_config).to(device).train()
    hf_optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
    shift = config.padded_vocab_size("fine")
    hf_inputs = []
    for g, offset in (("fine", 0), ("coarse", shift)):
        labels = batch[f"{g}_labels"]
        hf_inputs.append(dict(
            input_ids=batch[f"{g}_ids"] + offset,
            attention_mask=batch[f"{g}_attention_mask"],
            token_type_ids=batch[f"{g}_token_types"],
            labels=torch.where(labels == IGNORE_INDEX, labels, labels + offset),
        ))

    def hf_step():
        loss = sum(hf(**inputs).loss for inputs in hf_inputs)  # fine batch, then coarse batch
        loss.backward()
        hf_optimizer.step()
        hf_optimizer.zero_grad(set_to_none=True)

    ours_params = sum(p.numel() for p in ours.parameters())
    hf_params = sum(p.numel() for p in hf.parameters())
    ours_step()
    hf_step()  # warm-up
    threads = torch.get_num_threads()
    ours_times, hf_times, peaks, mfus, ours_cpu, hf_cpu, cpu_peaks = [], [], [], [], [], [], []
    for i in range(args.steps):
        wall, cpu = timed(ours_step, device)
        ours_times.append(wall)
        ours_cpu.append(cpu / threads)
        wall, cpu = timed(hf_step, device)
        hf_times.append(wall)
        hf_cpu.append(cpu / threads)
        peak_wall, peak_cpu = matmul_peak(device, sizes=(3072,), repeats=2)
        peaks.append(peak_wall)
        cpu_peaks.append(peak_cpu)
        mfus.append(useful_flops / ours_times[-1] / peaks[-1])
        print(f"  round {i + 1}/{args.steps}: ours {ours_times[-1]:.2f}s ({ours_cpu[-1]:.2f} CPU-s/thread)  "
              f"HF {hf_times[-1]:.2f}s ({hf_cpu[-1]:.2f})  peak {peaks[-1] / 1e9:.1f} GFLOP/s  "
              f"load {load()}", flush=True)

    ours_time, hf_time, mfu = median(ours_times), median(hf_times), median(mfus)
    peak = max(peaks + [peak_before])
    cpu_peak = max(cpu_peaks + [cpu_peak_before])
    ours_rate, hf_rate = real_tokens / ours_time, real_tokens / hf_time
    print()
    print(f"{'model':<50}{'params':>10}{'s/step':>9}{'tokens/s':>10}{'CPU-s/thread':>14}")
    print(f"{'ours: ambert (shared encoder, masked-only heads)':<50}{ours_params / 1e6:>9.1f}M{ours_time:>9.2f}"
          f"{ours_rate:>10.0f}{median(ours_cpu):>14.2f}")
    print(f"{'HF BertForMaskedLM (one table: fine+coarse rows)':<50}{hf_params / 1e6:>9.1f}M{hf_time:>9.2f}"
          f"{hf_rate:>10.0f}{median(hf_cpu):>14.2f}")
    print()
    print(f"speed-up vs HF (median of {args.steps} interleaved rounds): {ours_rate / hf_rate:.2f}x wall-clock, "
          f"{median(hf_cpu) / median(ours_cpu):.2f}x in CPU time (goal >= 1.3x)")
    print(f"achieved: {useful_flops / ours_time / 1e9:.1f} GFLOP/s useful; median per-round fraction of the fp32 "
          f"matmul peak measured right after it: {100 * mfu:.1f}% (goal >= 50%); best peak seen "
          f"{peak / 1e9:.1f} GFLOP/s -> {100 * useful_flops / ours_time / peak:.1f}% of it")
    print(f"by CPU time (less sensitive to other jobs): {useful_flops / median(ours_cpu) / 1e9:.1f} GFLOP/s useful "
          f"= {100 * useful_flops / median(ours_cpu) / cpu_peak:.1f}% of the matmul peak measured the same way "
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
