"""MoE blocks under data parallelism: what is reduced across ranks, and the routing statistics of all ranks.

Under ``DistributedDataParallel`` (or FSDP) each rank routes its own batch. What crosses ranks:

| quantity | across ranks | why |
|---|---|---|
| gradients, expert weights included | averaged by DDP / FSDP | experts are one stacked parameter per block: an expert without tokens on a rank still gets a zero gradient slice, so ``find_unused_parameters=False`` works |
| balancing (aux) losses, ``convmoe.aux_loss`` | **not** reduced: each rank's loss is computed on its local batch | as in GShard and Switch (per-device groups); DDP averages their gradients, which is single-process training with the aux loss averaged over ``world_size`` slices of the global batch. No collective in the forward pass |
| capacity | per image (per local batch for ``image`` tokens) | routing of a sample never waits for another rank |
| routing statistics, ``convmoe.routing_stats`` | local to the rank | cheap to log every step |
| routing statistics, :func:`global_routing_stats` | summed over ranks (one ``all_reduce``) | expert utilisation, dead experts and drop rate of the whole global batch: an expert idle on one rank may be busy on another |

The task loss, with equal local batch sizes, gives the gradients of single-process training on the
global batch (DDP averages, the loss is a mean). Wrap BatchNorm in ``SyncBatchNorm`` as usual.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from convmoe.diagnostics import ModelRoutingStats, _normalized_entropy, moe_blocks
from convmoe.types import Routing, RoutingStats

# Layout of one block's count vector after the E expert loads.
_TOKENS, _DROPPED, _ENTROPY_SUM, _ROWS, _CAPACITY, _MEDOE_RANKS, _MEDOE_UTIL, _MEDOE_ENTROPY = range(8)


def routing_counts(routing: Routing) -> Tensor:
    """Sums that add across ranks: expert loads (E), then tokens, dropped tokens, summed router
    entropy, entropy rows, total capacity and the MEDoE terms, as one float64 vector (E + 8,).

    Example:
        >>> r = Routing.from_top_k(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 0.5),
        ...                        torch.tensor([[[0], [1]]]), torch.ones(1, 2, 1))
        >>> routing_counts(r)[:4].tolist()
        [1.0, 1.0, 2.0, 0.0]
    """
    E = routing.num_experts
    load = routing.expert_load().double().cpu()
    probs = routing.probs.detach().reshape(-1, E).double()
    entropy = -(probs.clamp_min(1e-12).log() * probs).sum(-1) / math.log(E) if E > 1 else torch.ones(probs.shape[0])
    extra = torch.zeros(8, dtype=torch.float64)
    extra[_TOKENS] = routing.dropped.numel()
    extra[_DROPPED] = float(routing.dropped.sum())
    extra[_ENTROPY_SUM] = float(entropy.sum())
    extra[_ROWS] = probs.shape[0]
    if routing.capacity is not None:
        extra[_CAPACITY] = E * routing.capacity * routing.capacity_groups
    if routing.expert_mask is not None:
        kept = routing.expert_mask.cpu()
        kept_load = load[kept]
        kept_total = float(kept_load.sum())
        extra[_MEDOE_RANKS] = 1.0
        extra[_MEDOE_UTIL] = float((kept_load > 0).double().mean())
        extra[_MEDOE_ENTROPY] = (_normalized_entropy(kept_load / kept_total, int(kept.sum()))
                                 if kept_total > 0 else 0.0)
    return torch.cat([load, extra])


def stats_from_counts(counts: Tensor, num_experts: int) -> RoutingStats:
    """:class:`~convmoe.types.RoutingStats` from (summed) :func:`routing_counts`; the MEDoE terms are
    means over the ranks that ran expert dropout.

    Example:
        >>> r = Routing.from_top_k(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 0.5),
        ...                        torch.tensor([[[0], [1]]]), torch.ones(1, 2, 1))
        >>> stats_from_counts(routing_counts(r), 2).utilization
        [0.5, 0.5]
    """
    E = num_experts
    load, extra = counts[:E].double().cpu(), counts[E:].double().cpu()
    total = float(load.sum())
    utilization = load / total if total > 0 else torch.zeros(E, dtype=torch.float64)
    mean_load = total / E
    medoe_ranks = float(extra[_MEDOE_RANKS])
    return RoutingStats(
        num_experts=E,
        tokens=int(extra[_TOKENS]),
        utilization=[round(float(u), 6) for u in utilization],
        utilization_entropy=_normalized_entropy(utilization, E) if total > 0 else 0.0,
        router_entropy=float(extra[_ENTROPY_SUM] / extra[_ROWS]) if extra[_ROWS] > 0 else 0.0,
        imbalance=float(load.max()) / mean_load if mean_load > 0 else 0.0,
        dropped_rate=float(extra[_DROPPED] / extra[_TOKENS]) if extra[_TOKENS] > 0 else 0.0,
        capacity_ratio=total / float(extra[_CAPACITY]) if extra[_CAPACITY] > 0 else None,
        dead_experts=[e for e in range(E) if load[e] == 0],
        active_experts=[e for e in range(E) if load[e] > 0],
        medoe_expert_utilization=float(extra[_MEDOE_UTIL]) / medoe_ranks if medoe_ranks else None,
        medoe_expert_entropy=float(extra[_MEDOE_ENTROPY]) / medoe_ranks if medoe_ranks else None,
    )


def global_routing_stats(model: nn.Module, group: dist.ProcessGroup | None = None) -> ModelRoutingStats:
    """Routing statistics of the last forward pass over the batches of all ranks (a collective).

    Every rank must call it after the same forward passes (the blocks are matched by order). The
    loads, drop counts and router entropies are summed over ranks with one ``all_reduce``, so the
    result equals ``convmoe.routing_stats`` of one process that routed the global batch (for
    ``image`` tokens with a capacity limit, capacity stays per rank). Without an initialised process
    group it is ``convmoe.routing_stats(model)``.

    Args:
        model: The model (or its DDP/FSDP wrapper).
        group: The process group; the default group when None.

    Raises:
        ValueError: A block has not run a forward pass on this rank.

    Example:
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(3, 4, 3, padding=1, num_experts=4))
        >>> _ = model(torch.randn(2, 3, 8, 8))
        >>> global_routing_stats(model)["0"].tokens
        128
    """
    blocks = list(moe_blocks(model))
    missing = [name for name, block in blocks if block.last_routing is None]
    if missing:
        raise ValueError(f"global_routing_stats(): blocks {missing} have no routing yet on this rank; run the same "
                         "forward pass on every rank first.")
    vectors = [routing_counts(block.last_routing) for _, block in blocks]
    if vectors and dist.is_available() and dist.is_initialized():
        flat = torch.cat(vectors)
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        flat = flat.to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        vectors = list(flat.cpu().split([v.numel() for v in vectors]))
    return ModelRoutingStats({name: stats_from_counts(counts, block.last_routing.num_experts)
                              for (name, block), counts in zip(blocks, vectors, strict=True)})


__all__ = ["global_routing_stats"]
