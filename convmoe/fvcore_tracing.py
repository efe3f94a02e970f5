"""fvcore, imported on first use, and the stand-ins :mod:`convmoe.flops` traces: one method of a module, a
router's gate, a dispatch kernel, and a block replaced by its recorded output."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from convmoe.tokens.base import Tokenizer


def fvcore_nn() -> Any:
    """fvcore.nn, imported on first use: at import it scripts functions with ``torch.jit.script``, which
    recent torch deprecates with a FutureWarning that ``import convmoe`` should not print."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.script")
        import fvcore.nn

    return fvcore.nn


class MethodCall(nn.Module):
    """A module whose forward is ``module.<method>(x, *extra)``, so fvcore can trace one method."""

    def __init__(self, module: nn.Module, method: str, *extra: Any) -> None:
        super().__init__()
        self.module, self.method, self.extra = module, method, extra

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.module, self.method)(x, *self.extra)


class GateCall(nn.Module):
    """The gate on the tokens of a source map, as the block runs it."""

    def __init__(self, router: nn.Module, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.router, self.tokenizer = router, tokenizer

    def forward(self, source: Tensor) -> Tensor:
        return self.router.gate(self.tokenizer.split(source))


class Replay(torch.autograd.Function):
    """Returns a recorded output as one opaque operator of ``x``: traced (so the graph stays
    connected), never counted (fvcore has no handle for it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, output: Tensor) -> Tensor:
        return output.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, None]:
        return None, None


class RecordedOutputs(nn.Module):
    """Stands in for an MoE block during fvcore's trace: returns the outputs recorded earlier."""

    def __init__(self, outputs: list[Tensor]) -> None:
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def forward(self, x: Tensor) -> Tensor:
        out = self.outputs[self.calls % len(self.outputs)]
        self.calls += 1
        return Replay.apply(x, out)


def _baddbmm_flop(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``baddbmm(input, batch1, batch2)``: the product's B * n * m * p (the add is free)."""
    from fvcore.nn.jit_handles import get_shape

    batch, n, m = get_shape(inputs[1])
    return batch * n * m * get_shape(inputs[2])[-1]


def count_flops(module: nn.Module, x: Tensor) -> int:
    """fvcore's multiply-adds of one forward of ``module`` on ``x`` (``baddbmm`` counted as its product)."""
    analysis = fvcore_nn().FlopCountAnalysis(module, (x,)).set_op_handle("aten::baddbmm", _baddbmm_flop)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return int(analysis.total())


class KernelCall(nn.Module):
    """A dispatch kernel ``function(experts, x_pad, *extra, **options)`` as a module fvcore can trace."""

    def __init__(self, function: Any, experts: nn.Module, *extra: Any, **options: Any) -> None:
        super().__init__()
        self.function, self.experts, self.extra, self.options = function, experts, extra, options

    def forward(self, x_pad: Tensor) -> Tensor:
        return self.function(self.experts, x_pad, *self.extra, **self.options)
