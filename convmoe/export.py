"""Export mode: MoE blocks trace with static shapes for ``torch.export``, ONNX and ``torch.jit.trace``.

Sparse dispatch sends each expert only its tokens, so its shapes depend on the data (``nonzero``,
per-expert counts read on the host): no graph with static shapes can record it. While a model is
being exported, every :class:`~convmoe.MoEConv2d` with a built-in dispatcher therefore dispatches
with :class:`ExportDispatcher` (dense: every expert on every token, weighted by the same routing),
which computes the same outputs with shapes that depend only on the input's shape:

```
block.forward
 ├─ tokens, router                   unchanged: top-k, capacity, expert choice all trace
 └─ dispatcher                       is_exporting() ? ExportDispatcher : the configured one
      conv experts                   one conv with E * C_out channels (or CondConv for image tokens)
      patch-local experts            every expert on each region shape, static slices
```

Nothing to call for ``torch.export.export(model.eval(), ...)`` or ``torch.onnx.export(model.eval(), ...,
dynamo=True)``. :func:`prepare_for_export` makes the choice permanent (for ``torch.compile(fullgraph=True)``
or CUDA graphs, which need static shapes too). The exported graph computes all E experts (E / k times
the expert FLOPs of sparse dispatch); for a graph as small as the original model, fold the experts
into plain convolutions with :func:`convmoe.unpatch` instead (conv experts only).

Limits: export in eval mode (expert dropout in training reads its mask on the host); the batch
dimension may be dynamic, the spatial size is fixed (tokens are cut at trace time); expert-choice
routing of ``image`` tokens needs a static batch (its capacity is a function of the batch size; the
error says so); ONNX via the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, opset 17+):
the TorchScript exporter (``dynamo=False``) mis-converts the pooling of grid, patch and image
tokens, so it is refused for them with an error that says so (pixel tokens export).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from convmoe.diagnostics import moe_blocks
from convmoe.dispatch import DenseDispatcher, SparseDispatcher
from convmoe.dispatch.base import add_shared_base
from convmoe.dispatch.merged import merged_routing
from convmoe.types import Routing, Tokens


def is_exporting() -> bool:
    """True while ``torch.export`` (also under ``torch.onnx.export``) or ``torch.jit.trace`` records the model.

    Example:
        >>> is_exporting()
        False
    """
    return bool(torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing())


class ExportDispatcher(nn.Module):
    """Dense dispatch with static shapes: every expert on every token, combined by the routing weights.

    Same outputs as the sparse and dense dispatchers (up to float summation order); no operation
    whose output shape depends on the routing, so it traces for ``torch.export``, ONNX and
    ``torch.compile(fullgraph=True)``.

    - Conv experts: one ``image`` token and linear experts mix each sample's expert weights into one
      conv (CondConv, as the sparse dispatcher does; not for ONNX, whose Conv has a fixed group
      count); otherwise one conv with E * C_out channels.
    - Patch-local experts (``experts="residual"``): the regions of each shape are stacked with
      static slices and every expert runs on them.

    Example:
        >>> from convmoe import MoEConv2d
        >>> block = MoEConv2d(4, 4, 3, padding=1, num_experts=4, tokens="grid:2x2").eval()
        >>> x = torch.randn(1, 4, 6, 6)
        >>> y = block(x)
        >>> block.dispatcher = ExportDispatcher()
        >>> torch.allclose(block(x), y, atol=1e-5)
        True
    """

    adds_shared_base = True

    def __init__(self) -> None:
        super().__init__()
        self.dense = DenseDispatcher()

    def forward(self, x_pad: Tensor, tokens: Tokens, routing: Routing, experts, out_size: tuple[int, int]) -> Tensor:
        if _legacy_onnx_export() and not tokens.is_pixel:
            raise ValueError(f"the TorchScript-based ONNX exporter (torch.onnx.export(..., dynamo=False)) mis-converts "
                             f"the pooling of {tokens.kind!r} tokens (wrong outputs, no error of its own); export with "
                             "dynamo=True, the default since torch 2.9.")
        capabilities = experts.capabilities
        if capabilities.sees_no_halo:
            return add_shared_base(experts, x_pad, _regions_static(x_pad, tokens, routing, experts))
        # CondConv runs a conv with B * groups groups: ONNX's Conv takes a fixed group count.
        merged_ok = capabilities.gathered_columns and capabilities.linear and not torch.onnx.is_in_onnx_export()
        if tokens.num_tokens == 1 and merged_ok:
            return merged_routing(experts, x_pad, routing)
        return self.dense(x_pad, tokens, routing, experts, out_size)


def _regions_static(x_pad: Tensor, tokens: Tokens, routing: Routing, experts) -> Tensor:
    """Every patch-local expert on every token region, weighted and placed back, (B, C_out, H_out, W_out)."""
    g, B, E = experts.geometry, x_pad.shape[0], experts.num_experts
    weights = routing.dense_weights()  # (B, N, E)
    rows, cols = tokens.grid
    by_shape: dict[tuple[int, int], list[int]] = {}
    for n in range(rows * cols):
        a, b = divmod(n, cols)
        shape = (tokens.row_edges[a + 1] - tokens.row_edges[a], tokens.col_edges[b + 1] - tokens.col_edges[b])
        by_shape.setdefault(shape, []).append(n)

    outputs: dict[int, Tensor] = {}
    for (h, w), members in by_shape.items():
        windows = []
        for n in members:
            a, b = divmod(n, cols)
            r0, c0 = tokens.row_edges[a] * g.stride[0], tokens.col_edges[b] * g.stride[1]
            windows.append(x_pad[:, :, r0:r0 + (h - 1) * g.stride[0] + g.span[0],
                                 c0:c0 + (w - 1) * g.stride[1] + g.span[1]])
        stacked = torch.cat(windows)  # (L * B, C_in, h_in, w_in), region-major
        out = experts.forward_segments(torch.cat([stacked] * E), [stacked.shape[0]] * E)
        out = out.reshape(E, len(members), B, *out.shape[1:])  # (E, L, B, C_out, h, w)
        mixed = torch.einsum("elbchw,ble->lbchw", out, weights[:, members].to(out.dtype))
        for i, n in enumerate(members):
            outputs[n] = mixed[i]
    return torch.cat([torch.cat([outputs[a * cols + b] for b in range(cols)], dim=3) for a in range(rows)], dim=2)


def _legacy_onnx_export() -> bool:
    return bool(torch.onnx.is_in_onnx_export() and not torch.compiler.is_exporting())


_EXPORT_DISPATCHER = ExportDispatcher()


def export_dispatcher(dispatcher: nn.Module) -> nn.Module:
    """The dispatcher a block uses while exporting: :class:`ExportDispatcher` for the built-in ones.

    A user dispatcher is returned unchanged (it must trace on its own).

    Example:
        >>> from convmoe.dispatch import create_dispatcher
        >>> export_dispatcher(create_dispatcher("sparse"))
        ExportDispatcher(
          (dense): DenseDispatcher()
        )
    """
    if isinstance(dispatcher, (SparseDispatcher, DenseDispatcher)):
        return _EXPORT_DISPATCHER
    return dispatcher


def prepare_for_export(model: nn.Module) -> list[str]:
    """Give every MoE block of ``model`` an :class:`ExportDispatcher`, in place, outside export too.

    ``torch.export`` and ``torch.onnx.export`` need no preparation (blocks switch by themselves while
    exporting); use this for ``torch.compile(fullgraph=True)``, CUDA graphs or any tracer that
    :func:`is_exporting` does not detect. Outputs are unchanged; every expert runs on every token.
    Undo with ``block.dispatcher = convmoe.create_dispatcher("sparse")``.

    Args:
        model: A model with MoE blocks (or a block).

    Returns:
        Names of the blocks whose dispatcher was replaced.

    Example:
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(3, 4, 3, padding=1, num_experts=2))
        >>> prepare_for_export(model)
        ['0']
    """
    changed = []
    for name, block in moe_blocks(model):
        dispatcher = getattr(block, "dispatcher", None)
        if dispatcher is not None and not isinstance(dispatcher, ExportDispatcher):
            block.dispatcher = ExportDispatcher()
            changed.append(name)
    return changed


__all__ = ["ExportDispatcher", "export_dispatcher", "is_exporting", "prepare_for_export"]
