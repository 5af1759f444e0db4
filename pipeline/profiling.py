"""Traces of chosen training steps with ``torch.profiler`` (``logging.profile_steps``).

Megatron-LM's ``--profile`` and torchtitan's ``profiling`` section do the same: a window of steps,
on chosen ranks, is recorded operator by operator (CPU, and CUDA kernels on GPUs) and written as a
Chrome / Perfetto trace that TensorBoard's profiler plugin (``torch-tb-profiler``) also reads:

    <output_dir>/profile/rank<R>_steps<A>-<B>.pt.trace.json   # chrome://tracing, ui.perfetto.dev
    <output_dir>/profile/rank<R>_steps<A>-<B>.txt             # operators by self time (the table below)
    <output_dir>/profile/rank<R>_steps<A>-<B>.memory.pickle   # GPUs: CUDA allocator history
                                                              #  (pytorch.org/memory_viz)

Each traced step is a ``step N`` range on the trace's timeline. Steps outside the window run without
the profiler. A failure to write a trace is a warning: profiling never stops a run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pipeline.config import uses_gpu

log = logging.getLogger("pretrain")


class StepProfiler:
    """Wraps the training loop's steps: ``with profiler.step(n): ...`` for the step that ends as step n,
    then ``close_if_done()`` once the step's metrics are logged.

    Recording starts with the window's first step this job runs (a job resumed inside the window
    traces the rest of it) and stops after its last step, or at ``close()`` (a preemption, an error).
    """

    def __init__(self, window: tuple[int, int] | None, enabled: bool, output_dir: str | Path, rank: int):
        self.window = window if enabled else None
        self.directory = Path(output_dir) / "profile"
        self.rank = rank
        self.profiler: torch.profiler.profile | None = None
        self.first_traced = 0
        self.last_traced = 0
        self.memory_history = False

    def step(self, step: int):
        if self.window is not None and self.profiler is None and self.window[0] <= step <= self.window[1]:
            self._start(step)
        return _TracedStep(self, step)

    def _start(self, step: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if uses_gpu():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            try:  # the allocator's history (every allocation and its stack), dumped with the trace
                torch.cuda.memory._record_memory_history(max_entries=200_000)
                self.memory_history = True
            except Exception as exc:  # noqa: BLE001 - profiling never stops a run
                log.warning("CUDA memory history not recorded: %s", exc)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self.profiler.__enter__()
        self.first_traced = step
        log.info("profiling steps %d-%d on this rank (torch.profiler)", step, self.window[1])

    def _after(self, step: int) -> None:
        self.last_traced = step

    def close_if_done(self) -> None:
        """After the loop's bookkeeping of a step (so writing the trace is not timed as part of it): stop
        and write once the window's last step ran."""
        if self.profiler is not None and self.last_traced >= self.window[1]:
            self.close()

    def close(self) -> None:
        """Stop recording and write what was recorded (also when the run stops inside the window)."""
        profiler, self.profiler = self.profiler, None
        if profiler is None:
            return
        self.window = None  # one window per job
        self.last_traced = max(self.last_traced, self.first_traced)  # a first step that failed: its part
        stem = f"rank{self.rank}_steps{self.first_traced}-{self.last_traced}"
        try:
            profiler.__exit__(None, None, None)
            self.directory.mkdir(parents=True, exist_ok=True)
            trace = self.directory / f"{stem}.pt.trace.json"
            profiler.export_chrome_trace(str(trace))
            sort = "self_device_time_total" if uses_gpu() else "self_cpu_time_total"
            table = profiler.key_averages().table(sort_by=sort, row_limit=40)
            (self.directory / f"{stem}.txt").write_text(table + "\n", encoding="utf-8")
            if self.memory_history:
                torch.cuda.memory._dump_snapshot(str(self.directory / f"{stem}.memory.pickle"))
            log.info("profile of steps %d-%d: %s (Chrome/Perfetto trace), %s (operators by self time)",
                     self.first_traced, self.last_traced, trace, trace.with_name(f"{stem}.txt"))
        except Exception as exc:  # noqa: BLE001 - profiling never stops a run
            log.warning("the profile of steps %d-%d was not written: %s", self.first_traced, self.last_traced, exc)
        finally:
            if self.memory_history:
                try:
                    torch.cuda.memory._record_memory_history(enabled=None)
                except Exception:  # noqa: BLE001
                    pass
                self.memory_history = False


class _TracedStep:
    def __init__(self, owner: StepProfiler, step: int):
        self.owner, self.step = owner, step
        self.range = None

    def __enter__(self):
        if self.owner.profiler is not None:
            self.range = torch.profiler.record_function(f"step {self.step}")
            self.range.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.range is not None:
            self.range.__exit__(exc_type, exc, tb)
            if exc_type is None:
                self.owner._after(self.step)
        return False
