"""Balancing losses as pure functions of router outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def switch_loss(probs: Tensor, num_experts: int) -> Tensor:
    """Switch load-balancing loss, E * sum_i f_i * P_i (Fedus et al., 2021, arXiv:2101.03961).

    ``f_i`` is the share of tokens whose first choice (highest probability) is expert i, ``P_i`` the
    mean router probability of expert i. Only ``P`` carries gradient.

    Args:
        probs: Router probabilities, (..., E).
        num_experts: E.

    Returns:
        A scalar; 1.0 for perfectly uniform routing, E for total collapse.

    Example:
        >>> switch_loss(torch.tensor([[0.75, 0.25], [0.25, 0.75]]), 2)
        tensor(1.)
    """
    flat = probs.reshape(-1, num_experts)
    first = first_choice_counts(flat, num_experts).to(flat.dtype) / flat.shape[0]
    return num_experts * (first * flat.mean(dim=0)).sum()


def first_choice_counts(probs: Tensor, num_experts: int) -> Tensor:
    """Tokens whose highest-probability expert is each expert, (E,) float32.

    Example:
        >>> first_choice_counts(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), 2).tolist()
        [2.0, 1.0]
    """
    flat = probs.detach().reshape(-1, num_experts)
    return F.one_hot(flat.argmax(dim=-1), num_experts).sum(dim=0).float()


def importance_loss(probs: Tensor) -> Tensor:
    """Squared coefficient of variation of expert importance (Shazeer et al., 2017, arXiv:1701.06538).

    Importance_i is the sum over tokens of the router probability of expert i; the loss is
    ``var(importance) / mean(importance)^2`` with the population variance.

    Example:
        >>> importance_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        tensor(1.)
    """
    importance = probs.reshape(-1, probs.shape[-1]).sum(dim=0)
    return importance.var(unbiased=False) / importance.mean().pow(2).clamp_min(1e-12)


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss, mean over tokens of logsumexp(logits)^2 (Zoph et al., 2022, arXiv:2202.08906).

    Keeps logits small, which keeps the router stable in low precision.

    Example:
        >>> z_loss(torch.zeros(2, 4))  # logsumexp = log 4
        tensor(1.9218)
    """
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def diversity_loss(probs: Tensor) -> Tensor:
    """Mean cosine similarity between the routing-probability profiles of distinct experts.

    Expert i's profile is its probability over all tokens (a column of ``probs``); the loss is the
    mean of ``cos(profile_i, profile_j)`` over pairs i != j: 1 when experts are routed alike, 0 when
    they take disjoint tokens. Penalising it pushes experts to specialise.

    Example:
        >>> diversity_loss(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        tensor(0.)
    """
    flat = probs.reshape(-1, probs.shape[-1])
    E = flat.shape[-1]
    if E < 2:
        return flat.new_zeros(())
    profiles = F.normalize(flat, dim=0)
    similarity = profiles.t() @ profiles
    off_diagonal = similarity.sum() - similarity.diagonal().sum()
    return off_diagonal / (E * (E - 1))
