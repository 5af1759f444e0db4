"""Training metrics: console lines with rate and ETA, JSON lines, TensorBoard, MFU.

Only rank 0 writes. ``metrics.jsonl`` has one object per logged step (the plot command and the
tests read it); TensorBoard gets the same scalars under train/ and valid/.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from pipeline.config import uses_gpu

log = logging.getLogger("pretrain")


def measure_peak_flops(seconds: float = 0.3, size: int = 512) -> float:
    """FLOP/s of a dense fp32 matmul in this process: the physical limit MFU is measured against on CPU."""
    generator = torch.Generator().manual_seed(0)  # never touch the global RNG (exact resume)
    a, b = torch.randn(size, size, generator=generator), torch.randn(size, size, generator=generator)
    torch.mm(a, b)
    # Best of several short windows: on a shared machine the slowest windows measure the neighbours.
    best = 0.0
    for _ in range(5):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 5:
            torch.mm(a, b)
            n += 1
        best = max(best, 2 * size**3 * n / (time.perf_counter() - start))
    return best


def default_peak_flops(precision: str) -> float:
    """Per-device peak used for MFU when logging.peak_flops is 0."""
    if uses_gpu():
        # A100 dense: 312 TFLOP/s bf16/fp16, 19.5 fp32 (156 with TF32, which torch leaves off for matmuls and
        # this project does not enable). Set logging.peak_flops for other GPUs.
        return 312e12 if precision in ("bf16", "fp16") else 19.5e12
    return measure_peak_flops()


def memory_mb() -> float:
    if uses_gpu():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover - psutil comes with deepspeed
        return 0.0


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


class MetricsLogger:
    """Rank-0 sink for per-step metrics (other ranks get a no-op logger)."""

    def __init__(self, output_dir: str | os.PathLike, enabled: bool, tensorboard: bool, total_steps: int,
                 resumed_step: int | None = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_time = time.time()
        self.start_step: int | None = None
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Appending keeps one file across preemptions; readers keep the last record of each step. A run
        # killed while writing left its last line cut: this run's records start on a line of their own.
        path = out / "metrics.jsonl"
        cut = path.is_file() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
        self.jsonl = open(path, "a", encoding="utf-8")
        if cut:
            self.jsonl.write("\n")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # resumed: the steps after the checkpoint, which the killed run may have logged, are
                # dropped from the event files (TensorBoard's purge), so each curve has one point a step
                purge = {"purge_step": resumed_step + 1} if resumed_step is not None else {}
                self.tb = SummaryWriter(str(out / "tensorboard"), **purge)
            except Exception as exc:  # noqa: BLE001 - logging must never stop training
                log.warning("TensorBoard disabled: %s", exc)

    def log(self, step: int, metrics: dict, split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{split}/{k}", v, step)
        if split == "train":
            if self.start_step is None:
                self.start_step, self.start_time = step - 1, time.time() - metrics.get("step_time", 0.0)
            done = step - self.start_step
            elapsed = time.time() - self.start_time
            eta = elapsed / max(done, 1) * (self.total_steps - step)
            sides = [g for g in ("fine", "coarse") if f"{g}_loss" in metrics]  # bert-fine / bert-coarse: one side
            losses = ", ".join(f"{g} {metrics[f'{g}_loss']:.4f}" for g in sides)
            accuracy = " ".join(f"{g} {metrics.get(f'{g}_accuracy', float('nan')):.3f}" for g in sides)
            log.info(
                "step %d/%d | loss %.4f%s | acc %s | lr %.2e | "
                "grad %.3f | %.0f tok/s | %.1f samples/s | MFU %.2f%% | mem %.0f MB | %.2f s/step | ETA %s",
                step, self.total_steps, metrics.get("loss", float("nan")), f" ({losses})" if len(sides) > 1 else "",
                accuracy or "-", metrics.get("lr", 0.0), metrics.get("grad_norm", 0.0),
                metrics.get("tokens_per_s", 0.0), metrics.get("samples_per_s", 0.0), 100 * metrics.get("mfu", 0.0),
                metrics.get("memory_mb", 0.0), metrics.get("step_time", 0.0), _fmt_time(eta),
            )
        else:
            log.info("step %d %s | %s", step, split, " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def scan_metrics(path: str | os.PathLike) -> tuple[dict[str, dict[int, dict]], int]:
    """Every split of a metrics.jsonl: ({split: {step: record}}, number of lines skipped).

    Skipped: lines that are not JSON (a line cut by a kill -9), not a JSON object, or without an
    integer "step". After a resume the last record of a step wins."""
    out: dict[str, dict[int, dict]] = {}
    skipped = 0
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError):
            skipped += 1
            continue
        out.setdefault(str(record.get("split", "train")), {})[step] = record
    return {split: dict(sorted(records.items())) for split, records in out.items()}, skipped


def read_metrics(path: str | os.PathLike, split: str = "train") -> dict[int, dict]:
    """step -> record of one split from a metrics.jsonl (the last record wins after a resume; lines
    that are not a JSON object with a "step" are skipped: see scan_metrics)."""
    return scan_metrics(path)[0].get(split, {})
