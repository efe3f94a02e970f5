"""Token-choice top-k routing with optional noise, temperature and capacity."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from convmoe.routers.base import Router, as_groups, capacity_of, normalized_weights
from convmoe.routers.bias_balancing import (
    all_reduce_load,
    bias_update,
    dispatched_load,
    in_backward,
    updates_bias,
)
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

    With ``bias_balancing=gamma > 0`` (auxiliary-loss-free balancing, Wang et al., 2024,
    arXiv:2408.15664, as in DeepSeek-V3) the router keeps a bias ``expert_bias`` (E,), a persistent
    buffer (in the ``state_dict``), added to the probabilities for the top-k choice only: the combine
    weights and the capacity priority come from the unbiased probabilities. After each forward pass
    in training mode with autograd enabled (not in eval, under ``torch.no_grad()``, export, or the
    recomputation of gradient checkpointing) the bias is updated without gradient,
    ``expert_bias += gamma * sign(mean_load - load)``, where ``load[e]`` is the number of dispatched
    slots of expert e in that call (all k slots of every token; slots dropped by capacity excluded)
    and ``mean_load`` its mean over the experts kept by expert dropout. Under ``torch.distributed``
    the loads are summed over ranks first, so every rank holds the same bias. A block called several
    times in one forward pass updates once per call. The routing records the bias it was selected
    with (``Routing.expert_bias``); gradient checkpointing's recomputation selects with the bias of
    the latest updating call again, so it routes as that call did.

    Args:
        in_channels: Input channels C_in.
        num_experts: Experts E.
        top_k: Experts per token.
        bias_balancing: Bias update rate gamma; 0 (the default) keeps no bias.
        **kwargs: As for :class:`~convmoe.routers.Router`.

    Example:
        >>> from convmoe.tokens import create_tokens
        >>> router = TokenChoiceRouter(4, num_experts=8, top_k=2)
        >>> routing = router(create_tokens("pixel").split(torch.randn(2, 4, 3, 3)))
        >>> routing.expert_index.shape, routing.combine_weight.sum(-1).allclose(torch.ones(2, 9))
        (torch.Size([2, 9, 2]), True)
    """

    def __init__(self, in_channels: int, num_experts: int, top_k: int = 1, *, bias_balancing: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(in_channels, num_experts, top_k, **kwargs)
        if not bias_balancing >= 0:  # also refuses NaN
            raise ValueError(f"bias_balancing must be >= 0, got {bias_balancing}; 0.0 turns it off.")
        self.bias_balancing = float(bias_balancing)
        if self.bias_balancing > 0:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32,
                                                            device=kwargs.get("device")))
        else:
            self.expert_bias = None
        # The bias the latest updating call selected with: gradient checkpointing's recomputation (in
        # the backward pass, after the update) selects with it again, so it routes as the forward did.
        self._selected_with: Tensor | None = None

    def forward(self, tokens: Tokens, expert_mask: Tensor | None = None) -> Routing:
        routing = super().forward(tokens, expert_mask)
        if self.expert_bias is not None and updates_bias(self.training):
            with torch.no_grad():
                load = all_reduce_load(dispatched_load(routing))
                self.expert_bias.add_(bias_update(load, self.bias_balancing, expert_mask).to(self.expert_bias.dtype))
            self._selected_with = routing.expert_bias
        return routing

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", bias_balancing={self.bias_balancing}" if self.bias_balancing else "")

    def select(self, logits: Tensor, probs: Tensor, tokens: Tokens, expert_mask: Tensor | None) -> Routing:
        # Checked where it is free: on an accelerator the count would wait for the device at every call
        # (the built-in dropout keeps top_k experts by construction).
        if expert_mask is not None and expert_mask.device.type == "cpu":
            available = int(expert_mask.sum())
            if available < self.top_k:
                raise ValueError(f"only {available} experts are available after expert dropout, fewer than "
                                 f"top_k={self.top_k}; lower the drop rate or top_k.")
        if self.expert_bias is None:
            top_probs, expert_index = probs.topk(self.top_k, dim=-1)
            bias = None
        else:
            # The bias picks the experts; the weights stay the unbiased probabilities of those experts.
            # Experts removed by expert dropout stay out whatever their bias.
            if self.training and self._selected_with is not None and in_backward():
                bias = self._selected_with
            else:
                bias = self.expert_bias.detach().clone()  # the buffer changes after this pass
            scores = probs.detach() + bias.to(probs.dtype)
            if expert_mask is not None:
                scores = scores.masked_fill(~expert_mask, float("-inf"))
            expert_index = scores.topk(self.top_k, dim=-1).indices
            top_probs = probs.gather(-1, expert_index)
        if self.capacity_factor is None:
            weight = normalized_weights(top_probs)
            routing = Routing.from_top_k(logits, probs, expert_index, weight, expert_mask)
            return routing if bias is None else dataclasses.replace(routing, expert_bias=bias)

        grouped_index = as_groups(expert_index, tokens)
        capacity = capacity_of(self.capacity_factor, grouped_index.shape[1], self.top_k, self.num_experts)
        keep = capacity_keep_mask(grouped_index, as_groups(top_probs, tokens), self.num_experts, capacity)
        keep = keep.reshape(expert_index.shape)
        # Renormalise over the kept slots, as expert choice does: a token that keeps any slot gets
        # weights summing to 1 (an upcycled block stays exact there); a fully dropped token gets 0.
        weight = normalized_weights(top_probs, keep)
        return Routing(logits=logits, probs=probs, expert_index=expert_index, combine_weight=weight,
                       slot_mask=keep, dropped=~keep.any(dim=-1), capacity=capacity,
                       capacity_groups=grouped_index.shape[0], expert_mask=expert_mask, expert_bias=bias)
