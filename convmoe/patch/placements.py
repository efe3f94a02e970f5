"""Named placements: where in a network to put MoE blocks, as target specs ``patch`` understands.

=================  ==========================================================================
``"last"``         the network's last k x k conv (k > 1) before the classifier/segmentation head,
                   in registration order: the single-layer placement reported best for
                   segmentation (e.g. the last conv of the decoder)
``"last_stage"``   the k x k convs of the deepest stage of the backbone (of the encoder, for
                   segmentation models): for timm models the convs registered after the
                   second-to-last ``feature_info`` point up to the last one, for smp's own
                   encoders the last ``get_stages()`` entry in use, otherwise the last element of
                   a ``stages``/``layers``/``blocks`` sequence or the highest ``layerN``/``stageN``
``"decoder_last"`` the last 2-D conv (any kernel) of a segmentation decoder (``model.decoder``)
``"fusion"``       the conv(s) of the decoder's fusion block, which merges the multi-scale or
                   multi-branch features (UPerNet ``fusion_block``, PSPNet ``conv``, DeepLabV3
                   ``aspp.project``, DeepLabV3+ ``block2``, Segformer ``fuse_stage``, DPT's last
                   fusion block)
=================  ==========================================================================

Placements pick 2-D convolutions (``nn.Conv2d`` and subclasses, timm's CondConv2d), never
transposed ones. Each placement is a function ``(model) -> list of qualified conv names``; a model where the
placement is not defined raises a ``ValueError`` that says why and what to write instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from torch import nn

from convmoe.patch.inventory import is_conv2d, is_spatial, model_modules

Placement = Callable[[nn.Module], list[str]]

_SMP_HEADS = ("segmentation_head", "classification_head")
_STAGE_SEQUENCES = ("stages", "layers", "blocks", "features")
_NUMBERED_STAGE = re.compile(r"(?:layer|stage|level|s)(\d+)")

# Decoder class name -> the names (relative to model.decoder) of its fusion block(s).
FUSION_BLOCKS: dict[str, Callable[[nn.Module], list[str]]] = {
    "UPerNetDecoder": lambda decoder: ["fusion_block"],
    "PSPDecoder": lambda decoder: ["conv"],
    "DeepLabV3Decoder": lambda decoder: ["aspp.project"],
    "DeepLabV3PlusDecoder": lambda decoder: ["block2"],
    "SegformerDecoder": lambda decoder: ["fuse_stage"],
    "DPTDecoder": lambda decoder: [f"fusion_blocks.{len(decoder.fusion_blocks) - 1}"],
}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _under(name: str, ancestors: Iterable[str]) -> bool:
    return any(name == a or name.startswith(f"{a}.") for a in ancestors)


def head_names(model: nn.Module) -> list[str]:
    """Top-level modules that form the classifier or segmentation head.

    timm's ``pretrained_cfg["classifier"]`` (its first component, e.g. ``"head"`` for
    ``"head.fc"``) and smp's ``segmentation_head`` / ``classification_head``.

    Example:
        >>> import timm
        >>> head_names(timm.create_model("test_convnext"))
        ['head']
    """
    children = dict(model.named_children())
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") if isinstance(cfg, dict) else None
    classifiers = [classifier] if isinstance(classifier, str) else list(classifier or [])
    names = [name.split(".")[0] for name in classifiers] + list(_SMP_HEADS)
    return list(dict.fromkeys(name for name in names if name in children))


def last(model: nn.Module) -> list[str]:
    """The network's last k x k conv (k > 1) outside the head, in registration order.

    Example:
        >>> import timm
        >>> last(timm.create_model("test_resnet"))
        ['layer4.0.conv2']
    """
    modules = model_modules(model)
    heads = head_names(model)
    candidates = [name for name, module in modules.items()
                  if is_conv2d(module) and is_spatial(module) and not _under(name, heads)]
    if not candidates:
        raise ValueError(f"placement 'last': {type(model).__name__} has no k x k conv (k > 1) outside its head "
                         f"{heads}; name the conv to patch instead.")
    return candidates[-1:]


def _backbone(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the stages, and its qualified name (the encoder of a segmentation model)."""
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, nn.Module) and isinstance(getattr(model, "decoder", None), nn.Module):
        inner = getattr(encoder, "model", None)
        if isinstance(inner, nn.Module) and getattr(inner, "feature_info", None) is not None:
            return inner, "encoder.model"
        return encoder, "encoder"
    return model, ""


def _feature_info_stage(root: nn.Module, order: list[str]) -> list[str] | None:
    info = getattr(root, "feature_info", None)
    if info is None:
        return None
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    known = set(order)
    points = []
    for entry in entries:
        module = entry.get("module") if isinstance(entry, dict) else None
        spelled = [spelling for spelling in (module, (module or "").replace(".", "_")) if spelling in known]
        if spelled:
            points.append(spelled[0])
    if not points:
        return None
    end = max(i for i, name in enumerate(order) if _under(name, [points[-1]]))
    start = max(i for i, name in enumerate(order) if _under(name, [points[-2]])) + 1 if len(points) > 1 else 0
    return order[start:end + 1]


