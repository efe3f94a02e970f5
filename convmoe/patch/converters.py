"""Converters: turn one convolution module into an MoE block, or say why it cannot be done.

Converters are tried in order and the first that recognises the module wins (PEFT's
``_create_new_module``)::

    CONVERTERS = {"timm_conv2d_same": convert_timm_conv2d_same,   # TF 'SAME' padding, per input size
                  "conv2d": convert_conv2d}                       # nn.Conv2d and subclasses that keep its forward

Each converter returns an :class:`~convmoe.block.MoEConv2d` or ``None`` ("not mine"). Before any
converter runs, :func:`refusal_reason` rejects modules whose computation a bank of conv experts
cannot reproduce (timm's CondConv2d and MixedConv2d, weight-standardised convs, parametrised or
hooked convs, transposed or 1-D/3-D convs), with the reason in words.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable

from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from convmoe.block import MoEConv2d
from convmoe.config import MoEConfig

ConvertFn = Callable[[nn.Module, MoEConfig, bool], "MoEConv2d | None"]


def timm_layer_classes(*names: str) -> tuple[type, ...]:
    """The classes of ``timm.layers`` with these names that exist in the installed timm (none without timm).

    Example:
        >>> [cls.__name__ for cls in timm_layer_classes("Conv2dSame", "NoSuchLayer")]
        ['Conv2dSame']
    """
    try:
        from timm import layers
    except ImportError:  # timm is a dependency, but a stripped install should still patch plain convs
        return ()
    return tuple(getattr(layers, name) for name in names if hasattr(layers, name))


def _timm_same_classes() -> tuple[type, ...]:
    try:  # the module, not timm.layers.conv2d_same the function of the same name
        module = importlib.import_module("timm.layers.conv2d_same")
    except ImportError:
        return ()
    return tuple(getattr(module, name) for name in ("Conv2dSame", "Conv2dSameExport") if hasattr(module, name))


def _keeps_conv2d_forward(module: nn.Module) -> bool:
    cls = type(module)
    return cls.forward is nn.Conv2d.forward and cls._conv_forward is nn.Conv2d._conv_forward


def _new_block(conv: nn.Conv2d, config: MoEConfig, upcycle: bool, padding: int | tuple[int, int] | str) -> MoEConv2d:
    block = MoEConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=padding,
                      dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                      padding_mode=conv.padding_mode, config=config, device=conv.weight.device,
                      dtype=conv.weight.dtype)
    if upcycle:
        block.upcycle_from(conv.weight, conv.bias)
    return block.train(conv.training)


def convert_timm_conv2d_same(module: nn.Module, config: MoEConfig, upcycle: bool) -> MoEConv2d | None:
    """timm's ``Conv2dSame`` (and ``Conv2dSameExport``): TensorFlow 'SAME' padding computed per input size.

    The block gets ``padding="dynamic_same"``, so it pads each input exactly as timm does
    (``ceil(size / stride)`` outputs, the odd pixel at the bottom/right).

    Args:
        module: Any module; only timm's same-padding convs are converted.
        config: MoE settings of the new block.
        upcycle: Start every expert as a copy of the conv.

    Returns:
        The block, or None when ``module`` is not a timm same-padding conv.

    Example:
        >>> import torch
        >>> from timm.layers import Conv2dSame
        >>> conv = Conv2dSame(4, 8, 3, stride=2)
        >>> block = convert_timm_conv2d_same(conv, MoEConfig(num_experts=2), upcycle=True).eval()
        >>> x = torch.randn(1, 4, 8, 7)
        >>> bool((block(x) - conv(x)).abs().max() < 1e-5)
        True
    """
    classes = _timm_same_classes()
    if not classes or not isinstance(module, classes):
        return None
    return _new_block(module, config, upcycle, padding="dynamic_same")


def convert_conv2d(module: nn.Module, config: MoEConfig, upcycle: bool) -> MoEConv2d | None:
    """``nn.Conv2d``, or a subclass that keeps its forward: any kernel, stride, dilation, groups
    (depthwise included), padding and padding mode.

    Args:
        module: Any module; only convs that compute what ``nn.Conv2d`` computes are converted.
        config: MoE settings of the new block.
        upcycle: Start every expert as a copy of the conv.

    Returns:
        The block, or None when ``module`` is not such a conv.

    Example:
        >>> block = convert_conv2d(nn.Conv2d(4, 4, 3, padding=1, groups=4), MoEConfig(num_experts=2), True)
        >>> block.groups, block.config.num_experts
        (4, 2)
    """
    if not isinstance(module, nn.Conv2d) or not _keeps_conv2d_forward(module):
        return None
    return _new_block(module, config, upcycle, padding=module.padding)


CONVERTERS: dict[str, ConvertFn] = {
    "timm_conv2d_same": convert_timm_conv2d_same,
    "conv2d": convert_conv2d,
}


def register_converter(name: str, convert: ConvertFn) -> ConvertFn:
    """Add a converter, tried before the built-in ones (the most specific match should win).

    Args:
        name: Name written into patch specs (``patch_spec``), so a saved model can be rebuilt.
        convert: ``(module, config, upcycle) -> MoEConv2d | None``.

    Returns:
        ``convert``, so this also works as a decorator via ``functools.partial``.

    Raises:
        ValueError: ``name`` is already registered to another function.

    Example:
        >>> def convert_my_conv(module, config, upcycle):
        ...     return None  # recognise nothing
        >>> _ = register_converter("my_conv", convert_my_conv)
        >>> list(CONVERTERS)[0]
        'my_conv'
        >>> del CONVERTERS["my_conv"]
    """
    if name in CONVERTERS and CONVERTERS[name] is not convert:
        raise ValueError(f"converter name {name!r} is already registered to {CONVERTERS[name].__name__}; "
                         "pick another name.")
    others = {key: fn for key, fn in CONVERTERS.items() if key != name}
    CONVERTERS.clear()
    CONVERTERS.update({name: convert, **others})
    return convert


def get_converter(name: str) -> ConvertFn:
    """The converter registered under ``name``.

    Raises:
        ValueError: Unknown name; the message lists the registered ones.

    Example:
        >>> get_converter("conv2d") is convert_conv2d
        True
    """
    if name not in CONVERTERS:
        raise ValueError(f"unknown converter {name!r}; registered: {', '.join(CONVERTERS)}. Register it with "
                         "convmoe.patch.register_converter before loading.")
    return CONVERTERS[name]


def _known_refusal(module: nn.Module) -> str | None:
    cond = timm_layer_classes("CondConv2d")
    if cond and isinstance(module, cond):
        return ("mixes per-sample expert kernels (it is already a conditional conv); convmoe cannot "
                "express it as one dense conv per expert")
    mixed = timm_layer_classes("MixedConv2d")
    if mixed and isinstance(module, mixed):
        parts = ", ".join(repr(name) for name, _ in module.named_children())
        return ("splits its channels across several kernel sizes; target its per-kernel convs "
                f"(children {parts}) instead")
    std = timm_layer_classes("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame")
    if std and isinstance(module, std):
        return ("standardises its weight on every forward pass (weight standardisation, "
                "as in NFNet/BiT); upcycled conv experts would drop that and change the output")
    return None


def refusal_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be converted, in words; None when a converter may take it.

    Args:
        module: A module selected by a target.

    Returns:
        The reason, or None.

    Example:
        >>> refusal_reason(nn.ConvTranspose2d(4, 4, 2))
        'ConvTranspose2d is a transposed convolution; convmoe converts 2-D convolutions (nn.Conv2d) only'
        >>> refusal_reason(nn.Conv2d(4, 4, 3)) is None
        True
    """
    if isinstance(module, MoEConv2d):
        return "already an MoE block; convmoe.unpatch it first to patch it again"
    known = _known_refusal(module)
    if known:
        return known
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "a lazy conv whose weight is not created yet; run one forward pass before patching"
    if isinstance(module, _ConvNd) and getattr(module, "transposed", False):
        return f"{type(module).__name__} is a transposed convolution; convmoe converts 2-D convolutions (nn.Conv2d) only"
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not an nn.Conv2d; convmoe converts 2-D convolutions only"
    if parametrize.is_parametrized(module):
        return ("its weight is parametrised (torch.nn.utils.parametrize, e.g. weight or spectral norm); remove the "
                "parametrisation first (parametrize.remove_parametrizations(module, 'weight'))")
    if not isinstance(module.weight, nn.Parameter):
        return ("its weight is computed by a hook (e.g. torch.nn.utils.weight_norm), not a parameter; remove the "
                "hook first")
    if module._forward_hooks or module._forward_pre_hooks:
        return "it has forward hooks the MoE block would not run; remove them before patching"
    return None


