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

    def by_expert(self, num_experts: int) -> tuple[Assignments, Tensor]:
        """The rows grouped by expert (stable), and the rows of each expert as an (E,) int64 tensor.

        Nothing here waits for the device: the counts stay a tensor.
        """
        order = self.expert.argsort(stable=True)
        counts = torch.zeros(num_experts, dtype=torch.int64, device=self.expert.device)
        counts.index_add_(0, self.expert, torch.ones_like(self.expert))
        return self.subset(order), counts

    def sorted_by_expert(self, num_experts: int) -> tuple[Assignments, list[int]]:
        """The rows grouped by expert (stable), and the number of rows of each expert."""
        part, counts = self.by_expert(num_experts)
        return part, counts.tolist()


def routed(routing: Routing) -> Assignments:
    """The dispatched slots of ``routing``: only the experts each token really visits.

    Routing without a capacity limit keeps every slot (a slot that is not dispatched, if any, has
    weight 0): selecting the dispatched ones would wait for an accelerator, and on the CPU costs a
    ``nonzero`` and four gathers for slots that are nearly always all dispatched.

    Example:
        >>> r = Routing.from_top_k(torch.zeros(1, 2, 3), torch.full((1, 2, 3), 1 / 3),
        ...                        torch.tensor([[[2], [0]]]), torch.ones(1, 2, 1))
        >>> a = routed(r)
        >>> a.token.tolist(), a.expert.tolist()
        ([0, 1], [2, 0])
    """
    if routing.capacity is None:
        B, N, k = routing.expert_index.shape
        weight = routing.combine_weight * routing.slot_mask.to(routing.combine_weight.dtype)
        batch = torch.arange(B, device=weight.device).repeat_interleave(N * k)
        token = torch.arange(N, device=weight.device).repeat_interleave(k).repeat(B)
        return Assignments(batch, token, routing.expert_index.flatten(), weight.flatten())
    batch, token, slot = routing.slot_mask.nonzero(as_tuple=True)
    return Assignments(batch, token, routing.expert_index[batch, token, slot], routing.combine_weight[batch, token, slot])


def every_pair(routing: Routing) -> Assignments:
    """Every (token, expert) pair, weighted by the routing (zero where not chosen): the reference.

    Example:
        >>> r = Routing.from_top_k(torch.zeros(1, 2, 3), torch.full((1, 2, 3), 1 / 3),
        ...                        torch.tensor([[[2], [0]]]), torch.ones(1, 2, 1))
        >>> every_pair(r).weight.tolist()  # token 0 -> expert 2, token 1 -> expert 0
        [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    """
    B, N, E = routing.probs.shape
    weight = routing.dense_weights()
    batch, token, expert = torch.meshgrid(
        *(torch.arange(n, device=weight.device) for n in (B, N, E)), indexing="ij")
    return Assignments(batch.flatten(), token.flatten(), expert.flatten(), weight.flatten())
