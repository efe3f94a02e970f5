"""Aux losses and routing statistics of a whole model, collected from its MoE blocks.

Both read the blocks that ran in the model's latest forward pass, every call of each (see
:mod:`convmoe.scope`): a block skipped by layer drop or an early exit adds nothing, a block called
once per pyramid level adds every level.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from convmoe.scope import ensure_forward_scope
from convmoe.types import Routing, RoutingStats


def moe_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, block) for every MoE block in ``model`` (anything with ``last_aux``).

    Example:
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(3, 4, 1), nn.ReLU(), MoEConv2d(4, 4, 1))
        >>> [name for name, _ in moe_blocks(model)]
        ['0', '2']
    """
    for name, module in model.named_modules():
        if hasattr(module, "last_aux") and hasattr(module, "last_routing"):
            yield name, module


def aux_loss(model: nn.Module) -> Tensor:
    """Weighted sum of every MoE block's balancing losses from the model's latest forward pass.

    A differentiable scalar to add to the task loss; ``0`` when the model has no MoE block or its
    blocks have no losses, and after a forward pass in eval mode or under ``torch.no_grad()``: the
    blocks compute balancing losses only where they can be trained on. Blocks that did not run in that pass add nothing; a block that ran
    several times (a shared head) adds every call. Pass the module you call (the model, or its
    DDP / ``torch.compile`` wrapper): the first call adds a forward scope to a model that has none
    (:func:`convmoe.scope.add_forward_scope`; ``convmoe.patch`` adds it up front), which from the
    next forward pass on tells which blocks ran in it.

    Example:
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(3, 4, 3, padding=1), MoEConv2d(4, 4, 3, padding=1))
        >>> _ = model(torch.randn(2, 3, 8, 8))
        >>> aux_loss(model).requires_grad
        True
    """
    ensure_forward_scope(model)
    terms = [block.last_aux.total for _, block in moe_blocks(model) if block.last_aux is not None]
    if not terms:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack([t.to(terms[0].device) for t in terms]).sum()


def _normalized_entropy(distribution: Tensor, size: int) -> float:
    if size < 2:
        return 1.0
    p = distribution[distribution > 0]
    return float(-(p * p.log()).sum() / math.log(size)) + 0.0  # + 0.0: one expert gives 0.0, not -0.0


def compute_stats(routing: Routing) -> RoutingStats:
    """Statistics of one routing decision.

    Example:
        >>> r = Routing.from_top_k(torch.zeros(1, 4, 2), torch.full((1, 4, 2), 0.5),
        ...                        torch.tensor([[[0], [1], [0], [1]]]), torch.ones(1, 4, 1))
        >>> s = compute_stats(r)
        >>> s.utilization, s.imbalance, s.dead_experts
        ([0.5, 0.5], 1.0, [])
    """
    E = routing.num_experts
    load = routing.expert_load().cpu()
    total = float(load.sum())
    utilization = load / total if total > 0 else torch.zeros(E)
    probs = routing.probs.detach().reshape(-1, E).float()
    router_entropy = -(probs.clamp_min(1e-12).log() * probs).sum(-1).mean() / math.log(E) if E > 1 else probs.new_ones(())
    mean_load = total / E
    capacity_ratio = None
    if routing.capacity is not None:
        capacity_ratio = total / (E * routing.capacity * routing.capacity_groups)
    medoe_utilization = medoe_entropy = None
    if routing.expert_mask is not None:
        kept = routing.expert_mask.cpu()
        kept_load = load[kept]
        medoe_utilization = float((kept_load > 0).float().mean())
        kept_total = float(kept_load.sum())
        medoe_entropy = _normalized_entropy(kept_load / kept_total, int(kept.sum())) if kept_total > 0 else 0.0
    return RoutingStats(
        num_experts=E,
        tokens=int(routing.dropped.numel()),
        utilization=[round(float(u), 6) for u in utilization],
        utilization_entropy=_normalized_entropy(utilization, E) if total > 0 else 0.0,
        router_entropy=float(router_entropy),
        imbalance=float(load.max()) / mean_load if mean_load > 0 else 0.0,
        dropped_rate=float(routing.dropped.float().mean()),
        capacity_ratio=capacity_ratio,
        dead_experts=[e for e in range(E) if load[e] == 0],
        active_experts=[e for e in range(E) if load[e] > 0],
        medoe_expert_utilization=medoe_utilization,
        medoe_expert_entropy=medoe_entropy,
        expert_bias=expert_bias_of(routing),
    )


def expert_bias_of(routing: Routing) -> list[float] | None:
    """The routing's bias-balancing bias as python floats (None when its router keeps none).

    Example:
        >>> expert_bias_of(Routing.from_top_k(torch.zeros(1, 1, 2), torch.full((1, 1, 2), 0.5),
        ...                                   torch.tensor([[[0]]]), torch.ones(1, 1, 1))) is None
        True
    """
    if routing.expert_bias is None:
        return None
    return [round(float(b), 6) for b in routing.expert_bias.detach().cpu()]


# Layout of one block's count vector after the E expert loads.
_TOKENS, _DROPPED, _ENTROPY_SUM, _ROWS, _CAPACITY, _MEDOE_RANKS, _MEDOE_UTIL, _MEDOE_ENTROPY = range(8)
_COUNT_FIELDS = 8


