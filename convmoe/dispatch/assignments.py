"""Flat (batch, token, expert, weight) lists: what a dispatcher actually sends where."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from convmoe.types import Routing


@dataclass(frozen=True)
class Assignments:
    """One row per dispatched (token, expert) pair.

    Attributes:
        batch: Image of the token, (M,) int64.
        token: Token within the image, (M,) int64.
        expert: Expert, (M,) int64.
        weight: Combine weight, (M,).

    Example:
        >>> r = Routing.from_top_k(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 0.5),
        ...                        torch.tensor([[[1], [0]]]), torch.ones(1, 2, 1))
        >>> routed(r).expert.tolist()
        [1, 0]
    """

    batch: Tensor
    token: Tensor
    expert: Tensor
    weight: Tensor

    def subset(self, keep: Tensor) -> Assignments:
        return Assignments(self.batch[keep], self.token[keep], self.expert[keep], self.weight[keep])

    def sorted_by_expert(self, num_experts: int) -> tuple[Assignments, list[int]]:
        """The rows grouped by expert (stable), and the number of rows of each expert."""
        order = self.expert.argsort(stable=True)
        counts = torch.bincount(self.expert, minlength=num_experts).tolist()
        return self.subset(order), counts


def routed(routing: Routing) -> Assignments:
    """The dispatched slots of ``routing``: only the experts each token really visits."""
    batch, token, slot = routing.slot_mask.nonzero(as_tuple=True)
    return Assignments(batch, token, routing.expert_index[batch, token, slot], routing.combine_weight[batch, token, slot])


def every_pair(routing: Routing) -> Assignments:
    """Every (token, expert) pair, weighted by the routing (zero where not chosen): the reference."""
    B, N, E = routing.probs.shape
    weight = routing.dense_weights()
    batch, token, expert = torch.meshgrid(
        *(torch.arange(n, device=weight.device) for n in (B, N, E)), indexing="ij")
    return Assignments(batch.flatten(), token.flatten(), expert.flatten(), weight.flatten())
