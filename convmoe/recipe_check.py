"""Proving that a base recipe rebuilds a model: same tensors, same structure, same outputs.

``save_pretrained`` runs this before writing anything, so a folder that reloads into a different
network (a keyword the recipe missed: ``global_pool="max"``, ``act_layer="silu"``,
``output_stride=16``) is refused at save time with the fix, instead of computing something else
after a reload.

1. Rebuild the base on the ``meta`` device (no memory) and re-apply the patch spec; encoders that
   cannot be built on ``meta`` (they call ``.item()`` while building) are built on the CPU.
2. Compare state-dict names and shapes, then a structure signature: every module's class, conv
   stride/dilation/padding/groups and pooling type.
3. Probe: build the recipe for real, load the model's state dict, and compare one forward pass of
   both in eval mode on a 64x64 input (the model's own input size if it refuses that; skipped for
   models above ``PROBE_MAX_PARAMETERS`` or when the model refuses both).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from convmoe.factory import BaseRecipe
from convmoe.formatting import listing
from convmoe.recipe_inference import library_of
from convmoe.scope import leaving_no_trace
from convmoe.state_dicts import compare_states

PROBE_MAX_PARAMETERS = 200_000_000
TRAIN_ONLY_MODULES = frozenset({"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "DropPath",
                                "DropBlock2d", "DropBlockFast2d", "StochasticDepth"})
PROBE_SIZE = 64


class RecipeMismatch(ValueError):
    """A recipe that does not rebuild the model; the message says what differs.

    Example:
        >>> issubclass(RecipeMismatch, ValueError)
        True
    """


def choose_recipe(model: nn.Module, candidates: Sequence[BaseRecipe], spec: Mapping[str, Any],
                  state: Mapping[str, Tensor], probe: bool = True) -> BaseRecipe:
    """The first candidate that rebuilds ``model`` (tensors and structure), proven by a probe forward.

    Args:
        model: The model being saved.
        candidates: Recipes to try, in order (one for a recorded or explicit recipe).
        spec: Its :func:`convmoe.patch_spec`.
        state: Its state dict.
        probe: Also compare a forward pass of the rebuilt model with ``model``'s.

    Raises:
        RecipeMismatch: No candidate rebuilds the model; the message names what differs (one
            candidate) or what was tried (guesses), and the fix for the model's library.

    Example:
        >>> import timm
        >>> from convmoe.recipe_inference import recipe_candidates
        >>> model = timm.create_model("test_resnet", num_classes=5, global_pool="max")
        >>> choose_recipe(model, recipe_candidates(model), {"version": 1, "modules": {}}, model.state_dict()).kwargs
        {'num_classes': 5, 'global_pool': 'max'}
    """
    first_error: RecipeMismatch | None = None
    signature = structure_signature(model)
    for recipe in candidates:
        try:
            with leaving_no_trace(model):  # the caller's run goes on as if nothing had been built or run
                rebuilt = _build_patched(recipe, spec, torch.device("meta"))
                _compare_tensors(recipe, rebuilt.state_dict(), state)
                _compare_structure(recipe, structure_signature(rebuilt), signature)
                if probe:
                    probe_outputs(model, recipe, spec, state)
        except RecipeMismatch as error:
            first_error = first_error or error
            continue
        return recipe
    if first_error is None:
        raise RecipeMismatch(f"save_pretrained cannot tell how to rebuild this {type(model).__name__}: "
                             f"{how_to_pass_base(model)}")
    if len(candidates) == 1:
        raise RecipeMismatch(f"{first_error}; {how_to_pass_base(model)}")
    tried = ", ".join(sorted({f"{c.library}:{c.name}" for c in candidates}))
    raise RecipeMismatch(f"save_pretrained cannot tell how to rebuild this {type(model).__name__}: no guessed recipe "
                         f"rebuilds it (tried {tried}; the first guess: {first_error}); {how_to_pass_base(model)}")


def structure_signature(model: nn.Module) -> list[tuple[Any, ...]]:
    """What must match besides tensor shapes: each module's name, class, and the settings that
    change its computation without changing its weights.

    Example:
        >>> structure_signature(nn.Sequential(nn.Conv2d(1, 1, 3, dilation=2)))[1]
        ('0', 'Conv2d', (1, 1), (2, 2), (0, 0), 1)
    """
    rows: list[tuple[Any, ...]] = []
    for name, module in model.named_modules():
        # Train-time regularisers compute nothing in eval: a drop rate the recipe lacks is no mismatch.
        kind = "Identity" if type(module).__name__ in TRAIN_ONLY_MODULES else type(module).__name__
        row: tuple[Any, ...] = (name, kind)
        if isinstance(module, nn.Conv2d):
            row += (tuple(module.stride), tuple(module.dilation), _padding(module), module.groups)
        pool_type = getattr(module, "pool_type", None)
        if isinstance(pool_type, str):
            row += (pool_type,)
        global_pool = getattr(module, "global_pool", None)
        if isinstance(global_pool, str):
            row += (global_pool,)
        rows.append(row)
    return rows


def probe_outputs(model: nn.Module, recipe: BaseRecipe, spec: Mapping[str, Any], state: Mapping[str, Tensor]) -> None:
    """Rebuild ``recipe`` for real, load ``state``, and compare one eval forward with ``model``'s.

    ``model``'s training flags are restored afterwards; nothing is learned (no gradient, eval mode).
    Skipped for models above :data:`PROBE_MAX_PARAMETERS` and for inputs ``model`` itself refuses.

    Raises:
        RecipeMismatch: The outputs differ.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet", global_pool="max")
        >>> probe_outputs(model, BaseRecipe("timm", "test_resnet"), {"version": 1, "modules": {}}, model.state_dict())
        Traceback (most recent call last):
        ...
        convmoe.recipe_check.RecipeMismatch: the base recipe {'library': 'timm', 'name': 'test_resnet', 'kwargs': {}} rebuilds this model's tensors but not its outputs (max abs difference ...
    """
    if sum(p.numel() for p in model.parameters()) > PROBE_MAX_PARAMETERS:
        return
    reference = next((t for t in model.parameters() if t.is_floating_point()), None)
    if reference is None or reference.device.type == "meta":
        return
    for probe in _probe_inputs(model, recipe):  # small first; the model's own input size if it needs it
        probe = probe.to(reference.device, reference.dtype)
        expected = _eval_forward(model, probe)
        if expected is not None:
            break
    else:
        return  # the model needs another input than the probes: nothing to compare cheaply
    rebuilt = _build_patched(recipe, spec, torch.device("cpu")).to(reference.device, reference.dtype)
    rebuilt.load_state_dict(dict(state), strict=True)
    got = _eval_forward(rebuilt, probe)
    expected_tensors = list(output_tensors(expected))
    got_tensors = list(output_tensors(got)) if got is not None else []
    if len(got_tensors) != len(expected_tensors) or any(a.shape != b.shape for a, b in
                                                         zip(expected_tensors, got_tensors, strict=True)):
        raise RecipeMismatch(f"the base recipe {recipe.to_dict()} rebuilds this model's tensors but not its forward "
                             "pass (it fails or returns other outputs)")
    for a, b in zip(expected_tensors, got_tensors, strict=True):
        if a.numel() and not torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5, equal_nan=True):
            difference = (a.float() - b.float()).abs().max().item()
            raise RecipeMismatch(f"the base recipe {recipe.to_dict()} rebuilds this model's tensors but not its "
                                 f"outputs (max abs difference {difference:.3g} on a probe input): the model was "
                                 "created with arguments the recipe lacks")


def how_to_pass_base(model: nn.Module) -> str:
    """The fix, in the model's own library's terms: pass ``base=`` with every creation keyword.

    Example:
        >>> how_to_pass_base(nn.Conv2d(1, 1, 1))  # doctest: +ELLIPSIS
        "pass base='my_pkg.nets:build' (your own module-level builder, ...
    """
    library = library_of(model)
    if library == "timm":
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "resnet18")
        return (f"pass base={{'library': 'timm', 'name': {name!r}, 'kwargs': {{...every keyword given to "
                "timm.create_model...}} to save_pretrained, or build the model with "
                f"convmoe.create_model('timm:{name}', ...), which records them.")
    if library == "smp":
        return ("pass base={'library': 'smp', 'name': '" + type(model).__name__ + "', 'kwargs': {...the "
                "constructor's keywords...}} to save_pretrained.")
    if library == "torchvision":
        return ("pass base={'library': 'torchvision', 'name': 'BUILDER', 'kwargs': {...}} (e.g. 'resnet18' with "
                "{'num_classes': 10}) to save_pretrained, or build the model with "
                "convmoe.create_model('torchvision:BUILDER', ...), which records them.")
    return ("pass base='my_pkg.nets:build' (your own module-level builder, with kwargs in a dict "
            "{'library': 'factory', 'name': 'my_pkg.nets:build', 'kwargs': {...}}) to save_pretrained, or build the "
            "model with convmoe.create_model, which records its recipe.")


# -- helpers ---------------------------------------------------------------------------------------------


def _build_patched(recipe: BaseRecipe, spec: Mapping[str, Any], device: torch.device) -> nn.Module:
    from convmoe.patch import apply_spec

    try:
        model = _build_on(recipe, device)
    except RecipeMismatch:
        raise
    except Exception as error:
        raise RecipeMismatch(f"the base recipe {recipe.to_dict()} cannot be built ({type(error).__name__}: "
                             f"{error})") from error
    try:
        with device:
            apply_spec(model, dict(spec), upcycle=False)
    except (ValueError, TypeError) as error:
        raise RecipeMismatch(f"the base recipe {recipe.to_dict()} does not rebuild this model: "
                             f"{str(error).rstrip('.')}") from error
    return model


def _build_on(recipe: BaseRecipe, device: torch.device) -> nn.Module:
    # The caller's own recipe (save time): a factory outside the allow-list is the caller's code.
    if device.type != "meta":
        return recipe.build(trust_remote_code=True)
    try:
        with device:
            return recipe.build(trust_remote_code=True)
    except Exception:  # noqa: BLE001 (smp's mit_b* encoders call .item() while building): build on the CPU instead
        return recipe.build(trust_remote_code=True)


def _compare_tensors(recipe: BaseRecipe, expected: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> None:
    difference = compare_states(expected, state)
    missing, extra = difference.unexpected, difference.missing  # the model's view: what the rebuild lacks or adds
    mismatched = [f"{name!r}: model {given} vs recipe {wanted}" for name, given, wanted in difference.mismatched]
    if difference:
        details = "; ".join(part for part in (
            f"not in the rebuilt model {listing(missing)}" if missing else "",
            f"only in the rebuilt model {listing(extra)}" if extra else "",
            f"shape mismatch {listing(mismatched, quote=False)}" if mismatched else "") if part)
        raise RecipeMismatch(f"the base recipe {recipe.to_dict()} does not rebuild this model's tensors ({details})")


def _compare_structure(recipe: BaseRecipe, rebuilt: list[tuple[Any, ...]], signature: list[tuple[Any, ...]]) -> None:
    if rebuilt == signature:
        return
    differing = next(((a, b) for a, b in zip(signature, rebuilt, strict=False) if a != b), None)
    where = (f"{differing[0][0] or 'the model'!r}: model {differing[0][1:]} vs recipe {differing[1][1:]}"
             if differing else f"{len(signature)} modules vs {len(rebuilt)}")
    raise RecipeMismatch(f"the base recipe {recipe.to_dict()} rebuilds this model's tensors but not its structure "
                         f"({where})")


def _padding(conv: nn.Conv2d) -> Any:
    return conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)


def _probe_inputs(model: nn.Module, recipe: BaseRecipe) -> list[Tensor]:
    # The recipe says how many channels the model takes; a space-to-depth stem (tresnet) hides it.
    channels = {"timm": recipe.kwargs.get("in_chans", 3), "smp": recipe.kwargs.get("in_channels", 3),
                "torchvision": 3}.get(recipe.library)
    if channels is None:
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        channels = first_conv.in_channels if first_conv is not None else 3
    sizes = [(PROBE_SIZE, PROBE_SIZE)]
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
    if isinstance(size, list | tuple) and len(size) == 3 and tuple(size[1:]) not in sizes:
        sizes.append((int(size[1]), int(size[2])))
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, int(channels), h, w, generator=generator) for h, w in sizes]


def _eval_forward(model: nn.Module, x: Tensor) -> Any:
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return model(x)
    except Exception:  # noqa: BLE001 (any model may refuse the probe input; then there is nothing to compare)
        return None
    finally:
        for module, mode in modes:
            module.training = mode


def output_tensors(output: Any) -> Iterator[Tensor]:
    """Every tensor in a model's output (a tensor, or dicts, lists and tuples of them), in order.

    Example:
        >>> [t.shape[0] for t in output_tensors({"out": torch.zeros(2), "aux": [torch.zeros(3)]})]
        [2, 3]
    """
    if isinstance(output, Tensor):
        yield output
    elif isinstance(output, Mapping):
        for value in output.values():
            yield from output_tensors(value)
    elif isinstance(output, list | tuple):
        for value in output:
            yield from output_tensors(value)

