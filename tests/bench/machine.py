"""One line on the state of the machine a benchmark ran on, printed in every benchmark's header.

Ratios are measured side by side, but the state of a shared or virtual machine still shapes them:
the load, the memory available, and RAM held in /dev/shm (tmpfs counts as used memory; DeepSpeed's
CPU all-reduce workspaces collected there to 19 GB on this project's 24 GB test machine before
``pipeline.parallel`` released them).
"""

from __future__ import annotations

import os


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def machine_line() -> str:
    """e.g. "machine: 2 CPUs, load 0.31 0.80 1.02, 23.6 of 24.1 GB available, /dev/shm 0.0 GB used"."""
    parts = [f"{os.cpu_count()} CPUs"]
    try:
        parts.append("load " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    except OSError:
        pass
    mem = _meminfo()
    if "MemAvailable" in mem and "MemTotal" in mem:
        parts.append(f"{mem['MemAvailable'] / 1e9:.1f} of {mem['MemTotal'] / 1e9:.1f} GB available")
    try:
        shm = os.statvfs("/dev/shm")
        used = (shm.f_blocks - shm.f_bfree) * shm.f_frsize
        note = ""
        stale = [f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer")]
        if stale:
            note = (f" ({len(stale)} DeepSpeed workspaces left by earlier runs: if no DeepSpeed job is running, "
                    f"rm /dev/shm/deepspeed_allreduce_buffer_*)")
        parts.append(f"/dev/shm {used / 1e9:.1f} GB used{note}")
    except OSError:
        pass
    return "machine: " + ", ".join(parts)


if __name__ == "__main__":
    print(machine_line())
