"""Wall-clock medians for speed comparisons measured in the same run (benchmarks and zoo cards).

The candidates are timed round-robin, one run of each per round, so a load change on a shared
machine hits all of them alike and the ratios of their medians stay meaningful; the device is
synchronized before every clock read.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU), so the clock reads finished work.

    Example:
        >>> synchronize("cpu")
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], warmup: int = 5, reps: int = 30, device: torch.device | str = "cpu") -> float:
    """Median wall time of ``fn()`` in milliseconds over ``reps`` runs after ``warmup`` runs.

    Example:
        >>> median_ms(lambda: sum(range(100)), warmup=1, reps=3) >= 0
        True
    """
    return interleaved_median_ms({"fn": fn}, warmup=warmup, reps=reps, device=device)["fn"]


def interleaved_median_ms(fns: dict[str, Callable[[], Any]], warmup: int = 5, reps: int = 30,
                          device: torch.device | str = "cpu") -> dict[str, float]:
    """Median milliseconds of several functions timed round-robin (one run of each per round).

    On a machine shared with other work, load changes hit every function alike, so the ratios
    of the medians stay meaningful where back-to-back timings would drift.

    Example:
        >>> sorted(interleaved_median_ms({"a": lambda: None, "b": lambda: None}, warmup=1, reps=3))
        ['a', 'b']
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}
