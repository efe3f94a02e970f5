"""In-place injection: replace selected convolutions by MoE blocks, and record how (the patch spec)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from convmoe.block import MoEConv2d, named_blocks
from convmoe.config import MoEConfig
from convmoe.patch.converters import dense_template, find_converter, get_converter, refusal_reason
from convmoe.patch.targets import TargetSpec, describe_spec, listed_names, select_targets
from convmoe.patch.unpatch import call_with_inputs
from convmoe.scope import UNUSED_FIX, add_forward_scope, leaving_no_trace

SPEC_VERSION = 1

ConfigSpec = MoEConfig | dict | str | Callable[[str, nn.Module], MoEConfig | dict | None] | None


def _as_config(value: Any, name: str) -> MoEConfig | None:
    # None from a callable leaves that conv dense; anything else is read like every other config.
    return None if value is None else MoEConfig.coerce(value, where=f"patch(): the config for {name!r}")


def config_for(config: ConfigSpec, name: str, conv: nn.Module) -> MoEConfig | None:
    """The MoEConfig of one conv: ``config`` itself, a dict, a preset name, or ``config(name, conv)``.

    A callable may return None to leave that conv dense; ``config=None`` is ``MoEConfig()``.

    Example:
        >>> config_for(lambda name, conv: {"num_experts": conv.out_channels // 2}, "c", nn.Conv2d(2, 8, 3)).num_experts
        4
    """
    if config is None:
        return MoEConfig.coerce(None)
    if callable(config) and not isinstance(config, (MoEConfig, dict, str)):
        return _as_config(config(name, conv), name)
    return _as_config(config, name)


def _geometry(conv: nn.Module) -> str:
    kernel = "x".join(str(k) for k in getattr(conv, "kernel_size", ()))
    stride = getattr(conv, "stride", (1, 1))
    parts = [f"{conv.in_channels}->{conv.out_channels}", kernel or "?"]
    if tuple(stride) != (1, 1):
        parts.append(f"stride {tuple(stride)}")
    if getattr(conv, "groups", 1) != 1:
        parts.append(f"groups {conv.groups}")
    return " ".join(parts)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _adopt(block: MoEConv2d, name: str, converter: str, conv: nn.Module) -> MoEConv2d:
    """Name the block and keep what ``unpatch`` needs (the converter and a weightless copy of the conv)."""
    return block.adopt(name, converter, dense_template(conv))


def _build(name: str, conv: nn.Module, config: MoEConfig, upcycle: bool) -> tuple[str, MoEConv2d]:
    try:
        return find_converter(conv, config, upcycle)
    except (ValueError, TypeError) as error:
        raise type(error)(f"patch(): cannot build the MoE block for {name!r} ({type(conv).__name__} "
                          f"{_geometry(conv)}): {error}") from error


def _never_run(model: nn.Module, names: list[str], example_inputs: Any) -> list[str]:
    """The convs among ``names`` that an eval-mode, no-grad forward pass on ``example_inputs`` does not call.

    Training modes, the random number generator and the side outputs of existing MoE blocks are
    restored afterwards.
    """
    modules = dict(model.named_modules())
    called: set[str] = set()
    handles = [modules[name].register_forward_hook(lambda *_, name=name: called.add(name)) for name in names]
    try:
        with leaving_no_trace(model):
            model.eval()
            call_with_inputs(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return [name for name in names if name not in called]


def patch(model: nn.Module, targets: TargetSpec, config: ConfigSpec = None, exclude: TargetSpec | None = None,
          upcycle: bool = True, example_inputs: Any = None) -> nn.Module:
    """Replace the selected convolutions of ``model`` by MoE blocks, in place.

    Every new :class:`~convmoe.block.MoEConv2d` has ``.name`` (its qualified name) and ``.config``.
    With ``upcycle`` (the default) every expert starts as a copy of the conv it replaces, so the
    patched model computes what the dense one computed until training changes it.

    The model gets a forward scope (:mod:`convmoe.scope`), so ``convmoe.aux_loss`` and
    ``convmoe.routing_stats`` count exactly the blocks and calls of its latest forward pass. After
    the first training forward pass, a ``UserWarning`` names the blocks that did not run (a conv the
    forward pass never calls, e.g. a stage that smp's ``encoder_depth`` leaves out): they get no
    routing, aux loss or gradient. ``example_inputs`` checks this up front.

    Args:
        model: Any ``nn.Module`` (timm, segmentation_models_pytorch, your own).
        targets: Which convs: a name, a glob (``"layer4.*.conv2"``), a regex (``"re:decoder\\\\..*"``), a
            placement (``"last"``, ``"last_stage"``, ``"decoder_last"``, ``"fusion"``), a module class, a
            predicate ``(name, module) -> bool``, or a list of these. See :mod:`convmoe.patch.targets`.
        config: An :class:`~convmoe.config.MoEConfig`, a dict of its fields, a preset name
            (``convmoe.list_presets()``), or ``(name, conv) -> MoEConfig | dict | None`` (None keeps
            that conv dense). None is ``MoEConfig()``.
        exclude: Same kinds of spec; these modules (and every conv inside them) stay dense.
        upcycle: Copy the dense weights into every expert (False: fresh random experts).
        example_inputs: A batch the model accepts (a tensor, a tuple of arguments or a dict of
            keyword arguments): before patching, the model runs on it once (eval mode, no grad;
            training modes and the random state are restored), and a selected conv that does not
            run is an error.

    Returns:
        ``model``, patched.

    Raises:
        ValueError: A target matches no module (the message lists the closest names), matches no
            convolution, or only convolutions that cannot be converted; a config does not fit a conv;
            with ``example_inputs``, a selected conv does not run (the model is left unchanged).
        TypeError: A target or config of an unsupported type.

    Example:
        >>> import timm, torch
        >>> import convmoe
        >>> model = timm.create_model("test_resnet").eval()
        >>> x = torch.randn(2, 3, 32, 32)
        >>> dense = model(x)
        >>> _ = patch(model, targets="layer4.*.conv2", config=MoEConfig(num_experts=4, top_k=1))
        >>> model.layer4[0].conv2.name, bool((model(x) - dense).abs().max() < 1e-4)
        ('layer4.0.conv2', True)
    """
    selection = select_targets(model, targets, exclude)
    if example_inputs is not None:
        unused = _never_run(model, selection.names, example_inputs)
        if unused:
            raise ValueError(f"patch(): targets {describe_spec(targets)} selected {len(unused)} conv(s) that an eval-mode "
                             f"forward pass on example_inputs never calls: {listed_names(unused)}; as MoE blocks they "
                             f"would get no routing, aux loss or gradient. {UNUSED_FIX} The model is unchanged.")
    modules = dict(model.named_modules())
    built: list[tuple[str, MoEConv2d]] = []
    for name in selection.names:
        conv = modules[name]
        block_config = config_for(config, name, conv)
        if block_config is None:
            continue
        if name == "":
            raise ValueError("patch(): the model itself is the convolution; wrap it, e.g. nn.Sequential(conv), and "
                             "target '0'.")
        converter, block = _build(name, conv, block_config, upcycle)
        built.append((name, _adopt(block, name, converter, conv)))
    # Swap only once every block is built, so a failure leaves the model untouched.
    for name, block in built:
        _set_submodule(model, name, block)
    if built:
        add_forward_scope(model, check_unused=True)
    return model


def patched_blocks(model: nn.Module) -> dict[str, MoEConv2d]:
    """The MoE blocks ``patch`` created (they carry a converter name), by qualified name.

    Example:
        >>> model = patch(nn.Sequential(nn.Conv2d(3, 4, 3)), targets="0")
        >>> list(patched_blocks(model))
        ['0']
    """
    return {name: block for name, block in named_blocks(model).items() if block.converter}


def patch_spec(model: nn.Module) -> dict[str, Any]:
    """A JSON-ready record of what ``patch`` replaced: enough to rebuild the module tree.

    ``{"version": 1, "modules": {name: {"config": MoEConfig.to_dict(), "converter": "conv2d" | ...}}}``.
    :func:`apply_spec` on a freshly built base model reproduces the same modules, so a saved
    ``state_dict`` loads with ``strict=True``. MoE blocks that are part of the model's own definition
    (not created by ``patch``) are not listed.

    Example:
        >>> model = patch(nn.Sequential(nn.Conv2d(3, 4, 3)), targets="0", config=MoEConfig(num_experts=2))
        >>> spec = patch_spec(model)
        >>> spec["version"], spec["modules"]["0"]["converter"], spec["modules"]["0"]["config"]["num_experts"]
        (1, 'conv2d', 2)
    """
    return {"version": SPEC_VERSION,
            "modules": {name: {"config": block.config.to_dict(), "converter": block.converter}
                        for name, block in patched_blocks(model).items()}}


def apply_spec(model: nn.Module, spec: dict[str, Any], upcycle: bool = False) -> nn.Module:
    """Re-patch a freshly built base model from a :func:`patch_spec`, in place.

    Args:
        model: The unpatched base model (may live on the ``meta`` device).
        spec: The output of :func:`patch_spec` (e.g. read back from JSON).
        upcycle: Copy the dense weights into the experts (False: the weights come from a state dict).

    Returns:
        ``model``, patched.

    Raises:
        ValueError: An unsupported spec version, a missing module (closest names listed), an unknown
            converter, or a module the named converter does not handle.

    Example:
        >>> import json
        >>> source = patch(nn.Sequential(nn.Conv2d(3, 4, 3)), targets="0", config=MoEConfig(num_experts=2))
        >>> rebuilt = apply_spec(nn.Sequential(nn.Conv2d(3, 4, 3)), json.loads(json.dumps(patch_spec(source))))
        >>> rebuilt.load_state_dict(source.state_dict(), strict=True)
        <All keys matched successfully>
    """
    if not isinstance(spec, dict) or spec.get("version") != SPEC_VERSION or not isinstance(spec.get("modules"), dict):
        found = spec.get("version") if isinstance(spec, dict) else type(spec).__name__
        raise ValueError(f"apply_spec(): expected a patch spec {{'version': {SPEC_VERSION}, 'modules': {{...}}}} as "
                         f"written by convmoe.patch_spec, got version {found!r}.")
    modules = dict(model.named_modules())
    built: list[tuple[str, MoEConv2d]] = []
    for name, entry in spec["modules"].items():
        if name not in modules:
            closest = difflib.get_close_matches(name, list(modules), n=3)
            hint = f"; closest names: {', '.join(repr(c) for c in closest)}" if closest else ""
            raise ValueError(f"apply_spec(): the model has no module {name!r}{hint}. Was the spec written for a "
                             "different base model?")
        conv = modules[name]
        converter = entry.get("converter", "conv2d")
        convert = get_converter(converter)
        reason = refusal_reason(conv)
        block = convert(conv, MoEConfig.from_dict(entry["config"]), upcycle) if reason is None else None
        if block is None:
            raise ValueError(f"apply_spec(): converter {converter!r} does not apply to {name!r} "
                             f"({type(conv).__name__}{': ' + reason if reason else ''}); was the spec written for a "
                             "different base model?")
        built.append((name, _adopt(block, name, converter, conv)))
    for name, block in built:
        _set_submodule(model, name, block)
    if built:
        add_forward_scope(model, check_unused=True)
    return model
