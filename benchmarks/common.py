"""Timing helpers shared by the benchmark scripts: medians over repeated runs, machine description, JSON lines."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from convmoe.timing import interleaved_median_ms, median_ms, synchronize

__all__ = ["interleaved_median_ms", "machine", "median_ms", "peak_memory_mb", "synchronize", "write_jsonl"]


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
