"""Shared helpers of the benchmarks: machine description and a check that the CPU is otherwise idle."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields), idle


def busy_fraction(seconds: float = 1.0) -> float:
    """Fraction of all CPU time that was busy over `seconds` (call it while this process is idle)."""
    total0, idle0 = _cpu_times()
    time.sleep(seconds)
    total1, idle1 = _cpu_times()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def require_idle(limit: float = 0.15, seconds: float = 2.0) -> float:
    """Warn loudly when other processes use the CPU: on 2 cores they halve every timing."""
    busy = busy_fraction(seconds)
    if busy > limit:
        print(f"WARNING: the CPU is {busy:.0%} busy with other work; timings will be unreliable")
    return busy


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}


def write_json(path, obj, indent: int = 1) -> None:
    """Write a results file atomically (a temporary beside it, then a rename): an interrupted run leaves the previous
    file whole, which the resumable benchmarks read back."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)
