"""Grouped matrix product: expert e's weight on the e-th consecutive segment of rows, in one call."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def segment_offsets(counts: Tensor) -> Tensor:
    """End offset of every segment, (E,) int32, as ``grouped_mm`` wants them.

    Example:
        >>> segment_offsets(torch.tensor([2, 0, 3]))
        tensor([2, 2, 5], dtype=torch.int32)
    """
    return counts.cumsum(0).to(torch.int32)


def grouped_mm_supported(rows: Tensor, weight: Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` runs these operands.

    On CPU it takes float32 (and 16-byte aligned half types); on CUDA it needs bfloat16 and
    compute capability 8.0 or newer. Row strides and both matrix widths must be multiples of 16 bytes.

    Example:
        >>> grouped_mm_supported(torch.randn(6, 8), torch.randn(2, 8, 4))
        True
    """
    if not hasattr(F, "grouped_mm") or rows.dtype != weight.dtype or rows.dim() != 2 or weight.dim() != 3:
        return False
    if rows.device.type == "cuda":
        if rows.dtype != torch.bfloat16 or torch.cuda.get_device_capability(rows.device) < (8, 0):
            return False
    elif rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if rows.dtype == torch.float32 and torch.compiler.is_compiling():
        return False  # the fake-tensor (meta) kernel of torch.compile / torch.export refuses float32
    align = 16 // rows.element_size()
    if rows.shape[1] % align or weight.shape[2] % align:  # the backward's operands need aligned rows too
        return False
    strides_ok = rows.stride(1) == 1 and rows.stride(0) % align == 0
    weight_ok = (weight.stride(2) == 1 and weight.stride(1) % align == 0) or (
        weight.stride(1) == 1 and weight.stride(2) % align == 0)
    return strides_ok and weight_ok


