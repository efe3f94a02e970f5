"""The router protocol and the shared part of every built-in router: gate, noise, temperature, mask."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from convmoe.gates import create_gate
from convmoe.recording import reads_on_host
from convmoe.types import Routing, Tokens

# Capacity of routers that need one when the config leaves it out (expert choice, positional): the
# one home of this default.
DEFAULT_CAPACITY_FACTOR = 1.25


class Router(nn.Module):
    """Base class: logits from a gate, then a selection rule implemented by ``select``.

    Subclasses implement ``select(logits, probs, tokens, expert_mask) -> Routing``. Logits and
    probabilities are computed in float32 with autocast off: half-precision logits overflow and
    bfloat16 ties near-equal experts.

    Non-finite input: a token whose logits are not all finite (NaN or Inf in its features, or an
    overflow) is routed at the lowest priority: it never takes capacity from a finite token and
    never changes which experts a finite token visits. Its slots go to available experts with
    combine weight NaN, so its output is NaN (the whole region for grid, patch and image tokens),
    as a convolution's output over a NaN input would be; nothing is silently sent to one expert.
    Its logits and probabilities are NaN, so the aux losses of that pass are NaN too (as the task
    loss is) and ``routing_stats`` shows a NaN router entropy. No check waits for the device and
    nothing raises, so AMP's GradScaler still sees the overflow and skips the step.

    Args:
        in_channels: Input channels C_in.
        num_experts: Experts E.
        top_k: Experts per token (token choice) or average experts per token (expert choice).
        gate: Gate name, class or instance producing the logits.
        noise_std: Std of Gaussian noise added to the logits in training (noisy gating); 0 disables it.
        temperature: Softmax temperature tau in ``softmax(logits / tau)``.
        capacity_factor: Capacity multiplier; None means unlimited where the rule allows it.
        gate_kwargs: Extra keyword arguments for the gate.

    Example:
        >>> from convmoe.tokens import create_tokens
        >>> class Top1(Router):
        ...     def select(self, logits, probs, tokens, expert_mask):
        ...         weight, index = probs.max(dim=-1, keepdim=True)
        ...         return Routing.from_top_k(logits, probs, index, weight, expert_mask)
        >>> routing = Top1(8, num_experts=4)(create_tokens("grid:2x2").split(torch.randn(2, 8, 6, 6)))
        >>> routing.expert_index.shape
        torch.Size([2, 4, 1])
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
        device_type = tokens.source.device.type
        autocast = torch.amp.is_autocast_available(device_type) and (
            torch.compiler.is_compiling() or torch.is_autocast_enabled(device_type))  # none on "meta"
        with torch.autocast(device_type=device_type, enabled=False) if autocast else contextlib.nullcontext():
            logits = self.gate(tokens).float()
            # Eager CPU reads one sum for free and skips the masks when it is finite, so every logit is
            # (the usual case; an overflowing sum only takes the masked path, which is exact too); on an
            # accelerator it would wait; a compile or trace would record the branch, not the read.
            masks = not reads_on_host(logits) or not math.isfinite(float(logits.detach().sum()))
            if masks:
                # NaN for a token whose logits are not all finite (NaN, or an Inf that turns NaN times 0),
                # 0 otherwise: one product and one sum instead of isfinite's four operators and all().
                invalid = (logits.detach() * 0).sum(dim=-1, keepdim=True).isnan()  # (B, N, 1), before the -inf masks
                logits = torch.where(invalid, 0.0, logits)  # keeps the gate's layout, unlike masked_fill
            if self.training and self.noise_std > 0:
                # drawn in (B, N, E) order whatever the logits' layout: the same noise for the same seed
                noise = torch.randn(logits.shape, dtype=logits.dtype, device=logits.device)
                logits = logits + noise * self.noise_std
            if expert_mask is not None:
                logits = logits.masked_fill(~expert_mask, float("-inf"))
            probs = softmax_over_experts(logits if self.temperature == 1.0 else logits / self.temperature)
            if not masks:
                return self.select(logits, probs, tokens, expert_mask)
            # A non-finite token selects with near-zero probabilities: below every finite token.
            probs = probs * torch.where(invalid, _LOWEST_PRIORITY, 1.0)
            return _poison_invalid(self.select(logits, probs, tokens, expert_mask), invalid)

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


_LOWEST_PRIORITY = 1e-30


def _poison_invalid(routing: Routing, invalid: Tensor) -> Routing:
    """Dispatch the non-finite tokens ``invalid`` (B, N, 1) with NaN weights, logits and probabilities."""
    available = invalid if routing.expert_mask is None else invalid & routing.expert_mask[routing.expert_index]
    nan = float("nan")
    return dataclasses.replace(
        routing,
        logits=torch.where(invalid, nan, routing.logits),
        probs=torch.where(invalid, nan, routing.probs),
        combine_weight=torch.where(invalid, nan, routing.combine_weight),
        slot_mask=routing.slot_mask | available,
        dropped=routing.dropped & ~invalid[..., 0],
    )


def softmax_over_experts(logits: Tensor) -> Tensor:
    """``softmax(logits, dim=-1)`` of (B, N, E) logits, computed in the (B, E, N) layout.

    On CPU a softmax over a last dimension as short as E is ~15x slower than over a middle one
    (the kernel vectorises along the reduced dimension); the pixel gate's logits already are
    (B, E, N) in memory, so the transposes copy nothing there. Equal to ``logits.softmax(dim=-1)``
    up to float rounding; the result is a (B, N, E) view.

    Example:
        >>> logits = torch.randn(2, 5, 4)
        >>> torch.allclose(softmax_over_experts(logits), logits.softmax(dim=-1))
        True
    """
    return torch.softmax(logits.transpose(1, 2), dim=1).transpose(1, 2)


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
    if isinstance(tokens_per_group, torch.SymInt):
        # A dynamic batch under torch.export (image tokens): min / max would pin the batch size.
        return torch.sym_min(torch.sym_max(capacity, 1), tokens_per_group)
    return int(min(max(capacity, 1), tokens_per_group))