def no_converter_reason(module: nn.Module) -> str:
    """The reason given when no registered converter recognises ``module``.

    Example:
        >>> class Shifted(nn.Conv2d):
        ...     def forward(self, x):
        ...         return super().forward(x) + 1
        >>> no_converter_reason(Shifted(2, 2, 1)).startswith("Shifted overrides")
        True
    """
    return (f"{type(module).__name__} overrides nn.Conv2d's forward and no converter knows what it computes; "
            "register one with convmoe.patch.register_converter")


def find_converter(module: nn.Module, config: MoEConfig, upcycle: bool) -> tuple[str, MoEConv2d]:
    """Convert ``module`` with the first converter that recognises it.

    Returns:
        (converter name, block).

    Raises:
        TypeError: The module is refused or no converter recognises it.

    Example:
        >>> name, block = find_converter(nn.Conv2d(4, 4, 3), MoEConfig(num_experts=2), upcycle=True)
        >>> name
        'conv2d'
    """
    reason = refusal_reason(module)
    if reason is None:
        for name, convert in CONVERTERS.items():
            block = convert(module, config, upcycle)
            if block is not None:
                return name, block
        reason = no_converter_reason(module)
    raise TypeError(f"cannot convert {type(module).__name__}: {reason}.")


def can_convert(module: nn.Module) -> str | None:
    """Why ``module`` cannot be converted, or None when some converter recognises it (nothing is built).

    Example:
        >>> can_convert(nn.Conv2d(2, 2, 3)) is None
        True
    """
    reason = refusal_reason(module)
    if reason is not None:
        return reason
    probe = _meta_twin(module)
    for convert in CONVERTERS.values():
        if convert(probe, MoEConfig(num_experts=1, top_k=1, losses={}), False) is not None:
            return None
    return no_converter_reason(module)


def _meta_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the meta device (no memory, no data copy)."""
    memo: dict[int, object] = {}
    for tensor in [*module.parameters(recurse=True), *module.buffers(recurse=True)]:
        twin = tensor.detach().to("meta")
        memo[id(tensor)] = nn.Parameter(twin, requires_grad=tensor.requires_grad) if isinstance(
            tensor, nn.Parameter) else twin
    return copy.deepcopy(module, memo)


def dense_template(conv: nn.Module) -> nn.Module:
    """A weightless copy of ``conv`` (class, geometry, padding mode, attributes; tensors on ``meta``).

    ``convmoe.patch`` keeps it on the block (as PEFT keeps ``base_layer``) so that
    ``convmoe.unpatch`` rebuilds the very class that was replaced, e.g. timm's ``Conv2dSame``.

    Example:
        >>> dense_template(nn.Conv2d(2, 4, 3, padding_mode="reflect")).weight.device.type
        'meta'
    """
    return _meta_twin(conv)
