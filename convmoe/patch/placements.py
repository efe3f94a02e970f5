"""Named placements: where in a network to put MoE blocks, as target specs ``patch`` understands.

==========================  ==========================================================================
``"last"``                  the network's last k x k conv (k > 1) before the classifier/segmentation head,
                            in registration order: the single-layer placement reported best for
                            segmentation (e.g. the last conv of the decoder)
``"last_stage"``            the k x k convs of the deepest stage of the backbone (of the encoder, for
                            segmentation models) that the forward pass uses: for timm models the convs
                            registered between two ``feature_info`` points, for smp's own encoders the
                            deepest ``get_stages()`` entry in use, otherwise an element of a
                            ``stages``/``layers``/``blocks`` sequence or the highest ``layerN``/``stageN``/
                            ``blockN`` child
``"last_stage_pointwise"``  the ungrouped 1x1 convs of that deepest stage (the expansion and
                            projection convs of inverted residuals; what low-rank experts suit)
``"decoder_last"``          the last 2-D conv (any kernel) of a segmentation decoder (``model.decoder``)
``"fusion"``                the conv(s) of the decoder's fusion block, which merges the multi-scale or
                            multi-branch features (UPerNet ``fusion_block``, PSPNet ``conv``, DeepLabV3
                            ``aspp.project``, DeepLabV3+ ``block2``, Segformer ``fuse_stage``, DPT's last
                            fusion block)
==========================  ==========================================================================

Placements pick 2-D convolutions (``nn.Conv2d`` and subclasses, timm's CondConv2d), never
transposed ones, on the path of the main output:

- auxiliary heads are skipped: any module whose name has a part starting with ``aux`` or ending in
  ``_aux`` (torchvision's ``aux_classifier``, mmseg's ``auxiliary_head``, ``aux_head``, ``auxlayer``);
- convs an smp encoder does not call at its ``encoder_depth`` are skipped (smp keeps ``layer4``
  of a ResNet with ``encoder_depth=3``, PSPNet's default, but never runs it); a small dry run of
  the encoder (zeros, eval mode, no grad) tells which.

Each placement is a function ``(model) -> list of qualified conv names``; a model where the
placement is not defined raises a ``ValueError`` that says why and what to write instead.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from convmoe.patch.inventory import is_conv2d, is_spatial, model_modules

Placement = Callable[[nn.Module], list[str]]

_SMP_HEADS = ("segmentation_head", "classification_head")
_STAGE_SEQUENCES = ("stages", "layers", "blocks", "features", "_blocks")
_NUMBERED_STAGE = re.compile(r"(?:layer|stage|level|s|block)(\d+)")
_AUXILIARY = re.compile(r"aux\w*|\w+_aux", re.IGNORECASE)
# Squeeze-and-excitation gates (timm SqueezeExcite/SEModule/EffectiveSEModule, torchvision SqueezeExcitation):
# their 1x1 convs act on one pooled vector per image, not on the feature map.
_SQUEEZE_EXCITE = re.compile(r"squeezeexcit|^(effective)?se(module|layer|block)?$", re.IGNORECASE)
# smp encoders run every stage at encoder_depth 5; the dry run that finds unused convs needs an
# input of 2 ** 5 at least, and some encoders (Mix Transformer) a bit more.
_SMP_FULL_DEPTH = 5
_DRY_RUN_SIZE = 64

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


def is_auxiliary(name: str) -> bool:
    """Whether a qualified module name lies in an auxiliary head (a part starts with ``aux`` or ends in ``_aux``).

    Example:
        >>> is_auxiliary("aux_classifier.0"), is_auxiliary("decode_head.auxiliary_head.conv"), is_auxiliary("layer4.0")
        (True, True, False)
    """
    return any(_AUXILIARY.fullmatch(part) for part in name.split("."))


def _is_smp_encoder(module: nn.Module) -> bool:
    return isinstance(getattr(module, "_depth", None), int) and hasattr(type(module), "out_channels")


def _tensors(output: object) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors(item)]
    return []


def smp_unused_convs(encoder: nn.Module) -> set[str]:
    """Names (relative to ``encoder``) of the 2-D convs that do not reach an smp encoder's outputs at its depth.

    A conv counts as used when the encoder's outputs depend on it: smp's MobileNetV2 encoder runs one
    stage past its depth and drops it, so that stage would get no gradient. Empty at
    ``encoder_depth=5``, for anything that is not an smp encoder, and when the dry run (zeros of
    64 x 64, eval mode, one backward pass to the conv outputs only; training modes restored) fails.

    Example:
        >>> import segmentation_models_pytorch as smp
        >>> unused = smp_unused_convs(smp.PSPNet("resnet18", encoder_weights=None).encoder)  # depth 3
        >>> sorted(unused)[0], any(name.startswith("layer2.") for name in unused)
        ('layer3.0.conv1', False)
    """
    if not _is_smp_encoder(encoder) or encoder._depth >= _SMP_FULL_DEPTH:
        return set()
    convs = {name: module for name, module in encoder.named_modules() if is_conv2d(module)}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in convs}

    def record(name: str) -> Callable[..., None]:
        return lambda module, args, output: outputs[name].extend(t for t in _tensors(output) if t.requires_grad)

    handles = [module.register_forward_hook(record(name)) for name, module in convs.items()]
    modes = {module: module.training for module in encoder.modules()}
    parameter = next(encoder.parameters(), None)
    factory = {"device": parameter.device, "dtype": parameter.dtype} if parameter is not None else {}
    channels = getattr(encoder, "_in_channels", 3)
    try:
        encoder.eval()
        with torch.enable_grad():
            x = torch.zeros(1, channels, _DRY_RUN_SIZE, _DRY_RUN_SIZE, requires_grad=True, **factory)
            features = [t for t in _tensors(encoder(x)) if t.requires_grad and t is not x]
            recorded = [(name, t) for name, ts in outputs.items() for t in ts]
            grads = torch.autograd.grad(sum(f.float().sum() for f in features), [t for _, t in recorded],
                                        allow_unused=True) if features and recorded else []
    except Exception:  # noqa: BLE001 - an encoder with other input needs: no filtering, as before
        return set()
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    used = {name for (name, _), grad in zip(recorded, grads, strict=True) if grad is not None}
    return set(convs) - used


def _unused_convs(model: nn.Module) -> set[str]:
    """Qualified names of the convs of ``model``'s smp encoder that its forward pass never calls."""
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, nn.Module) and _is_smp_encoder(encoder):
        return {f"encoder.{name}" for name in smp_unused_convs(encoder)}
    return smp_unused_convs(model)


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
    """The network's last k x k conv (k > 1) outside the head and auxiliary heads, in registration order.

    Example:
        >>> import timm
        >>> last(timm.create_model("test_resnet"))
        ['layer4.0.conv2']
    """
    modules = model_modules(model)
    heads = head_names(model)
    unused = _unused_convs(model)
    candidates = [name for name, module in modules.items()
                  if is_conv2d(module) and is_spatial(module) and not _under(name, heads) and not is_auxiliary(name)
                  and name not in unused]
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


