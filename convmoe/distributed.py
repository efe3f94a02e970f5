"""MoE blocks under data parallelism: what is reduced across ranks, and the routing statistics of all ranks.

Under ``DistributedDataParallel`` (or FSDP) each rank routes its own batch. What crosses ranks:

| quantity | across ranks | why |
|---|---|---|
| gradients, expert weights included | averaged by DDP / FSDP | experts are one stacked parameter per block: an expert without tokens on a rank still gets a zero gradient slice, so ``find_unused_parameters=False`` works |
| balancing (aux) losses, ``convmoe.aux_loss`` | **not** reduced: each rank's loss is computed on its local batch | as in GShard and Switch (per-device groups); DDP averages their gradients, which is single-process training with the aux loss averaged over ``world_size`` slices of the global batch. No collective in the forward pass |
| capacity | per image (per local batch for ``image`` tokens) | routing of a sample never waits for another rank |
| routing statistics, ``convmoe.routing_stats`` | local to the rank | cheap to log every step |
| routing statistics, :func:`global_routing_stats` | summed over ranks (one ``all_reduce``) | expert utilisation, dead experts and drop rate of the whole global batch: an expert idle on one rank may be busy on another |
| expert loads of bias balancing (``MoEConfig.bias_balancing``) | summed over ranks (one ``all_reduce`` per block call in training) | every rank updates the selection bias alike, so the bias stays identical on all ranks |
| expert frequencies of the global-batch switch loss (``losses={"switch_global": w}``) | summed over ranks (one ``all_reduce`` per block call in training), and over the micro-batches of a :func:`global_batch` window | the loss balances the global batch, not each micro-batch (Qiu et al., 2025); ``P`` stays local, so DDP's average gives the single-process loss of the concatenated batch |

The task loss, with equal local batch sizes, gives the gradients of single-process training on the
global batch (DDP averages, the loss is a mean). Wrap BatchNorm in ``SyncBatchNorm`` as usual.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from convmoe.diagnostics import (
    _COUNT_FIELDS,
    ModelRoutingStats,
    _routings,
    expert_bias_of,
    moe_blocks,
    routing_counts,
    stats_from_counts,
)
from convmoe.losses import BalancingLoss, FrequencyWindow
from convmoe.scope import ensure_forward_scope
from convmoe.types import Routing


def global_routing_stats(model: nn.Module, group: dist.ProcessGroup | None = None) -> ModelRoutingStats:
    """Routing statistics of the latest forward pass over the batches of all ranks (a collective).

    Every rank must call it after the same forward passes (the blocks are matched by order; a block
    that did not run on a rank counts zero tokens there, one that ran on no rank is left out). The
    loads, drop counts and router entropies are summed over ranks with one ``all_reduce``, so the
    result equals ``convmoe.routing_stats`` of one process that routed the global batch (for
    ``image`` tokens with a capacity limit, capacity stays per rank). Without an initialised process
    group it is ``convmoe.routing_stats(model)``.

    Args:
        model: The model (or its DDP/FSDP wrapper).
        group: The process group; the default group when None.

    Raises:
        ValueError: No block has run a forward pass on this rank.

    Example:
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(3, 4, 3, padding=1, num_experts=4))
        >>> _ = model(torch.randn(2, 3, 8, 8))
        >>> global_routing_stats(model)["0"].tokens
        128
    """
    ensure_forward_scope(model)
    blocks = list(moe_blocks(model))
    routings = {name: _routings(block) for name, block in blocks}
    if blocks and not any(routings.values()):
        raise ValueError(f"global_routing_stats(): blocks {list(routings)} have no routing yet on this rank; run the "
                         "same forward pass on every rank first.")
    # A block that did not run on this rank (layer drop) still takes part in the all_reduce, with zeros.
    sizes = {name: _num_experts(name, block, routings[name]) for name, block in blocks}
    vectors = [torch.stack([routing_counts(r) for r in routings[name]]).sum(dim=0) if routings[name]
               else torch.zeros(sizes[name] + _COUNT_FIELDS, dtype=torch.float64) for name, _ in blocks]
    if vectors and dist.is_available() and dist.is_initialized():
        flat = torch.cat(vectors)
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        flat = flat.to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        vectors = list(flat.cpu().split([v.numel() for v in vectors]))
    stats = {name: stats_from_counts(counts, sizes[name]) for (name, _), counts in zip(blocks, vectors, strict=True)}
    # Bias balancing sums the loads over ranks before each update, so every rank holds the same bias.
    stats = {name: dataclasses.replace(s, expert_bias=expert_bias_of(routings[name][-1])) if routings[name] else s
             for name, s in stats.items()}
    return ModelRoutingStats({name: s for name, s in stats.items() if s.tokens > 0})


def _num_experts(name: str, block: nn.Module, routings: tuple[Routing, ...]) -> int:
    if routings:
        return routings[0].num_experts
    config = getattr(block, "config", None)
    if config is None:
        raise ValueError(f"global_routing_stats(): block {name!r} did not run in this forward pass and has no config "
                         "to tell its number of experts; run it on every rank.")
    return config.num_experts

@contextmanager
def global_batch(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, the global-batch switch loss counts expert frequencies over every forward pass.

    Wrap the micro-batches of one optimizer step (gradient accumulation): the ``"switch_global"``
    loss of micro-batch m then uses the first-choice frequencies of micro-batches 1..m of all
    ranks, and the last micro-batch's are those of the whole global batch (Qiu et al., 2025). The
    engine opens one window per optimizer step. Outside a window each forward pass is its own
    (frequencies over the ranks only). Other losses are unaffected.

    Args:
        model: The model (or its DDP/FSDP wrapper).

    Yields:
        Names of the blocks whose loss counts in the window.

    Example:
        >>> from convmoe import MoEConv2d, aux_loss
        >>> model = nn.Sequential(MoEConv2d(3, 4, 1, num_experts=2, losses={"switch_global": 0.01})).train()
        >>> with global_batch(model) as names:
        ...     for micro_batch in torch.randn(2, 4, 3, 5, 5):  # two micro-batches of 4 images
        ...         (model(micro_batch).mean() + aux_loss(model)).backward()
        ...     window = model[0].balancing.window
        >>> names, window.calls, float(window.tokens)
        (['0'], 2, 200.0)
    """
    losses = {name: block.balancing for name, block in moe_blocks(model)
              if isinstance(getattr(block, "balancing", None), BalancingLoss)}
    for loss in losses.values():
        loss.window = FrequencyWindow()
    try:
        yield list(losses)
    finally:
        for loss in losses.values():
            loss.window = None


__all__ = ["global_batch", "global_routing_stats"]
