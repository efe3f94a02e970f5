"""The router protocol and the shared part of every built-in router: gate, noise, temperature, mask."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from convmoe.gates import create_gate
from convmoe.types import Routing, Tokens


class Router(nn.Module):
    """Base class: logits from a gate, then a selection rule implemented by ``select``.

    Subclasses implement ``select(logits, probs, tokens, expert_mask) -> Routing``. Logits and
    probabilities are computed in float32 with autocast off: half-precision logits overflow and
    bfloat16 ties near-equal experts.

    Args:
        in_channels: Input channels C_in.
        num_experts: Experts E.
        top_k: Experts per token (token choice) or average experts per token (expert choice).
        gate: Gate name, class or instance producing the logits.
        noise_std: Std of Gaussian noise added to the logits in training (noisy gating); 0 disables it.
        temperature: Softmax temperature tau in ``softmax(logits / tau)``.
        capacity_factor: Capacity multiplier; None means unlimited where the rule allows it.
        gate_kwargs: Extra keyword arguments for the gate.
    """

    default_gate = "linear"

    def __init__(self, in_channels: int, num_experts: int, top_k: int = 1, *, gate: Any = None,
                 noise_std: float = 0.0, temperature: float = 1.0, capacity_factor: float | None = None,
                 gate_kwargs: dict[str, Any] | None = None, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]; lower top_k or raise num_experts.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}.")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}.")
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_std = noise_std
        self.temperature = temperature
        self.capacity_factor = capacity_factor
        self.gate = create_gate(gate or self.default_gate, in_channels, num_experts,
                                **(gate_kwargs or {}), device=device, dtype=dtype)

    def forward(self, tokens: Tokens, expert_mask: Tensor | None = None) -> Routing:
        with torch.autocast(device_type=tokens.source.device.type, enabled=False):
            logits = self.gate(tokens).float()
            if self.training and self.noise_std > 0:
                logits = logits + torch.randn_like(logits) * self.noise_std
            if expert_mask is not None:
                logits = logits.masked_fill(~expert_mask, float("-inf"))
            probs = torch.softmax(logits / self.temperature, dim=-1)
            return self.select(logits, probs, tokens, expert_mask)

    def select(self, logits: Tensor, probs: Tensor, tokens: Tokens, expert_mask: Tensor | None) -> Routing:
        raise NotImplementedError

    def extra_repr(self) -> str:
        parts = [f"experts={self.num_experts}", f"top_k={self.top_k}"]
        if self.noise_std:
            parts.append(f"noise_std={self.noise_std}")
        if self.temperature != 1.0:
            parts.append(f"temperature={self.temperature}")
        if self.capacity_factor is not None:
            parts.append(f"capacity_factor={self.capacity_factor}")
        return ", ".join(parts)


def as_groups(tensor: Tensor, tokens: Tokens) -> Tensor:
    """(B, N, ...) -> (G, T, ...): per image, or one group for the whole batch with image tokens."""
    if tokens.group_over_batch:
        return tensor.reshape(1, -1, *tensor.shape[2:])
    return tensor


def normalized_weights(selected_probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Chosen probabilities over their detached sum: the weights sum to 1 in the forward pass.

    The denominator is detached so that a single chosen expert still passes a gradient (of log p) to
    the router, and an upcycled block with equal experts reproduces the dense conv exactly.

    Example:
        >>> normalized_weights(torch.tensor([[0.3, 0.1]]))
        tensor([[0.7500, 0.2500]])
    """
    if mask is not None:
        selected_probs = selected_probs * mask.to(selected_probs.dtype)
    total = selected_probs.sum(dim=-1, keepdim=True).detach()
    return selected_probs / total.clamp_min(torch.finfo(selected_probs.dtype).tiny)


def capacity_of(capacity_factor: float, tokens_per_group: int, top_k: int, num_experts: int) -> int:
    """ceil(capacity_factor * T * k / E), at least 1 and at most T.

    Example:
        >>> capacity_of(1.25, tokens_per_group=64, top_k=2, num_experts=8)
        20
    """
    capacity = math.ceil(capacity_factor * tokens_per_group * top_k / num_experts)
    return int(min(max(capacity, 1), tokens_per_group))
