"""The MoE layers of a model as the analysis sees them: names, output sizes and token partitions."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from convmoe.diagnostics import moe_blocks
from convmoe.engine.checkpoint import unwrap_model
from convmoe.types import Tokens

if TYPE_CHECKING:
    from typing_extensions import Self

def moe_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, block) for every MoE block of the (unwrapped) model, in module order.

    Example:
        >>> from convmoe import MoEConv2d
        >>> [name for name, _ in moe_layers(nn.Sequential(nn.ReLU(), MoEConv2d(2, 2, 1)))]
        ['1']
    """
    yield from moe_blocks(unwrap_model(model))


def layer_tokens(block: nn.Module, output_size: tuple[int, int]) -> Tokens:
    """The token partition ``block`` uses on an output map of ``output_size`` (H_out, W_out).

    A tokenizer only needs the map's size, so a zero-stride view of one scalar stands in for the
    features (no memory is allocated).

    Example:
        >>> from convmoe import MoEConv2d
        >>> tokens = layer_tokens(MoEConv2d(2, 2, 1, tokens="grid:2x2"), (5, 4))
        >>> tokens.row_edges, tokens.col_edges, tokens.token_map.shape
        ((0, 2, 5), (0, 2, 4), torch.Size([20]))
    """
    height, width = output_size
    return block.tokens.split(torch.zeros(()).expand(1, 1, height, width))


class OutputSizeRecorder:
    """Records the output size (H_out, W_out) of every MoE block's last forward pass, with forward hooks.

    The routing kept on a block (``last_routing``) has one row per token but not the map's size,
    which segmentation labels need to be placed on the token grid.

    Example:
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(3, 4, 3, stride=2, num_experts=2))
        >>> with OutputSizeRecorder(model) as recorder:
        ...     _ = model(torch.randn(1, 3, 9, 9))
        >>> recorder.sizes
        {'0': (4, 4)}
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self.sizes: dict[str, tuple[int, int]] = {}
        self._handles: list[Any] = []
        if model is not None:
            self.attach(model)

    def attach(self, model: nn.Module) -> OutputSizeRecorder:
        """Hook every MoE block of ``model`` (again: earlier hooks are removed first)."""
        self.detach()
        for name, block in moe_layers(model):
            self._handles.append(block.register_forward_hook(partial(self._record, name)))
        return self

    def detach(self) -> None:
        """Remove the hooks (the recorded sizes are kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        """Whether hooks are in place."""
        return bool(self._handles)

    def _record(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        self.sizes[name] = (int(output.shape[-2]), int(output.shape[-1]))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()
