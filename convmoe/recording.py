"""Whether a tracer records the forward pass: then no value read on the host may decide what runs."""

from __future__ import annotations

import torch
from torch import Tensor


def is_recording() -> bool:
    """True while ``torch.compile`` or ``torch.export`` (Dynamo), ``torch.jit.trace`` or TorchScript records the model.

    A recording keeps operators, not Python decisions: an expert picked by reading a tensor on the host would be
    baked into the graph for every later input.

    Example:
        >>> is_recording()
        False
    """
    return bool(torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting())


def reads_on_host(tensor: Tensor) -> bool:
    """Whether code may read ``tensor``'s values on the host to choose what runs: eager mode, on CPU (on an
    accelerator the read would wait for it).

    Example:
        >>> reads_on_host(torch.zeros(1)), reads_on_host(torch.zeros(1, device="meta"))
        (True, False)
    """
    return tensor.device.type == "cpu" and not is_recording()
