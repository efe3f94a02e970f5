"""Expert-choice routing: every expert picks its top tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from convmoe.routers.base import DEFAULT_CAPACITY_FACTOR, Router, as_groups, capacity_of, normalized_weights
from convmoe.types import Routing, Tokens


class ExpertChoiceRouter(Router):
    """Each expert takes the ``ceil(cf * T * k / E)`` tokens it scores highest (Zhou et al., 2022,
    arXiv:2202.09368).

    Load is perfectly balanced by construction, so no balancing loss is needed. A token may be
    taken by several experts or by none (then it is ``dropped`` and its output is zero). Groups are
    per image, or the whole batch for image tokens; in the latter case a sample's routing depends on
    the rest of the batch. Combine weights are the token's chosen probabilities renormalised to sum to 1.

    Args:
        in_channels: Input channels C_in.
        num_experts: Experts E.
        top_k: Average experts per token k; the capacity is ``ceil(cf * T * k / E)``.
        **kwargs: As for :class:`Router`; ``capacity_factor`` defaults to ``DEFAULT_CAPACITY_FACTOR`` (1.25).

    Example:
        >>> from convmoe.tokens import create_tokens
        >>> router = ExpertChoiceRouter(4, num_experts=4, top_k=1, capacity_factor=1.0)
        >>> routing = router(create_tokens("pixel").split(torch.randn(1, 4, 4, 4)))
        >>> routing.expert_load().tolist()
        [4.0, 4.0, 4.0, 4.0]
    """

    def __init__(self, in_channels: int, num_experts: int, top_k: int = 1, **kwargs: Any) -> None:
        if kwargs.pop("bias_balancing", 0.0):
            raise ValueError("bias_balancing does not apply to expert-choice routing (it balances load by "
                             "construction); use bias_balancing=0.0 or router='token_choice'.")
        if kwargs.get("capacity_factor") is None:
            kwargs["capacity_factor"] = DEFAULT_CAPACITY_FACTOR
        super().__init__(in_channels, num_experts, top_k, **kwargs)

    def select(self, logits: Tensor, probs: Tensor, tokens: Tokens, expert_mask: Tensor | None) -> Routing:
        grouped = as_groups(probs, tokens)  # (G, T, E)
        G, T, E = grouped.shape
        capacity = capacity_of(self.capacity_factor, T, self.top_k, E)
        if tokens.group_over_batch and isinstance(capacity, torch.SymInt):
            raise ValueError("expert-choice routing of 'image' tokens picks among the whole batch, so its capacity "
                             "is a function of the batch size: export it with a static batch (no dynamic batch "
                             "dimension), or use router='token_choice'.")
        chosen = grouped.transpose(1, 2).topk(capacity, dim=-1).indices  # (G, E, C)
        selected = torch.zeros(G, E, T, dtype=torch.bool, device=probs.device)
        selected.scatter_(2, chosen, True)
        selected = selected.transpose(1, 2)
        if expert_mask is not None:
            selected = selected & expert_mask
        selected = selected.reshape(probs.shape)
        weight = normalized_weights(probs, selected)
        expert_index = torch.arange(E, device=probs.device).expand(probs.shape)
        return Routing(logits=logits, probs=probs, expert_index=expert_index, combine_weight=weight,
                       slot_mask=selected, dropped=~selected.any(dim=-1), capacity=capacity, capacity_groups=G,
                       expert_mask=expert_mask)
