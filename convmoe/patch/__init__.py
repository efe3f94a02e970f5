"""Patch any CNN: replace its convolutions by MoE blocks in place, describe, save the recipe, fold back.

``convmoe.patch`` is this package and is also callable: ``convmoe.patch(model, targets=...)`` is
:func:`convmoe.patch.patch`.

```
patch(model, targets, config, exclude, upcycle)
 ├─ targets.select_targets    names, globs, "re:" regexes, placements, classes, predicates -> conv names
 ├─ converters                first match wins: timm_conv2d_same, conv2d; exotic convs refused with a reason
 └─ swap in place             block.name, block.config, block.converter, a weightless copy of the conv
patch_spec(model) -> dict      apply_spec(base_model, spec)      unpatch(model, how, inputs) -> UnpatchReport
freeze_base(model, train)      fine-tune the experts and routers (and `train`), freeze the rest
freeze_modules(model, names)   freeze the named modules of any model (a dense twin alike)
```

Example:
    >>> import timm, torch
    >>> import convmoe
    >>> model = timm.create_model("test_resnet").eval()
    >>> _ = convmoe.patch(model, targets="last", config=convmoe.MoEConfig(num_experts=4, top_k=1))
    >>> list(convmoe.patch.patch_spec(model)["modules"])
    ['layer4.0.conv2']
"""

from __future__ import annotations

import sys
import types
from typing import Any

from torch import nn

from convmoe.patch.converters import (
    CONVERTERS,
    convert_conv2d,
    convert_timm_conv2d_same,
    get_converter,
    refusal_reason,
    register_converter,
)
from convmoe.patch.freeze import FreezeSummary, freeze_base, freeze_modules, print_trainable_parameters
from convmoe.patch.inject import apply_spec, config_for, patch, patch_spec, patched_blocks
from convmoe.patch.placements import PLACEMENTS, list_placements
from convmoe.patch.targets import Selection, TargetSpec, select_targets
from convmoe.patch.unpatch import UnpatchReport, unpatch


class CallablePackage(types.ModuleType):
    """The class of the ``convmoe.patch`` package: calling it is :func:`patch`, and ``convmoe.patch.apply_spec``
    stays reachable. ``convmoe`` declares ``patch`` with this type for type checkers (a module is "not callable"
    to them); the package's other names read as ``Any`` there."""

    def __call__(self, model: nn.Module, targets: TargetSpec, config: Any = None, exclude: TargetSpec | None = None,
                 upcycle: bool = True, example_inputs: Any = None) -> nn.Module:
        return patch(model, targets=targets, config=config, exclude=exclude, upcycle=upcycle,
                     example_inputs=example_inputs)


sys.modules[__name__].__class__ = CallablePackage

__all__ = [
    "CONVERTERS",
    "PLACEMENTS",
    "FreezeSummary",
    "Selection",
    "UnpatchReport",
    "apply_spec",
    "config_for",
    "convert_conv2d",
    "convert_timm_conv2d_same",
    "freeze_base",
    "freeze_modules",
    "get_converter",
    "list_placements",
    "patch",
    "patch_spec",
    "patched_blocks",
    "print_trainable_parameters",
    "refusal_reason",
    "register_converter",
    "select_targets",
    "unpatch",
]
