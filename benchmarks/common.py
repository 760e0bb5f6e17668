"""Timing, machine description and same-run reference bandwidths."""

from __future__ import annotations

import os
import platform
import time

import numpy as np


def best_seconds(fn, repeats: int = 7, warmup: int = 1, clock=time.perf_counter) -> float:
    """Fastest of `repeats` timed calls after `warmup` untimed ones, by `clock` (wall time;
    time.process_time for CPU time)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def memcpy_bandwidth(nbytes: int, repeats: int = 7) -> float:
    """Bytes per second of one single-threaded memcpy of `nbytes` (NumPy copyto)."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros_like(src)
    return nbytes / best_seconds(lambda: np.copyto(dst, src), repeats)


def machine() -> str:
    """CPU model, core count and memory of this machine, in one line."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages / 2**30:.0f} GiB"
    except (ValueError, OSError):
        pass
    return f"{model}, {os.cpu_count()} cores{memory}"
