"""Auxiliary-loss-free load balancing: a per-expert bias on the selection scores, nudged towards balance.

Wang et al., 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts",
arXiv:2408.15664; used by DeepSeek-V3 (arXiv:2412.19437). The bias changes which experts a token
selects, never the combine weights, and is updated without gradient after each training forward pass.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from convmoe.types import Routing


def dispatched_load(routing: Routing) -> Tensor:
    """Tokens routed to each expert: dispatched slots per expert over all k slots, (E,) float32.

    A slot counts when ``slot_mask`` is True, so tokens dropped by capacity count nowhere. Equal to
    ``routing.expert_load()`` without its data-dependent shape (``torch.compile`` keeps one graph).

    Example:
        >>> r = Routing.from_top_k(torch.zeros(1, 3, 2), torch.full((1, 3, 2), 0.5),
        ...                        torch.tensor([[[0], [0], [1]]]), torch.ones(1, 3, 1))
        >>> dispatched_load(r).tolist()
        [2.0, 1.0]
    """
    load = torch.zeros(routing.num_experts, dtype=torch.float32, device=routing.expert_index.device)
    return load.scatter_add(0, routing.expert_index.reshape(-1), routing.slot_mask.reshape(-1).float())


def bias_update(load: Tensor, rate: float, expert_mask: Tensor | None = None) -> Tensor:
    """The bias change ``rate * sign(mean_load - load_e)`` of every expert, (E,).

    An overloaded expert's bias goes down by ``rate``, an underloaded one's up, one exactly at the
    mean load is unchanged. Experts removed by expert dropout in the pass (``expert_mask`` False)
    are unchanged and left out of the mean.

    Args:
        load: Tokens routed to each expert in the pass, (E,) (see :func:`dispatched_load`).
        rate: The update rate gamma (``MoEConfig.bias_balancing``).
        expert_mask: Experts available in the pass, (E,) bool, or None for all.

    Returns:
        The change to add to the bias, (E,) in ``load``'s dtype.

    Example:
        >>> bias_update(torch.tensor([3.0, 1.0, 2.0]), 0.1)
        tensor([-0.1000,  0.1000,  0.0000])
    """
    if expert_mask is None:
        mean = load.mean()
        return rate * torch.sign(mean - load)
    kept = expert_mask.to(load.dtype)
    mean = (load * kept).sum() / kept.sum().clamp_min(1)
    return rate * torch.sign(mean - load) * kept


def all_reduce_load(load: Tensor) -> Tensor:
    """``load`` summed over the ranks of the default process group (unchanged without one), so that
    every rank makes the same bias update.

    Example:
        >>> all_reduce_load(torch.tensor([1.0, 2.0])).tolist()  # no process group
        [1.0, 2.0]
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        load = load.clone()
        dist.all_reduce(load, op=dist.ReduceOp.SUM)
    return load


def in_backward() -> bool:
    """Whether a backward pass is running: a forward pass then is gradient checkpointing's recomputation.

    Always False while ``torch.compile`` traces: the query would break the graph, and a compiled
    graph's recomputation replays the traced graph rather than the module's Python.

    Example:
        >>> in_backward()
        False
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def updates_bias(training: bool) -> bool:
    """Whether a forward pass updates the bias: training with autograd, and not a recomputation in the
    backward pass (gradient checkpointing), an export or a trace.

    Example:
        >>> updates_bias(True), updates_bias(False)
        (True, False)
    """
    return (training and torch.is_grad_enabled() and not torch.compiler.is_exporting()
            and not torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing() and not in_backward())
