"""What a downloaded file may build: the allow-list of model builders and config targets.

A ``config.json`` or a training checkpoint is data. Loading one builds objects that it names, so the
names must come from an allow-list, the way transformers refuses a foreign class in a config
unless the caller passes ``trust_remote_code=True``:

- base-model recipes: timm's ``create_model``, smp architectures, torchvision model builders,
  :mod:`convmoe.models`, and factories that code registers with :func:`register_factory`;
- ``_target_`` entries of a checkpoint's embedded training config: the same builders, plus
  :mod:`convmoe.data` datasets and transforms, ``torch.nn`` modules (losses) and ``torch.optim``
  optimizers and schedulers.

Anything else raises :class:`UntrustedCodeError`, which names the callable and the opt-in. A YAML
recipe the user passes on the command line is the user's own code and is not checked.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from torch import nn

FunctionT = TypeVar("FunctionT", bound=Callable[..., Any])

TRUSTED_FACTORY_MODULE = "convmoe.models"
OPT_IN = "trust_remote_code=True (CLI: --trust-remote-code)"
_FACTORIES: dict[str, Callable[..., Any]] = {}
# Recipe names that build from a library itself ("timm:resnet18"), never from a named function.
LIBRARY_PREFIXES = ("timm", "smp", "torchvision")


class UntrustedCodeError(ValueError):
    """A file names a callable outside the allow-list; loading it would run code the caller did not vet.

    Example:
        >>> issubclass(UntrustedCodeError, ValueError)
        True
    """


def register_factory(function: FunctionT) -> FunctionT:
    """Allow ``function`` as a base-model factory in ``config.json`` files and checkpoint configs.

    Usable as a decorator. Registering is the explicit opt-in for one builder: a folder whose recipe
    is ``{"library": "factory", "name": "my_pkg.nets:build"}`` then loads without
    ``trust_remote_code=True``.

    Raises:
        ValueError: ``function`` is not importable by name (a lambda, a local function, ``__main__``).

    Example:
        >>> import torch
        >>> register_factory(torch.nn.Identity) is torch.nn.Identity
        True
        >>> is_trusted_factory("torch.nn:Identity")
        True
    """
    _FACTORIES[factory_name(function)] = function
    return function


def factory_name(function: Callable[..., Any]) -> str:
    """The ``"module:qualname"`` under which ``function`` is recorded in a recipe.

    Raises:
        ValueError: ``function`` is a lambda, a local function or defined in ``__main__``.

    Example:
        >>> factory_name(nn.Identity)
        'torch.nn.modules.linear:Identity'
    """
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        raise ValueError(f"cannot record {function!r} as a base factory: it must be a module-level function in an "
                         "importable module (not a lambda, a local function or __main__); move it to a module and "
                         "pass it, or pass base='module:function'.")
    return f"{module}:{qualname}"


def is_trusted_factory(name: str) -> bool:
    """Whether the ``"module:function"`` factory ``name`` may be built from a downloaded file.

    True for registered factories, by the name they were registered under or an alias that imports
    to the same object: :mod:`convmoe.models` registers its model builders (``create_classifier``,
    ``UPerNetMoE``, ``UPerNetMEDoE``), not its helpers or methods.

    Example:
        >>> is_trusted_factory("convmoe.models.upernet:UPerNetMoE")
        True
        >>> is_trusted_factory("subprocess:run")
        False
    """
    module, _, attribute = name.partition(":")
    if not attribute or any(part.startswith("_") or not part for part in (*module.split("."), *attribute.split("."))):
        return False
    if name in _FACTORIES:
        return True
    if _defined_in(module, TRUSTED_FACTORY_MODULE):
        # convmoe.models registers its model builders when imported; its helpers, methods and imports
        # ("convmoe.models.x:os.system") are not builders.
        return _is_registered(_attribute(module, attribute))
    # An alias of a registered factory (re-exported elsewhere): compare objects, looking only in
    # modules that are already imported, so that checking a name never imports anything.
    loaded = sys.modules.get(module)
    if not _FACTORIES or loaded is None:
        return False
    obj: Any = loaded
    for part in attribute.split("."):
        obj = getattr(obj, part, None)
    return _is_registered(obj)


def _is_registered(obj: Any) -> bool:
    return obj is not None and any(obj is factory for factory in _FACTORIES.values())


def check_factory(name: str, trust_remote_code: bool, where: str) -> None:
    """Raise unless the factory ``name`` is allowed (or the caller opted in).

    Raises:
        UntrustedCodeError: ``name`` is outside the allow-list and ``trust_remote_code`` is False.

    Example:
        >>> check_factory("os:system", False, "config.json")
        Traceback (most recent call last):
        ...
        convmoe.trust.UntrustedCodeError: config.json names the base factory 'os:system', which is not in convmoe's allow-list (timm, smp, torchvision, convmoe.models and registered factories); nothing was run. If you trust the source, load it with trust_remote_code=True (CLI: --trust-remote-code), or register the builder first with convmoe.register_factory.
    """
    if trust_remote_code or is_trusted_factory(name):
        return
    raise UntrustedCodeError(f"{where} names the base factory {name!r}, which is not in convmoe's allow-list (timm, "
                             "smp, torchvision, convmoe.models and registered factories); nothing was run. If you "
                             f"trust the source, load it with {OPT_IN}, or register the builder first with "
                             "convmoe.register_factory.")


# -- _target_ entries of a checkpoint's embedded config -----------------------------------------------

_TARGET_ROOTS = ("convmoe", "timm", "segmentation_models_pytorch", "torchvision", "torch")


def check_config_targets(node: Any, trust_remote_code: bool, where: str) -> None:
    """Raise unless every ``_target_`` in the config ``node`` is allowed (or the caller opted in).

    Checks the names before importing anything, then the objects they name: ``convmoe.models``
    builders and ``convmoe.data`` classes; ``convmoe.create_model`` with an allowed recipe;
    ``timm.create_model``; smp architectures; ``torchvision.models`` builders; ``torch.nn`` modules;
    ``torch.optim`` optimizers and schedulers; registered factories.

    Raises:
        UntrustedCodeError: A target outside the allow-list, and ``trust_remote_code`` is False.

    Example:
        >>> check_config_targets({"loss": {"_target_": "torch.nn.CrossEntropyLoss"}}, False, "run.pt")
        >>> check_config_targets({"model": {"_target_": "os.system", "_args_": ["id"]}}, False, "run.pt")
        Traceback (most recent call last):
        ...
        convmoe.trust.UntrustedCodeError: run.pt names _target_ 'os.system' at 'model', which is not in convmoe's allow-list (convmoe.models, convmoe.data, timm.create_model, smp architectures, torchvision models, torch.nn modules, torch.optim, registered factories); nothing was run. If you trust the source, load it with trust_remote_code=True (CLI: --trust-remote-code), or pass your own --config.
    """
    if trust_remote_code:
        return
    for location, target, fields in _targets(node, ""):
        if not _target_allowed(target, fields):
            raise UntrustedCodeError(
                f"{where} names _target_ {target!r} at {location or 'the top level'!r}, which is not in convmoe's "
                "allow-list (convmoe.models, convmoe.data, timm.create_model, smp architectures, torchvision models, "
                f"torch.nn modules, torch.optim, registered factories); nothing was run. If you trust the source, "
                f"load it with {OPT_IN}, or pass your own --config.")


def _targets(node: Any, location: str) -> Iterator[tuple[str, Any, Mapping[str, Any]]]:
    if isinstance(node, list | tuple):
        for index, item in enumerate(node):
            yield from _targets(item, f"{location}[{index}]")
    elif isinstance(node, Mapping):
        if "_target_" in node:
            yield location, node["_target_"], node
        for key, value in node.items():
            yield from _targets(value, f"{location}.{key}" if location else str(key))


def _target_allowed(target: Any, fields: Mapping[str, Any]) -> bool:
    if not isinstance(target, str) or not target or any(p.startswith("_") or not p for p in target.split(".")):
        return False
    if ":" in target:
        return is_trusted_factory(target)
    if target.split(".")[0] not in _TARGET_ROOTS:
        return _registered_dotted(target)
    obj = _locate(target)
    if obj is None:
        return False
    if target in ("convmoe.create_model", "convmoe.factory.create_model"):
        return _recipe_allowed(fields)
    if target in ("convmoe.pretrained.load_efficientnet_lite0", "timm.create_model",
                  "segmentation_models_pytorch.create_model", "torch.tensor"):
        return True  # torch.tensor: data (a loss's class weights), it runs nothing
    # Each prefix admits only what its own package defines, so that a name such as
    # "convmoe.models.classification.importlib.import_module" cannot reach another module through an import.
    owner = getattr(obj, "__module__", None) or ""
    if target.startswith("convmoe.models."):
        return _is_registered(obj)  # the model builders, not every callable the package defines
    if target.startswith("convmoe.data."):
        return inspect.isclass(obj) and _defined_in(owner, "convmoe.data")
    if target.startswith("segmentation_models_pytorch."):
        return _is_module_class(obj) and _defined_in(owner, "segmentation_models_pytorch")
    if target.startswith("torchvision.models."):
        return (_is_module_class(obj) or inspect.isfunction(obj)) and _defined_in(owner, "torchvision.models")
    if target.startswith("torch.nn."):
        return _is_module_class(obj) and _defined_in(owner, "torch.nn")
    if target.startswith("torch.optim."):
        return _is_optimizer_or_scheduler(obj) and _defined_in(owner, "torch.optim")
    return _registered_dotted(target)


def _recipe_allowed(fields: Mapping[str, Any]) -> bool:
    # convmoe.create_model's name: "timm:", "smp:" and "torchvision:" build from the libraries
    # themselves; anything else is a "module:function" factory.
    args = fields.get("_args_") or []
    name = fields.get("name", args[0] if args else None)
    if not isinstance(name, str):
        return False
    library, sep, rest = name.partition(":")
    if sep and rest and library in LIBRARY_PREFIXES:
        return True
    return is_trusted_factory(name)


def _defined_in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _is_module_class(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, nn.Module)


def _is_optimizer_or_scheduler(obj: Any) -> bool:
    import torch

    bases = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    return inspect.isclass(obj) and issubclass(obj, bases)


def _registered_dotted(target: str) -> bool:
    module, _, attribute = target.rpartition(".")
    return bool(module) and is_trusted_factory(f"{module}:{attribute}")


def _locate(dotted: str) -> Any:
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        obj = _attribute(".".join(parts[:split]), ".".join(parts[split:]))
        if obj is not None:
            return obj
    return None


def _attribute(module_name: str, attribute: str) -> Any:
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError:
        return None
    for part in attribute.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
