"""Base-model recipes: how to rebuild the network a checkpoint was patched from, without its weights.

A recipe is a library, a name and keyword arguments, JSON-ready so it can live in ``config.json``:

    {"library": "timm",        "name": "resnet18",          "kwargs": {"num_classes": 10}}
    {"library": "smp",         "name": "Unet",              "kwargs": {"encoder_name": "resnet18", "classes": 2}}
    {"library": "torchvision", "name": "resnet18",          "kwargs": {"num_classes": 10}}
    {"library": "factory",     "name": "my_pkg.nets:build", "kwargs": {"width": 32}}

``create_model("timm:resnet18", ...)`` builds a model and records every keyword on it, so
``save_pretrained`` needs no ``base=``. Rebuilding never downloads weights: timm gets
``pretrained=False``, smp ``encoder_weights=None`` and torchvision ``weights=None``; the checkpoint
brings the weights. A ``factory`` recipe from a downloaded file is built only when the function is
in :mod:`convmoe.trust`'s allow-list (or the caller passes ``trust_remote_code=True``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from convmoe.trust import LIBRARY_PREFIXES, UntrustedCodeError, check_factory, factory_name
from convmoe.weight_sources import hub_model_names, without_weight_sources

RECIPE_ATTRIBUTE = "convmoe_base_recipe"
RECIPE_ERROR_ATTRIBUTE = "convmoe_base_recipe_error"
LIBRARIES = (*LIBRARY_PREFIXES, "factory")


def library_recipe(builder: Callable[..., nn.Module], kwargs: Mapping[str, Any]) -> BaseRecipe | None:
    """The library recipe of ``builder`` called with ``kwargs`` when it is a library's own: an smp architecture
    class, ``timm.create_model`` (its ``model_name`` becomes the name) or a torchvision model builder.

    Raises:
        ValueError: ``kwargs`` that no recipe can hold (not JSON-ready).
    """
    module, name = getattr(builder, "__module__", "") or "", getattr(builder, "__name__", "")
    if module.startswith("segmentation_models_pytorch."):
        import segmentation_models_pytorch as smp

        if smp.MODEL_ARCHITECTURES_MAPPING.get(name.lower()) is builder:
            return BaseRecipe("smp", name, dict(kwargs))
    if module.startswith("timm.") and name == "create_model" and isinstance(kwargs.get("model_name"), str):
        rest = {key: value for key, value in kwargs.items() if key != "model_name"}
        return BaseRecipe("timm", kwargs["model_name"], rest)
    if module.startswith("torchvision.models."):
        from torchvision import models

        if name in models.list_models() and models.get_model_builder(name) is builder:
            return BaseRecipe("torchvision", name, dict(kwargs))
    return None


@dataclass(frozen=True)
class BaseRecipe:
    """How to rebuild a base model: a library, a name in it, and keyword arguments.

    Attributes:
        library: ``"timm"`` (``timm.create_model``), ``"smp"`` (``segmentation_models_pytorch.create_model``),
            ``"torchvision"`` (``torchvision.models.get_model``) or ``"factory"`` (a function named
            ``"module:function"``).
        name: The timm model name, the smp architecture (``"Unet"``), the torchvision builder
            (``"resnet18"``, ``"fcn_resnet50"``) or ``"module:function"``.
        kwargs: JSON-ready keyword arguments for the call.

    Example:
        >>> recipe = BaseRecipe("timm", "test_resnet", {"num_classes": 10})
        >>> BaseRecipe.from_dict(recipe.to_dict()) == recipe
        True
        >>> recipe.build().num_classes
        10
    """

    library: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.library not in LIBRARIES:
            raise ValueError(f"base recipe library {self.library!r} is not supported; use one of {', '.join(LIBRARIES)} "
                             "('factory' with name='module:function' for your own builder).")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"base recipe name must be a non-empty string, got {self.name!r}.")
        if self.library == "factory" and ":" not in self.name:
            raise ValueError(f"factory recipe name {self.name!r} must be 'module:function', e.g. 'my_pkg.nets:build'.")
        if not isinstance(self.kwargs, Mapping):
            raise TypeError(f"base recipe kwargs must be a dict, got {type(self.kwargs).__name__}.")
        object.__setattr__(self, "kwargs", _jsonable(dict(self.kwargs), f"{self.library}:{self.name}"))

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a JSON-ready dict.

        Example:
            >>> BaseRecipe("smp", "Unet", {"classes": 2}).to_dict()
            {'library': 'smp', 'name': 'Unet', 'kwargs': {'classes': 2}}
        """
        return {"library": self.library, "name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BaseRecipe:
        """Build from a dict written by ``to_dict``; unknown or missing keys are an error.

        Example:
            >>> BaseRecipe.from_dict({"library": "timm", "name": "resnet18"}).kwargs
            {}
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"a base recipe must be a dict with 'library', 'name' and 'kwargs', got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown base recipe keys {unknown}; valid keys: {sorted(known)}.")
        missing = [key for key in ("library", "name") if key not in data]
        if missing:
            raise ValueError(f"base recipe {dict(data)} lacks {missing}; it needs 'library' and 'name'.")
        return cls(data["library"], data["name"], dict(data.get("kwargs") or {}))

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | BaseRecipe | Callable[..., nn.Module],
              **kwargs: Any) -> BaseRecipe:
        """A recipe from a ``"timm:NAME"`` / ``"smp:ARCH"`` / ``"module:function"`` string, a dict,
        a recipe, or an importable function, with ``kwargs`` for the call.

        Raises:
            ValueError: A string without a library prefix, or a function that cannot be imported by name.

        Example:
            >>> BaseRecipe.parse("timm:resnet18", num_classes=10).to_dict()
            {'library': 'timm', 'name': 'resnet18', 'kwargs': {'num_classes': 10}}
            >>> BaseRecipe.parse("my_pkg.nets:build").library
            'factory'
        """
        if isinstance(spec, BaseRecipe):
            return dataclasses.replace(spec, kwargs={**spec.kwargs, **kwargs}) if kwargs else spec
        if isinstance(spec, Mapping):
            recipe = cls.from_dict(spec)
            return cls.parse(recipe, **kwargs)
        if isinstance(spec, str):
            prefix, sep, rest = spec.partition(":")
            if not sep or not prefix or not rest:
                raise ValueError(f"base model {spec!r} needs a library prefix: 'timm:resnet18', 'smp:Unet', "
                                 "'torchvision:resnet18' or 'module:function' for your own builder.")
            if prefix in LIBRARY_PREFIXES:
                return cls(prefix, rest, kwargs)
            return cls("factory", spec, kwargs)
        if callable(spec):
            return library_recipe(spec, kwargs) or cls("factory", factory_name(spec), kwargs)
        raise TypeError(f"cannot make a base recipe from {type(spec).__name__}; pass 'timm:NAME', 'smp:ARCH', "
                        "'torchvision:NAME', 'module:function', a dict or a function.")

    def build(self, trust_remote_code: bool = False, where: str = "the base recipe") -> nn.Module:
        """Build the base model with random weights, reading no file and downloading nothing: every
        weight source in ``kwargs`` is switched off (timm ``pretrained=False``, smp ``encoder_weights=None``,
        torchvision ``weights=None``, factories alike; ``checkpoint_path`` is dropped, see
        :mod:`convmoe.weight_sources`).

        Args:
            trust_remote_code: Build a ``factory`` recipe whose function is outside the allow-list
                (:mod:`convmoe.trust`). Leave False for recipes read from a file you did not write.
            where: Where the recipe came from, for the error message.

        Raises:
            convmoe.trust.UntrustedCodeError: A factory outside the allow-list without the opt-in.
            ValueError: A model named on the Hub, or a recipe its library cannot build (an unknown model
                name, a keyword it does not take): one line naming ``where``.

        Example:
            >>> type(BaseRecipe("timm", "test_resnet").build()).__name__
            'ResNet'
            >>> BaseRecipe("factory", "os:system", {"command": "id"}).build()  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            convmoe.trust.UntrustedCodeError: the base recipe names the base factory 'os:system', which is not ...
        """
        hub_names = hub_model_names(self.kwargs, self.name if self.library == "timm" else None)
        if hub_names:
            raise ValueError(f"{where} names the Hub model {hub_names[0]!r}, whose architecture lives on the Hub: it "
                             "cannot be rebuilt offline, and rebuilding fetches nothing; save the model built from "
                             "its library name instead (e.g. 'tu-resnet18', 'resnet18').")
        if self.library == "factory":
            check_factory(self.name, trust_remote_code, where)
        try:
            model = self._build()
        except (ImportError, UntrustedCodeError):
            raise
        except Exception as error:  # the library's own error, with the file it came from
            cause = " ".join(f"{type(error).__name__}: {error}".split())
            raise ValueError(f"{where}: cannot build the base model {self.library}:{self.name} with kwargs "
                             f"{self.kwargs} ({cause}); fix the 'base' recipe, or install the library version that "
                             "wrote it.") from error
        record_recipe(model, self)
        return model

    def _build(self) -> nn.Module:
        if self.library == "timm":
            import timm

            if not timm.is_model(self.name):
                raise ValueError(f"timm has no model {self.name!r} (timm {timm.__version__}); check the name with "
                                 "timm.list_models() or upgrade timm.")
            return timm.create_model(self.name, **without_weight_sources(self.kwargs, timm.create_model))
        if self.library == "smp":
            smp = _import_smp()
            return smp.create_model(self.name, **without_weight_sources({**self.kwargs, "encoder_weights": None}))
        if self.library == "torchvision":
            builder = _torchvision_builder(self.name)
            return builder(**without_weight_sources({**self.kwargs, "weights": None}, builder))
        function = _resolve_function(self.name)
        model = function(**without_weight_sources(self.kwargs, function))
        if not isinstance(model, nn.Module):
            raise TypeError(f"factory {self.name!r} returned {type(model).__name__}, expected an nn.Module.")
        return model


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a base model and record how on it, so ``save_pretrained`` can rebuild it later.

    Args:
        name: ``"timm:MODEL"`` (any ``timm.create_model`` name), ``"smp:ARCH"`` (an smp architecture,
            e.g. ``"smp:Unet"``), ``"torchvision:BUILDER"`` (``"torchvision:resnet18"``) or
            ``"module:function"`` (your own builder).
        **kwargs: Passed to the builder. To be recorded they must be JSON-ready (numbers, strings,
            lists, dicts); otherwise the model is built but ``save_pretrained`` needs ``base=``.
            ``pretrained=True`` / ``encoder_weights="imagenet"`` / ``weights="DEFAULT"`` load weights
            now; a checkpoint saved from the model rebuilds it without them.

    Returns:
        The model, with its :class:`BaseRecipe` under ``convmoe_base_recipe``.

    Example:
        >>> model = create_model("timm:test_resnet", num_classes=10)
        >>> get_recipe(model).to_dict()
        {'library': 'timm', 'name': 'test_resnet', 'kwargs': {'num_classes': 10}}
    """
    library_recipe = BaseRecipe.parse(name)
    if library_recipe.library == "timm":
        import timm

        model = timm.create_model(library_recipe.name, **kwargs)
    elif library_recipe.library == "smp":
        model = _import_smp().create_model(library_recipe.name, **kwargs)
    elif library_recipe.library == "torchvision":
        model = _torchvision_builder(library_recipe.name)(**kwargs)
    else:
        model = _resolve_function(library_recipe.name)(**kwargs)
    try:
        record_recipe(model, BaseRecipe.parse(library_recipe, **kwargs))
    except ValueError as error:  # not JSON-ready: the model works, save_pretrained will need base=
        object.__setattr__(model, RECIPE_ERROR_ATTRIBUTE, str(error))
    return model


def record_recipe(model: nn.Module, recipe: BaseRecipe) -> None:
    """Attach ``recipe`` to ``model`` (it survives ``convmoe.patch``, which edits the model in place).

    Example:
        >>> model = nn.Linear(2, 2)
        >>> record_recipe(model, BaseRecipe("factory", "torch.nn:Identity"))
        >>> get_recipe(model).name
        'torch.nn:Identity'
    """
    object.__setattr__(model, RECIPE_ATTRIBUTE, recipe)


def get_recipe(model: nn.Module) -> BaseRecipe | None:
    """The recipe recorded on ``model`` by ``create_model``/``from_pretrained``, or None.

    Example:
        >>> get_recipe(nn.Linear(2, 2)) is None
        True
    """
    recipe = getattr(model, RECIPE_ATTRIBUTE, None)
    return recipe if isinstance(recipe, BaseRecipe) else None


def _jsonable(kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """A JSON round trip of ``kwargs`` (tuples become lists); names the offending argument."""
    for key, value in kwargs.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"base model {where} argument {key}={value!r} cannot be written to config.json "
                             f"({error}); pass JSON-ready values (numbers, strings, lists, dicts), or wrap the "
                             "model in your own 'module:function' factory.") from None
    return json.loads(json.dumps(kwargs))


def _resolve_function(name: str) -> Callable[..., nn.Module]:
    module_name, _, attribute = name.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r} for the base factory {name!r} ({error}); install "
                         "it or put it on PYTHONPATH.") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no {attribute!r} for the base factory {name!r}; "
                             "check the 'module:function' name.")
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"base factory {name!r} is not callable.")
    return target


def _import_smp() -> Any:
    try:
        import segmentation_models_pytorch as smp
    except ImportError as error:
        raise ImportError("this base model needs segmentation-models-pytorch; pip install 'convmoe[seg]'.") from error
    return smp


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    try:
        import torchvision
    except ImportError as error:
        raise ImportError("this base model needs torchvision; pip install torchvision.") from error
    if name not in torchvision.models.list_models():
        raise ValueError(f"torchvision has no model builder {name!r} (torchvision {torchvision.__version__}); check the "
                         "name with torchvision.models.list_models().")
    return torchvision.models.get_model_builder(name)
