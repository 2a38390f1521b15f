"""Timing in windows, shared by the benchmarks (no JAX here: the PyTorch baselines' child processes import it)."""

from __future__ import annotations

import time


def time_windows(step, windows: int, steps: int, sync) -> list[float]:
    """Seconds a step in each of ``windows`` windows of ``steps`` steps; ``sync`` waits once a window."""
    times = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        times.append((time.perf_counter() - t0) / steps)
    return times