def _feature_info_stages(root: nn.Module, order: list[str]) -> list[list[str]]:
    """The modules between consecutive ``feature_info`` points (the first from the start), shallow to deep."""
    info = getattr(root, "feature_info", None)
    if info is None:
        return []
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    known = set(order)
    points = []
    for entry in entries:
        module = entry.get("module") if isinstance(entry, dict) else None
        spelled = [spelling for spelling in (module, (module or "").replace(".", "_")) if spelling in known]
        if spelled:
            points.append(spelled[0])
    ends = [max(i for i, name in enumerate(order) if _under(name, [point])) for point in points]
    starts = [0] + [end + 1 for end in ends[:-1]]
    return [order[start:end + 1] for start, end in zip(starts, ends, strict=True)]


def _smp_encoder_stages(root: nn.Module, order: list[str]) -> list[list[str]]:
    """smp's ``get_stages()`` entries up to the encoder's depth, by stride."""
    get_stages = getattr(root, "get_stages", None)
    if get_stages is None:
        return []
    try:
        stages = get_stages()
    except (AttributeError, NotImplementedError, TypeError):
        return []
    if not isinstance(stages, dict) or not stages:
        return []
    depth = getattr(root, "_depth", None)
    names_of = {id(module): name for name, module in root.named_modules()}

    def names(module: nn.Module) -> list[str]:
        if id(module) in names_of:
            return [names_of[id(module)]]
        return [name for child in module.children() for name in names(child)]

    found = []
    for stride in sorted(stride for stride in stages if depth is None or stride <= 2 ** depth):
        roots = [name for module in stages[stride] for name in names(module)]
        found.append([name for name in order if _under(name, roots)])
    return found


def _named_stages(root: nn.Module, order: list[str]) -> list[list[str]]:
    """The elements of a ``stages``/``layers``/``blocks``/``features`` sequence that hold a k x k conv,
    or the ``layerN``/``stageN``/``blockN`` children by number."""
    children = dict(root.named_children())
    for attribute in _STAGE_SEQUENCES:
        sequence = children.get(attribute)
        if isinstance(sequence, (nn.Sequential, nn.ModuleList)) and len(sequence):
            with_convs = [name for name, stage in sequence.named_children()
                          if any(is_conv2d(m) and is_spatial(m) for m in stage.modules())]
            if with_convs:
                return [[name for name in order if _under(name, [f"{attribute}.{child}"])] for child in with_convs]
    numbered = sorted((int(match[1]), name) for name in children if (match := _NUMBERED_STAGE.fullmatch(name)))
    return [[name for name in order if _under(name, [stage])] for _, stage in numbered]


