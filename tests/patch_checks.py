"""The contract every patched model must keep, shared by the timm and smp sweeps.

``check_patched`` patches a deep copy of a dense model and checks, in this order: the targets were
replaced by MoE blocks (named, configured, recorded in the patch spec); in eval mode the output
equals the dense output (upcycling); in train mode a backward pass reaches every block's experts
and router; ``convmoe.aux_loss`` and ``convmoe.routing_stats`` see every block that ran.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import convmoe
from convmoe import MoEConfig
from convmoe.patch import patched_blocks

# Output tolerance: 1e-4 absolute for outputs of order 1; random-init classifiers can emit logits of
# order 1e2-1e3, where float32 rounding alone is larger, so the bound scales with the output.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class PatchResult:
    """What one patch of one model gave (for the sweep's summary)."""

    blocks: list[str]
    converters: set[str]
    max_abs_diff: float
    scale: float


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Draw every norm layer's scale from U(0.5, 1.5) and shift from U(-0.1, 0.1).

    timm zero-initialises the last norm of each residual block (``zero_init_last``), which zeroes the
    gradient of the conv before it; random scales keep the backward check meaningful everywhere.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            if getattr(module, "weight", None) is not None:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(torch.rand(module.bias.shape, generator=generator) * 0.2 - 0.1)
    return model


def output_tensor(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (list, tuple)):
        return output[0]
    raise TypeError(f"unexpected model output {type(output).__name__}")


def check_patched(dense: nn.Module, x: Tensor, targets: object, config: MoEConfig,
                  make_loss: Callable[[Tensor], Tensor] | None = None) -> PatchResult:
    """Patch a copy of ``dense`` (eval mode) and check equivalence, gradients and diagnostics."""
    dense = dense.eval()
    with torch.no_grad():
        reference = output_tensor(dense(x))
    model = copy.deepcopy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sweep's targets select only convertible convs
        returned = convmoe.patch(model, targets=targets, config=config)
    assert returned is model

    blocks = patched_blocks(model)
    assert blocks, f"{targets!r} patched nothing"
    spec = convmoe.patch_spec(model)
    assert list(spec["modules"]) == list(blocks)
    for name, block in blocks.items():
        assert block.name == name
        assert block.config == config
        assert not block.training

    with torch.no_grad():
        patched = output_tensor(model(x))
    scale = float(reference.abs().max())
    diff = float((patched - reference).abs().max())
    assert patched.shape == reference.shape
    assert diff <= TOLERANCE * max(1.0, scale), f"{targets!r}: max |patched - dense| = {diff:.3g} (scale {scale:.3g})"

    model.train()
    model.zero_grad(set_to_none=True)
    output = output_tensor(model(x))
    task_loss = make_loss(output) if make_loss else output.float().square().mean()
    aux = convmoe.aux_loss(model)
    assert aux.requires_grad
    assert torch.isfinite(aux)
    (task_loss + aux).backward()
    stats = convmoe.routing_stats(model)
    assert stats.blocks, "routing_stats is empty after a forward pass"
    assert set(stats.blocks) <= set(blocks)
    for name in stats.blocks:
        block = blocks[name]
        grad = block.experts.weight.grad
        assert grad is not None, f"no expert gradient in {name}"
        assert torch.isfinite(grad).all(), f"non-finite expert gradient in {name}"
        assert float(grad.abs().sum()) > 0, f"zero expert gradient in {name}"
        router_grads = [p.grad for p in block.router.parameters() if p.grad is not None]
        assert router_grads, f"no router gradient in {name}"
        assert stats[name].num_experts == config.num_experts
    return PatchResult(list(blocks), {block.converter for block in blocks.values()}, diff, scale)
