"""The block's balancing-loss module: weights and sums the registered loss functions."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from convmoe.losses.functional import diversity_loss, importance_loss, switch_loss, z_loss
from convmoe.losses.global_batch import FrequencyWindow, global_switch_loss
from convmoe.registry import Registry
from convmoe.types import AuxOutput, Routing

LossFn = Callable[[Routing], Tensor]
LOSSES: Registry[LossFn] = Registry("loss")
"""Balancing losses by name, each a function ``fn(routing) -> scalar``; ``MoEConfig.losses`` weights them.
A function with ``uses_window = True`` is called ``fn(routing, window)`` with the block's
:class:`~convmoe.losses.FrequencyWindow` (None outside ``convmoe.distributed.global_batch``).

Example:
    >>> LOSSES.names()
    ['diversity', 'importance', 'switch', 'switch_global', 'z']
"""


# Named functions rather than lambdas: a block holds them, and torch.save(model) pickles them by name.
def _switch(routing: Routing) -> Tensor:
    return switch_loss(routing.probs, routing.num_experts)


def _importance(routing: Routing) -> Tensor:
    return importance_loss(routing.probs)


def _z(routing: Routing) -> Tensor:
    logits = routing.logits
    return z_loss(torch.where(logits.isinf(), -1e4, logits))  # masked experts (-inf) count as very unlikely


def _diversity(routing: Routing) -> Tensor:
    return diversity_loss(routing.probs)


def _switch_global(routing: Routing, window: FrequencyWindow | None) -> Tensor:
    return global_switch_loss(routing.probs, routing.num_experts, window)


_switch_global.uses_window = True  # type: ignore[attr-defined]


LOSSES.register("switch")(_switch)
LOSSES.register("importance")(_importance)
LOSSES.register("z")(_z)
LOSSES.register("diversity")(_diversity)
LOSSES.register("switch_global")(_switch_global)


class BalancingLoss(nn.Module):
    """Compute every configured loss on a :class:`~convmoe.types.Routing` and their weighted sum.

    Args:
        weights: Loss name (registered in ``LOSSES``) -> weight. Register your own with
            ``LOSSES.register("name")(fn)`` where ``fn(routing) -> scalar``.

    Attributes:
        window: The open :class:`~convmoe.losses.FrequencyWindow` of ``convmoe.distributed.global_batch`` (the
            global-batch switch loss accumulates its frequencies there), or None.

    Example:
        >>> loss = BalancingLoss({"switch": 0.01})
        >>> r = Routing.from_top_k(torch.zeros(1, 2, 2), torch.full((1, 2, 2), 0.5),
        ...                        torch.tensor([[[0], [1]]]), torch.ones(1, 2, 1))
        >>> round(float(loss(r).total), 4)
        0.01
    """

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.weights = dict(weights or {})
        self.functions = {name: LOSSES.get(name) for name in self.weights}
        self.window: FrequencyWindow | None = None

    def _term(self, fn: LossFn, routing: Routing) -> Tensor:
        if getattr(fn, "uses_window", False):
            return fn(routing, getattr(self, "window", None))  # type: ignore[call-arg]  # (pickled before windows)
        if routing.probs.numel() == 0:
            # An empty batch has nothing to balance; the losses' means would be NaN (and, under DDP,
            # poison every rank's gradients). Zero, still attached to the router's graph.
            return routing.probs.sum()
        return fn(routing)

    def forward(self, routing: Routing) -> AuxOutput:
        terms = {name: self._term(fn, routing) for name, fn in self.functions.items()}
        total = sum((self.weights[name] * value for name, value in terms.items()),
                    start=torch.zeros((), device=routing.probs.device))
        return AuxOutput(total=total, terms=terms, weights=dict(self.weights))

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={weight}" for name, weight in self.weights.items())