def segment_matmul(rows: Tensor, weight: Tensor, counts: Tensor | list[int]) -> Tensor:
    """``rows[segment e] @ weight[e]`` for every expert e, (M, N); differentiable.

    One ``grouped_mm`` call where the backend supports it (no host synchronisation: the segment
    offsets stay on the device), otherwise one ``mm`` per non-empty segment.

    Args:
        rows: Inputs sorted by expert, (M, K).
        weight: One matrix per expert, (E, K, N).
        counts: Rows of each expert, (E,) tensor or list summing to M.

    Returns:
        (M, N) in the order of ``rows``.

    Example:
        >>> rows, weight = torch.randn(5, 3), torch.randn(2, 3, 4)
        >>> out = segment_matmul(rows, weight, torch.tensor([2, 3]))
        >>> torch.allclose(out[2:], rows[2:] @ weight[1])
        True
    """
    if isinstance(counts, Tensor) and grouped_mm_supported(rows, weight):
        return F.grouped_mm(rows, weight, offs=segment_offsets(counts.to(rows.device)))
    counts = counts.tolist() if isinstance(counts, Tensor) else counts
    outputs = [segment @ weight[e] for e, segment in enumerate(rows.split(counts)) if segment.shape[0]]
    if not outputs:
        return rows.new_zeros(0, weight.shape[-1])
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matrix products on ``x``'s device run in: the autocast dtype when autocast is on there.

    Example:
        >>> compute_dtype(torch.randn(2))
        torch.float32
    """
    device = x.device.type
    if hasattr(torch.amp, "is_autocast_available") and not torch.amp.is_autocast_available(device):
        return x.dtype  # no autocast on this device type ("meta"): asking would raise
    try:
        enabled = torch.is_autocast_enabled(device)
    except TypeError:  # torch < 2.4 asks per device type
        enabled = torch.is_autocast_enabled() if device == "cuda" else torch.is_autocast_cpu_enabled()
    if not enabled:
        return x.dtype
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device)
    return torch.get_autocast_gpu_dtype() if device == "cuda" else torch.get_autocast_cpu_dtype()


@dataclass(frozen=True)
class GatheredColumns:
    """Receptive-field columns described by where to read them, not materialised.

    Row ``m`` of the columns is ``rows[index[m]]`` flattened, (T * C,): the T taps of one output
    position's receptive field, read from a channels-last map's rows.

    Attributes:
        rows: The map's rows, (R, C).
        index: Row of every tap, (M, T) int64, sorted by expert.

    Example:
        >>> GatheredColumns(torch.randn(5, 2), torch.tensor([[0, 1], [3, 4]])).materialize().shape
        torch.Size([2, 2, 2])
    """

    rows: Tensor
    index: Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.index.shape[0], self.index.shape[1], self.rows.shape[1]

    def materialize(self) -> Tensor:
        """The columns, (M, T, C); the backward is a row ``index_add``."""
        M, T, C = self.shape
        return self.rows.index_select(0, self.index.flatten()).reshape(M, T, C)


def _chunks(counts: list[int], chunk_rows: int) -> Iterator[tuple[int, int, int]]:
    """(expert, start, stop) row ranges of at most ``chunk_rows`` rows, in order."""
    start = 0
    for e, count in enumerate(counts):
        for begin in range(start, start + count, chunk_rows):
            yield e, begin, min(begin + chunk_rows, start + count)
        start += count


def _chunk_columns(rows: Tensor, index: Tensor, channels_first: bool) -> Tensor:
    """Columns of one chunk, (n, T * C), or (n, C * T) with ``channels_first``."""
    columns = rows.index_select(0, index.flatten()).view(index.shape[0], index.shape[1], rows.shape[1])
    return (columns.transpose(1, 2) if channels_first else columns).reshape(index.shape[0], -1)


class _GatheredSegmentMatmul(torch.autograd.Function):
    """Gather a chunk of columns, multiply, move on: each chunk stays in cache, nothing M x K is kept.

    The backward gathers each chunk again (cheaper than storing every column) for the weight
    gradient, and adds the columns' gradient straight into the rows' gradient. The weight gradient
    takes the weight's memory layout, so a weight that is a view of the parameters needs no copy.
    """

    @staticmethod
    def forward(ctx: Any, rows: Tensor, index: Tensor, weight: Tensor, counts: list[int], chunk_rows: int,
                channels_first: bool) -> Tensor:
        out = rows.new_empty(index.shape[0], weight.shape[-1])
        for e, start, stop in _chunks(counts, chunk_rows):
            torch.mm(_chunk_columns(rows, index[start:stop], channels_first), weight[e], out=out[start:stop])
        ctx.save_for_backward(rows, index, weight)
        ctx.counts, ctx.chunk_rows, ctx.channels_first = counts, chunk_rows, channels_first
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None, None, None, None]:
        rows, index, weight = ctx.saved_tensors
        grad = grad.contiguous()
        T, C = index.shape[1], rows.shape[1]
        # Accumulate in float32: CPU index_add in bfloat16/float16 is ~100x slower, and less exact.
        accumulate = torch.float32 if rows.dtype in (torch.bfloat16, torch.float16) else rows.dtype
        grad_rows = torch.zeros(rows.shape, dtype=accumulate, device=rows.device) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[2] else None
        for e, start, stop in _chunks(ctx.counts, ctx.chunk_rows):
            chunk_grad, chunk_index = grad[start:stop], index[start:stop]
            if grad_weight is not None:
                columns = _chunk_columns(rows, chunk_index, ctx.channels_first)
                grad_weight[e].addmm_(columns.t(), chunk_grad)
            if grad_rows is not None:
                grad_columns = (chunk_grad @ weight[e].t()).view(stop - start, *((C, T) if ctx.channels_first else (T, C)))
                if ctx.channels_first:
                    grad_columns = grad_columns.transpose(1, 2)
                grad_rows.index_add_(0, chunk_index.flatten(), grad_columns.reshape(-1, C).to(accumulate))
        if grad_rows is not None:
            grad_rows = grad_rows.to(rows.dtype)
        return grad_rows, None, grad_weight, None, None, None


def gathered_segment_matmul(columns: GatheredColumns, weight: Tensor, counts: list[int], channels_first: bool = False,
                            chunk_bytes: int = 1 << 20) -> Tensor:
    """``segment_matmul(columns.materialize().flatten(1), weight, counts)`` a cache-sized chunk at a time.

    The CPU path for receptive-field columns: gathering all M x K columns first (K = T * C) writes
    and re-reads a matrix that does not fit in cache, and keeps it for the backward; here each
    chunk of about ``chunk_bytes`` is gathered and multiplied while it is hot.

    Args:
        columns: Where to read the columns, sorted by expert.
        weight: (E, K, N), rows in (T, C) order, or (C, T) with ``channels_first``.
        counts: Rows of each expert.
        channels_first: Multiply columns in (C, T) order (each chunk is transposed), to match a
            weight in ``F.unfold``'s order: cheaper than reordering a large weight for few rows.
        chunk_bytes: Target size of one chunk of columns (a chunk has at least 64 and at least N rows).

    Example:
        >>> columns = GatheredColumns(torch.randn(6, 4), torch.tensor([[0, 1], [2, 3], [4, 5]]))
        >>> weight = torch.randn(2, 8, 3)
        >>> out = gathered_segment_matmul(columns, weight, [1, 2])
        >>> torch.allclose(out, segment_matmul(columns.materialize().flatten(1), weight, [1, 2]), atol=1e-6)
        True
    """
    _, T, C = columns.shape
    row_bytes = T * C * columns.rows.element_size()
    # at least as many rows as output columns, so that reading an expert's weight (K x N) once per
    # chunk costs no more than reading the chunk's columns
    chunk_rows = max(64, weight.shape[-1], chunk_bytes // max(row_bytes, 1))
    return _GatheredSegmentMatmul.apply(columns.rows, columns.index, weight, list(counts), chunk_rows, channels_first)
