"""The global-batch switch loss: expert frequencies over all ranks and all accumulated micro-batches.

Qiu et al., 2025, "Demons in the Detail: On Implementing Load Balancing Loss for Training Specialized
Mixture-of-Expert Models" (ACL 2025, arXiv:2501.11873). The switch loss ``E * sum_i f_i * P_i`` is
computed on one micro-batch per rank by default, which asks every micro-batch to be balanced. Here
the frequencies ``f_i`` (first choices, no gradient) are summed over the ranks of the process group,
and, inside a :class:`FrequencyWindow`, over the micro-batches of one optimizer step; ``P_i`` (the
mean router probability, which carries the gradient) stays local. DDP averages the ranks' gradients,
so with equal local batches the loss is the single-process switch loss of the concatenated batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from convmoe.losses.functional import first_choice_counts
from convmoe.routers.bias_balancing import all_reduce_load


@dataclass
class FrequencyWindow:
    """First-choice counts of one block over the micro-batches of one global batch (one optimizer step).

    Micro-batch m's loss uses the counts of micro-batches 1..m (all ranks): the last one's are those
    of the whole global batch. ``convmoe.distributed.global_batch(model)`` opens one window per block.

    Attributes:
        counts: First choices per expert so far, summed over ranks, (E,) float64; None before the first.
        tokens: Tokens so far, summed over ranks, a float64 scalar tensor (on the counts' device: no
            host sync); None before the first.

    Example:
        >>> window = FrequencyWindow()
        >>> window.add(torch.tensor([3.0, 1.0]), torch.tensor(4.0)).tolist()
        [0.75, 0.25]
        >>> window.add(torch.tensor([0.0, 4.0]), torch.tensor(4.0)).tolist()
        [0.375, 0.625]
    """

    counts: Tensor | None = None
    tokens: Tensor | None = None
    calls: int = field(default=0, repr=False)

    def add(self, counts: Tensor, tokens: Tensor) -> Tensor:
        """Add one micro-batch's counts and tokens; return the frequencies so far, (E,)."""
        counts, tokens = counts.to(torch.float64), tokens.to(torch.float64)
        self.counts = counts.clone() if self.counts is None else self.counts + counts
        self.tokens = tokens.clone() if self.tokens is None else self.tokens + tokens
        self.calls += 1
        return self.counts / self.tokens.clamp_min(1.0)


def global_switch_loss(probs: Tensor, num_experts: int, window: FrequencyWindow | None = None) -> Tensor:
    """``E * sum_i f_i * P_i`` with ``f`` over all ranks (and the window's micro-batches), ``P`` local.

    Without a process group and a window it equals :func:`~convmoe.losses.switch_loss`. It is a
    collective under ``torch.distributed``: every rank must call it in the same order (each block's
    forward pass does, in training).

    Args:
        probs: Router probabilities of this rank's micro-batch, (..., E).
        num_experts: E.
        window: Counts of the earlier micro-batches of the global batch, updated in place; None: this
            micro-batch alone (all ranks).

    Example:
        >>> from convmoe.losses import switch_loss
        >>> probs = torch.tensor([[0.75, 0.25], [0.6, 0.4]])
        >>> bool(global_switch_loss(probs, 2) == switch_loss(probs, 2))
        True
    """
    counts = first_choice_counts(probs, num_experts)
    reduced = all_reduce_load(torch.cat([counts, counts.sum(dim=0, keepdim=True)]))  # one collective, no sync
    counts, total = reduced[:-1], reduced[-1]
    if window is not None:
        frequency = window.add(counts, total)
    else:
        frequency = counts.to(torch.float64) / total.to(torch.float64).clamp_min(1.0)
    flat = probs.reshape(-1, num_experts)
    mean_probs = flat.sum(dim=0) / max(flat.shape[0], 1)  # an empty micro-batch: 0, still a collective
    return num_experts * (frequency.to(mean_probs.dtype) * mean_probs).sum()
