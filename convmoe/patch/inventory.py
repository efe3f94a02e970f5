"""What a model holds: its modules in registration order and which of them are convolutions."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.conv import _ConvNd

from convmoe.block import MoEConv2d
from convmoe.patch.converters import timm_layer_classes


def is_conv_like(module: nn.Module) -> bool:
    """Whether ``module`` is a convolution in the sense of target matching (convertible or not).

    nn.Conv2d and every other ``_ConvNd`` (transposed, 1-D, 3-D), MoE blocks, timm's CondConv2d and
    MixedConv2d, and any class named ``*Conv*`` with a 4-D ``weight`` of its own.

    Example:
        >>> is_conv_like(nn.Conv2d(2, 2, 3)), is_conv_like(nn.BatchNorm2d(2))
        (True, False)
    """
    if isinstance(module, (_ConvNd, MoEConv2d)):
        return True
    exotic = timm_layer_classes("CondConv2d", "MixedConv2d")
    if exotic and isinstance(module, exotic):
        return True
    weight = module._parameters.get("weight")
    return "Conv" in type(module).__name__ and weight is not None and weight.dim() == 4


def model_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module, in registration order, without the inside of MoE blocks.

    Example:
        >>> list(model_modules(nn.Sequential(nn.Conv2d(1, 1, 1))))
        ['', '0']
    """
    modules: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        modules[name] = module
        if isinstance(module, MoEConv2d):
            inside.append(f"{name}.")
    return modules


def conv_names(modules: dict[str, nn.Module]) -> list[str]:
    """Names of the conv-like modules, in registration order (the children of a conv-like module
    such as timm's MixedConv2d included).

    Example:
        >>> conv_names(model_modules(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU())))
        ['0']
    """
    return [name for name, module in modules.items() if is_conv_like(module)]


def is_conv2d(module: nn.Module) -> bool:
    """Whether ``module`` is a 2-D, non-transposed convolution (what placements pick from).

    nn.Conv2d and its subclasses, MoE blocks, and timm's CondConv2d; not transposed, 1-D or 3-D
    convs, and not timm's MixedConv2d container (its per-kernel children are nn.Conv2d).

    Example:
        >>> is_conv2d(nn.Conv2d(2, 2, 3)), is_conv2d(nn.ConvTranspose2d(2, 2, 2))
        (True, False)
    """
    cond = timm_layer_classes("CondConv2d")
    return isinstance(module, (nn.Conv2d, MoEConv2d)) or bool(cond and isinstance(module, cond))


def is_spatial(module: nn.Module) -> bool:
    """Whether a conv-like module has a k x k kernel with k > 1 along some axis.

    Example:
        >>> is_spatial(nn.Conv2d(2, 2, 3)), is_spatial(nn.Conv2d(2, 2, 1)), is_spatial(nn.Conv2d(2, 2, (1, 7)))
        (True, False, True)
    """
    kernel = getattr(module, "kernel_size", None)
    if kernel is None:
        return False
    kernel = (kernel,) if isinstance(kernel, int) else tuple(kernel)
    return max(kernel) > 1