def _smp_encoder_stage(root: nn.Module, order: list[str]) -> list[str] | None:
    get_stages = getattr(root, "get_stages", None)
    if get_stages is None:
        return None
    try:
        stages = get_stages()
    except (AttributeError, NotImplementedError, TypeError):
        return None
    if not isinstance(stages, dict) or not stages:
        return None
    depth = getattr(root, "_depth", None)
    used = [stride for stride in stages if depth is None or stride <= 2 ** depth]
    if not used:
        return None
    names_of = {id(module): name for name, module in root.named_modules()}

    def names(module: nn.Module) -> list[str]:
        if id(module) in names_of:
            return [names_of[id(module)]]
        return [name for child in module.children() for name in names(child)]

    roots = [name for module in stages[max(used)] for name in names(module)]
    return [name for name in order if _under(name, roots)] or None


def _named_stage(root: nn.Module, order: list[str]) -> list[str] | None:
    children = dict(root.named_children())
    for attribute in _STAGE_SEQUENCES:
        sequence = children.get(attribute)
        if isinstance(sequence, (nn.Sequential, nn.ModuleList)) and len(sequence):
            with_convs = [name for name, stage in sequence.named_children()
                          if any(is_conv2d(m) and is_spatial(m) for m in stage.modules())]
            if with_convs:
                stage = f"{attribute}.{with_convs[-1]}"
                return [name for name in order if _under(name, [stage])]
    numbered = [(int(match[1]), name) for name in children if (match := _NUMBERED_STAGE.fullmatch(name))]
    if numbered:
        stage = max(numbered)[1]
        return [name for name in order if _under(name, [stage])]
    return None


def last_stage(model: nn.Module) -> list[str]:
    """The k x k convs (k > 1) of the backbone's deepest stage.

    Example:
        >>> import timm
        >>> last_stage(timm.create_model("test_efficientnet"))
        ['blocks.4.0.conv_dw']
    """
    root, prefix = _backbone(model)
    modules = model_modules(root)
    order = list(modules)
    stage = None
    for find in (_feature_info_stage, _smp_encoder_stage, _named_stage):
        stage = find(root, order)
        if stage:
            break
    where = f"{type(root).__name__}" + (f" ({prefix!r})" if prefix else "")
    if not stage:
        raise ValueError(f"placement 'last_stage': cannot find the stages of {where}; it needs a timm model "
                         "(feature_info), an smp encoder (get_stages), or a `stages`/`layers`/`blocks` sequence or "
                         "`layerN`/`stageN` children. Name the convs to patch instead.")
    heads = head_names(root)
    convs = [name for name in stage if is_conv2d(modules[name]) and is_spatial(modules[name])
             and not _under(name, heads)]
    if not convs:
        raise ValueError(f"placement 'last_stage': the last stage of {where} ({stage[0]!r} ... {stage[-1]!r}) holds "
                         "no k x k conv (k > 1); name the convs to patch instead.")
    return [_join(prefix, name) for name in convs]


def _decoder(model: nn.Module, placement: str) -> nn.Module:
    decoder = dict(model.named_children()).get("decoder")
    if decoder is None:
        raise ValueError(f"placement {placement!r} needs a segmentation model with a `decoder` submodule "
                         f"(segmentation_models_pytorch); {type(model).__name__} has none. Use 'last' or name the "
                         "convs.")
    return decoder


def decoder_last(model: nn.Module) -> list[str]:
    """The last conv (any kernel size) of ``model.decoder``, in registration order.

    Example:
        >>> import segmentation_models_pytorch as smp
        >>> decoder_last(smp.FPN("resnet18", encoder_weights=None))
        ['decoder.seg_blocks.3.block.0.block.0']
    """
    decoder = _decoder(model, "decoder_last")
    convs = [name for name, module in model_modules(decoder).items() if is_conv2d(module)]
    if not convs:
        raise ValueError(f"placement 'decoder_last': {type(decoder).__name__} has no convolution; name the module to "
                         "patch instead.")
    return [_join("decoder", convs[-1])]


def fusion(model: nn.Module) -> list[str]:
    """The conv(s) of the decoder's fusion block (see the table in the module docstring).

    Example:
        >>> import segmentation_models_pytorch as smp
        >>> fusion(smp.UPerNet("resnet18", encoder_weights=None))
        ['decoder.fusion_block.0']
    """
    decoder = _decoder(model, "fusion")
    kind = type(decoder).__name__
    if kind not in FUSION_BLOCKS:
        raise ValueError(f"placement 'fusion' is defined for decoders with one fusion block "
                         f"({', '.join(sorted(FUSION_BLOCKS))}); {kind} has none (it fuses by addition or in every "
                         "block). Use 'decoder_last', or name the convs, e.g. 'decoder.blocks.*.conv1'.")
    blocks = FUSION_BLOCKS[kind](decoder)
    convs = [name for name, module in model_modules(decoder).items() if is_conv2d(module) and _under(name, blocks)]
    if not convs:
        raise ValueError(f"placement 'fusion': {kind}'s fusion block {blocks} holds no convolution in this version; "
                         "name the convs to patch instead.")
    return [_join("decoder", name) for name in convs]


PLACEMENTS: dict[str, Placement] = {
    "last": last,
    "last_stage": last_stage,
    "decoder_last": decoder_last,
    "fusion": fusion,
}


def list_placements() -> list[str]:
    """Names of the placements ``patch`` accepts as targets.

    Example:
        >>> list_placements()
        ['decoder_last', 'fusion', 'last', 'last_stage']
    """
    return sorted(PLACEMENTS)
