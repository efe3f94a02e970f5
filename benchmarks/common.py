"""Timing helpers shared by the benchmark scripts: medians over repeated runs, machine description, JSON lines."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU), so the clock reads finished work."""
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


def peak_memory_mb(fn: Callable[[], Any], device: torch.device | str) -> float | None:
    """Peak device memory of one ``fn()`` call in MiB on CUDA; None on CPU (not tracked there)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def machine(device: torch.device | str) -> dict[str, Any]:
    """A short description of where the numbers were measured."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "device": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_jsonl(path: str | Path | None, record: dict[str, Any]) -> None:
    """Print ``record`` as one JSON line and append it to ``path`` (if given)."""
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")