def routing_counts(routing: Routing) -> Tensor:
    """Sums that add across ranks and calls: expert loads (E), then tokens, dropped tokens, summed
    router entropy, entropy rows, total capacity and the MEDoE terms, as one float64 vector (E + 8,).

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
    extra = torch.zeros(_COUNT_FIELDS, dtype=torch.float64)
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


def stats_of_calls(routings: Sequence[Routing]) -> RoutingStats:
    """Statistics over several routings of one block (its calls in one forward pass), as if concatenated.

    Loads, tokens and drops add up, router entropy is the mean over all rows, the expert bias is the
    last call's; one routing gives :func:`compute_stats`.

    Example:
        >>> r = Routing.from_top_k(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 0.5),
        ...                        torch.tensor([[[0], [0]]]), torch.ones(1, 2, 1))
        >>> stats_of_calls([r, r]).tokens, stats_of_calls([r, r]).utilization
        (4, [1.0, 0.0])
    """
    if len(routings) == 1:
        return compute_stats(routings[0])
    counts = torch.stack([routing_counts(routing) for routing in routings]).sum(dim=0)
    stats = stats_from_counts(counts, routings[0].num_experts)
    return dataclasses.replace(stats, expert_bias=expert_bias_of(routings[-1]))


@dataclass(frozen=True)
class ModelRoutingStats:
    """Routing statistics of every MoE block, and their aggregate.

    Attributes:
        blocks: Block name -> its :class:`~convmoe.types.RoutingStats`.

    Example:
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(3, 4, 3, padding=1, num_experts=4))
        >>> _ = model(torch.randn(2, 3, 8, 8))
        >>> stats = routing_stats(model)
        >>> stats.summary()["blocks"], stats["0"].tokens
        (1, 128)
    """

    blocks: dict[str, RoutingStats]

    def summary(self) -> dict[str, float]:
        """Means over blocks of the scalar statistics, the total of dead experts, and the worst imbalance.

        Example:
            >>> ModelRoutingStats({}).summary()
            {}
        """
        if not self.blocks:
            return {}
        stats = list(self.blocks.values())
        mean = lambda values: float(sum(values) / len(values))  # noqa: E731
        out = {
            "blocks": len(stats),
            "utilization_entropy": mean([s.utilization_entropy for s in stats]),
            "router_entropy": mean([s.router_entropy for s in stats]),
            "imbalance_mean": mean([s.imbalance for s in stats]),
            "imbalance_max": max(s.imbalance for s in stats),
            "dropped_rate": mean([s.dropped_rate for s in stats]),
            "dead_experts": sum(len(s.dead_experts) for s in stats),
            "active_experts": mean([len(s.active_experts) for s in stats]),
        }
        medoe = [s for s in stats if s.medoe_expert_utilization is not None]
        if medoe:
            out["medoe_expert_utilization"] = mean([s.medoe_expert_utilization for s in medoe])
            out["medoe_expert_entropy"] = mean([s.medoe_expert_entropy for s in medoe])
        return out

    def table(self) -> str:
        """A plain-text table, one row per block, and below a block with bias balancing a row with its expert bias."""
        header = f"{'block':<32} {'experts':>7} {'util.entropy':>12} {'router.entropy':>14} {'imbalance':>9} " \
                 f"{'dropped':>7} {'dead':>4}"
        rows = [header, "-" * len(header)]
        for name, s in self.blocks.items():
            label = name or "(the block itself)"
            rows.append(f"{label:<32} {len(s.active_experts):>3}/{s.num_experts:<3} {s.utilization_entropy:>12.3f} "
                        f"{s.router_entropy:>14.3f} {s.imbalance:>9.2f} {s.dropped_rate:>7.1%} {len(s.dead_experts):>4}")
            if s.expert_bias is not None:
                rows.append(f"{'  expert bias':<32} " + " ".join(f"{b:+.4f}" for b in s.expert_bias))
        return "\n".join(rows)

    def __getitem__(self, name: str) -> RoutingStats:
        return self.blocks[name]


def routing_stats(model: nn.Module) -> ModelRoutingStats:
    """Per-block and aggregated routing statistics of the model's latest forward pass.

    Only blocks that ran in that pass are listed; a block that ran several times (a shared head)
    gives the statistics of all its calls together. The statistics are computed here, from the
    routing each block keeps, so they cost nothing in a forward pass (eval included) that nobody reads. Like :func:`aux_loss`, the first call adds a
    forward scope to a model that has none.

    Example:
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(3, 4, 3, padding=1, num_experts=4))
        >>> _ = model(torch.randn(2, 3, 8, 8))
        >>> stats = routing_stats(model)
        >>> list(stats.blocks), stats["0"].num_experts
        (['0'], 4)
    """
    ensure_forward_scope(model)
    return ModelRoutingStats({name: stats_of_calls(routings) for name, block in moe_blocks(model)
                              if (routings := _routings(block))})


def _routings(block: nn.Module) -> tuple[Routing, ...]:
    """Every call's routing in the current forward pass (a block without ``forward_routings``: its last)."""
    routings = getattr(block, "forward_routings", None)
    if routings is not None:
        return tuple(routings)
    return () if block.last_routing is None else (block.last_routing,)
