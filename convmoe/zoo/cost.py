"""What a zoo variant costs: parameters, active FLOPs (and the dense equivalent's), and latency.

FLOPs come from :func:`convmoe.flops` (fvcore, MoE blocks counted from their real routing) on one
input of the size the model is evaluated at. Without fvcore, the parameter counts remain and the
FLOPs fall back to :func:`convmoe.describe`'s analytic ratio of the MoE blocks over the convs they
replaced (no whole-model count). Latency is the median of batch-1 forward passes, the variant and
its dense twin timed round-robin on the same device so their ratio is fair.
"""

from __future__ import annotations

import functools
import platform
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from convmoe.describe import describe_blocks
from convmoe.flops import flops
from convmoe.timing import interleaved_median_ms

FVCORE_METHOD = "convmoe.flops (fvcore; one multiply-add = one FLOP; MoE blocks counted at the experts each token visits)"
ANALYTIC_METHOD = "convmoe.describe (analytic active/dense ratio of the MoE blocks; fvcore not installed)"


@dataclass(frozen=True)
class CostFigures:
    """Parameters and FLOPs of a model for one input.

    Attributes:
        params: Parameters (every expert included).
        dense_params: Parameters of the dense equivalent (each MoE block replaced by its conv).
        active_flops: FLOPs of one forward pass with the MoE blocks at their active cost; None
            without fvcore.
        dense_flops: FLOPs of the dense equivalent; None without fvcore.
        block_ratio: Active over dense FLOPs of the MoE blocks alone (None without MoE blocks).
        method: How the FLOPs were counted.
        executed_flops: FLOPs of one forward pass as the MoE blocks' dispatch paths ran (one conv per
            image for merged experts; :attr:`convmoe.flops.FlopReport.executed`); None without fvcore.

    Example:
        >>> CostFigures(10, 8, 100, 80, 1.25, "x").as_dict()["active_flops"]
        100
    """

    params: int
    dense_params: int
    active_flops: int | None
    dense_flops: int | None
    block_ratio: float | None
    method: str
    executed_flops: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the figures."""
        return {"params": self.params, "dense_params": self.dense_params, "active_flops": self.active_flops,
                "dense_flops": self.dense_flops, "block_ratio": self.block_ratio, "method": self.method,
                "executed_flops": self.executed_flops}


def measure_cost(model: nn.Module, inputs: Tensor) -> CostFigures:
    """Parameters and FLOPs of ``model`` (put in eval mode) on ``inputs``.

    Example:
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(4, 4, 3, padding=1, num_experts=4, top_k=1))
        >>> cost = measure_cost(model, torch.randn(1, 4, 8, 8))
        >>> cost.active_flops >= cost.dense_flops, cost.params > cost.dense_params
        (True, True)
    """
    model.eval()
    try:
        report = flops(model, inputs)
    except ImportError:  # fvcore is imported on first use; without it the analytic count stands in
        return _analytic_cost(model, inputs)
    blocks = report.blocks
    ratio = (sum(b.active for b in blocks.values()) / max(sum(b.dense for b in blocks.values()), 1)
             if blocks else None)
    return CostFigures(params=int(report.params), dense_params=int(report.dense_params),
                       active_flops=int(report.active), dense_flops=int(report.dense), block_ratio=ratio,
                       method=FVCORE_METHOD, executed_flops=int(report.executed))


def _analytic_cost(model: nn.Module, inputs: Tensor) -> CostFigures:
    rows = describe_blocks(model, inputs)
    params = sum(p.numel() for p in model.parameters())
    added = sum(row.params_added for row in rows)
    ratio = statistics.fmean(row.active_flops_ratio for row in rows) if rows else None
    return CostFigures(params=params, dense_params=params - added, active_flops=None, dense_flops=None,
                       block_ratio=ratio, method=ANALYTIC_METHOD)


def device_description(device: torch.device | str) -> str:
    """The device in words: the GPU's name, or the CPU with its thread count.

    Example:
        >>> "CPU" in device_description("cpu")
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


@torch.no_grad()
def measure_latency(models: Mapping[str, nn.Module], inputs: Tensor, device: torch.device | str = "cpu",
                    warmup: int = 5, reps: int = 30) -> dict[str, float]:
    """Median milliseconds of one forward pass of each model on ``inputs``, timed round-robin.

    The models run in eval mode, float32, without autocast; one pass of each per round, so load
    changes on a shared machine hit every model alike and their ratio stays meaningful. The
    device is synchronized before the clock is read.

    Args:
        models: Name -> model; each is moved to ``device``.
        inputs: One batch (the zoo uses batch 1).
        device: Where to time.
        warmup: Untimed passes per model first.
        reps: Timed passes per model.

    Returns:
        Name -> median milliseconds.

    Example:
        >>> sorted(measure_latency({"a": nn.Identity()}, torch.zeros(1), warmup=1, reps=3))
        ['a']
    """
    if reps < 1:
        raise ValueError(f"reps={reps} must be at least 1; skip the measurement instead.")
    device = torch.device(device)
    runs = {name: model.eval().to(device) for name, model in models.items()}
    x = inputs.to(device)
    return interleaved_median_ms({name: functools.partial(model, x) for name, model in runs.items()},
                                 warmup=warmup, reps=reps, device=device)
