"""Folding one MoE layer back into a dense conv for a while (``convmoe.unpatch`` of that layer alone)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from convmoe.patch import unpatch
from convmoe.types import Routing


def _usage_routing(usage: Tensor) -> Routing:
    """A one-token routing whose combine weights are ``usage``: what ``unpatch(how="usage")`` measures."""
    E = usage.numel()
    weights = (usage / usage.sum()).float().reshape(1, 1, E) if float(usage.sum()) > 0 else torch.full((1, 1, E), 1 / E)
    return Routing.from_top_k(torch.zeros(1, 1, E), weights, torch.arange(E).reshape(1, 1, E), weights)


def fold_layer(block: nn.Module, how: str = "average", usage: Tensor | None = None) -> nn.Module:
    """The dense conv ``convmoe.unpatch`` folds ``block`` into; ``block`` itself is left unchanged.

    Args:
        block: An MoE block (conv experts without expert norm/activation).
        how: ``"average"`` (the experts' mean), ``"usage"`` (experts weighted by their combine-weight share)
            or ``"base"`` (low-rank experts' shared conv alone).
        usage: With ``how="usage"``, each expert's summed combine-weight share over a dataset (E,)
            (see :attr:`~convmoe.analysis.collect.LayerRouting.usage`); default: the block's last forward pass.

    Raises:
        TypeError: The block does not fold into one conv (residual experts, expert norm/activation).
        ValueError: Unknown ``how``.

    Example:
        >>> from convmoe.patch import patch
        >>> model = patch(nn.Sequential(nn.Conv2d(3, 4, 3)), targets="0")
        >>> type(fold_layer(model[0])).__name__, type(model[0]).__name__
        ('Conv2d', 'MoEConv2d')
    """
    holder = nn.Module()
    holder.add_module("layer", block)  # unpatch replaces holder.layer; the block object is not modified
    saved_routing = block.last_routing
    try:
        if how == "usage" and usage is not None:
            block.last_routing = _usage_routing(usage.to(next(block.experts.parameters()).device))
        unpatch(holder, how=how)
    finally:
        block.last_routing = saved_routing
    return holder.layer


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@contextmanager
def folded_layer(model: nn.Module, name: str, how: str = "average", usage: Tensor | None = None
                 ) -> Iterator[nn.Module]:
    """Within the block, layer ``name`` of ``model`` is its dense fold; afterwards the very same block is back.

    The block object is put back as it was (same parameters, same module), so the model's state
    dict, module types and outputs are exactly those from before.

    Args:
        model: The model (the layer is replaced in place).
        name: Qualified name of the MoE block.
        how: As for :func:`fold_layer`.
        usage: As for :func:`fold_layer`.

    Yields:
        The dense conv standing in for the block.

    Example:
        >>> from convmoe.patch import patch
        >>> model = patch(nn.Sequential(nn.Conv2d(3, 4, 3)), targets="0")
        >>> with folded_layer(model, "0"):
        ...     inside = type(model[0]).__name__
        >>> inside, type(model[0]).__name__
        ('Conv2d', 'MoEConv2d')
    """
    if not name:
        raise ValueError("folded_layer(): the model itself is the MoE block; wrap it (nn.Sequential(block)) and fold '0'.")
    block = model.get_submodule(name)
    dense = fold_layer(block, how, usage)
    _set_submodule(model, name, dense)
    try:
        yield dense
    finally:
        _set_submodule(model, name, block)