def _all_unused(names: list[str], modules: dict[str, nn.Module], unused: set[str]) -> bool:
    convs = [name for name in names if is_conv2d(modules[name])]
    return bool(convs) and all(name in unused for name in convs)


def _last_stage_convs(model: nn.Module, placement: str, keep: Callable[[nn.Module], bool], what: str) -> list[str]:
    """The convs of the backbone's deepest stage in use that ``keep`` accepts (``what`` names them in errors)."""
    root, prefix = _backbone(model)
    modules = model_modules(root)
    order = list(modules)
    unused = smp_unused_convs(root)
    stage = None
    for find in (_feature_info_stages, _smp_encoder_stages, _named_stages):
        # The deepest stage the forward pass uses: an smp encoder at encoder_depth < 5 skips the last ones.
        in_use = [names for names in find(root, order) if names and not _all_unused(names, modules, unused)]
        if in_use:
            stage = in_use[-1]
            break
    where = f"{type(root).__name__}" + (f" ({prefix!r})" if prefix else "")
    if not stage:
        raise ValueError(f"placement {placement!r}: cannot find the stages of {where}; it needs a timm model "
                         "(feature_info), an smp encoder (get_stages), or a `stages`/`layers`/`blocks` sequence or "
                         "`layerN`/`stageN`/`blockN` children. Name the convs to patch instead.")
    skipped = head_names(root) + [name for name, module in modules.items()
                                  if name and _SQUEEZE_EXCITE.search(type(module).__name__)]
    convs = [name for name in stage if is_conv2d(modules[name]) and keep(modules[name])
             and not _under(name, skipped) and not is_auxiliary(name) and name not in unused]
    if not convs:
        raise ValueError(f"placement {placement!r}: the last stage of {where} ({stage[0]!r} ... {stage[-1]!r}) holds "
                         f"no {what}; name the convs to patch instead.")
    return [_join(prefix, name) for name in convs]


def last_stage(model: nn.Module) -> list[str]:
    """The k x k convs (k > 1) of the backbone's deepest stage that the forward pass uses.

    Example:
        >>> import timm
        >>> last_stage(timm.create_model("test_efficientnet"))
        ['blocks.4.0.conv_dw']
    """
    return _last_stage_convs(model, "last_stage", is_spatial, "k x k conv (k > 1)")


def _pointwise(module: nn.Module) -> bool:
    return not is_spatial(module) and getattr(module, "groups", 1) == 1


def last_stage_pointwise(model: nn.Module) -> list[str]:
    """The ungrouped 1x1 convs of the backbone's deepest stage that the forward pass uses: the expansion and
    projection convs of inverted residuals, a bottleneck's reduce/expand convs (``experts="lowrank"`` fits them);
    not those of squeeze-and-excitation gates, which see one pooled vector per image.

    Example:
        >>> import timm
        >>> last_stage_pointwise(timm.create_model("test_efficientnet"))
        ['blocks.4.0.conv_pw', 'blocks.4.0.conv_pwl']
    """
    return _last_stage_convs(model, "last_stage_pointwise", _pointwise, "ungrouped 1x1 conv")


def _decoder(model: nn.Module, placement: str) -> nn.Module:
    decoder = dict(model.named_children()).get("decoder")
    if decoder is None:
        raise ValueError(f"placement {placement!r} needs a segmentation model with a `decoder` submodule "
                         f"(segmentation_models_pytorch); {type(model).__name__} has none. Use 'last' or name the "
                         "convs.")
    return decoder


def decoder_last(model: nn.Module) -> list[str]:
    """The last conv (any kernel size) of ``model.decoder`` outside auxiliary heads, in registration order.

    Example:
        >>> import segmentation_models_pytorch as smp
        >>> decoder_last(smp.FPN("resnet18", encoder_weights=None))
        ['decoder.seg_blocks.3.block.0.block.0']
    """
    decoder = _decoder(model, "decoder_last")
    convs = [name for name, module in model_modules(decoder).items() if is_conv2d(module) and not is_auxiliary(name)]
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
    "last_stage_pointwise": last_stage_pointwise,
    "decoder_last": decoder_last,
    "fusion": fusion,
}


def list_placements() -> list[str]:
    """Names of the placements ``patch`` accepts as targets.

    Example:
        >>> list_placements()
        ['decoder_last', 'fusion', 'last', 'last_stage', 'last_stage_pointwise']
    """
    return sorted(PLACEMENTS)
