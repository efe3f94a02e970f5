"""Token-choice top-k routing with optional noise, temperature and capacity."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from convmoe.routers.base import Router, as_groups, capacity_of, normalized_weights
from convmoe.types import Routing, Tokens


def capacity_keep_mask(expert_index: Tensor, priority: Tensor, num_experts: int, capacity: int) -> Tensor:
    """Which slots fit in their expert's capacity, highest priority first, (G, T, k) bool.

    Args:
        expert_index: Expert of every slot, (G, T, k).
        priority: Priority of every slot (the router probability), (G, T, k).
        num_experts: E.
        capacity: Slots each expert takes per group.

    Example:
        >>> index = torch.tensor([[[0], [0], [1]]])
        >>> capacity_keep_mask(index, torch.tensor([[[0.6], [0.9], [0.5]]]), 2, capacity=1)[..., 0]
        tensor([[False,  True,  True]])
    """
    G, T, k = expert_index.shape
    flat_index = expert_index.reshape(G, T * k)
    # ONNX has no stable sort; a plain sort exports to TopK, which breaks ties by the lower index as a
    # stable sort does.
    flat_priority = priority.reshape(G, T * k)
    if torch.compiler.is_exporting():
        order = flat_priority.argsort(dim=1, descending=True)
    else:
        order = flat_priority.argsort(dim=1, descending=True, stable=True)
    sorted_index = flat_index.gather(1, order)
    one_hot = F.one_hot(sorted_index, num_experts)
    position = (one_hot.cumsum(dim=1) * one_hot).sum(-1) - 1
    keep_sorted = position < capacity
    keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
    return keep.reshape(G, T, k)


class TokenChoiceRouter(Router):
    """Each token picks its top-k experts (Shazeer et al., 2017, arXiv:1701.06538).

    Combine weights are the chosen probabilities renormalised to sum to 1. With
    ``capacity_factor`` set, each expert takes at most ``ceil(cf * T * k / E)`` slots per image
    (per batch for image tokens), highest router probability first, and the rest are dropped; the
    weights are renormalised over a token's kept slots (0 for a token that keeps none).

    Example:
        >>> from convmoe.tokens import create_tokens
        >>> router = TokenChoiceRouter(4, num_experts=8, top_k=2)
        >>> routing = router(create_tokens("pixel").split(torch.randn(2, 4, 3, 3)))
        >>> routing.expert_index.shape, routing.combine_weight.sum(-1).allclose(torch.ones(2, 9))
        (torch.Size([2, 9, 2]), True)
    """

    def select(self, logits: Tensor, probs: Tensor, tokens: Tokens, expert_mask: Tensor | None) -> Routing:
        # Checked where it is free: on an accelerator the count would wait for the device at every call
        # (the built-in dropout keeps top_k experts by construction).
        if expert_mask is not None and expert_mask.device.type == "cpu":
            available = int(expert_mask.sum())
            if available < self.top_k:
                raise ValueError(f"only {available} experts are available after expert dropout, fewer than "
                                 f"top_k={self.top_k}; lower the drop rate or top_k.")
        top_probs, expert_index = probs.topk(self.top_k, dim=-1)
        if self.capacity_factor is None:
            weight = normalized_weights(top_probs)
            return Routing.from_top_k(logits, probs, expert_index, weight, expert_mask)

        grouped_index = as_groups(expert_index, tokens)
        capacity = capacity_of(self.capacity_factor, grouped_index.shape[1], self.top_k, self.num_experts)
        keep = capacity_keep_mask(grouped_index, as_groups(top_probs, tokens), self.num_experts, capacity)
        keep = keep.reshape(expert_index.shape)
        # Renormalise over the kept slots, as expert choice does: a token that keeps any slot gets
        # weights summing to 1 (an upcycled block stays exact there); a fully dropped token gets 0.
        weight = normalized_weights(top_probs, keep)
        return Routing(logits=logits, probs=probs, expert_index=expert_index, combine_weight=weight,
                       slot_mask=keep, dropped=~keep.any(dim=-1), capacity=capacity,
                       capacity_groups=grouped_index.shape[0], expert_mask=expert_mask)
