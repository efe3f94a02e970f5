"""A run's best checkpoint as a Hub folder: the base recipe, float32 or float16 weights, and the check
that the saved folder computes what the checkpoint does.

Float16 weights: ``model.safetensors`` stores every floating tensor in float16 (half the bytes);
:func:`convmoe.from_pretrained` rebuilds the model in float32 and ``load_state_dict`` casts each
tensor up, so a loaded zoo model is an ordinary float32 model (routers stay in float32, as the
MoE blocks expect). Only the rounding of the stored values is lost, which :func:`compare_outputs`
measures at publish time.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from convmoe.engine.config import locate
from convmoe.engine.evaluate import model_output
from convmoe.engine.model_build import without_pretrained_download
from convmoe.factory import BaseRecipe
from convmoe.hub import save_pretrained

# Classifier factories that patch inside: their MoE arguments are recorded by the patch spec instead.
_PATCHING_ARGUMENTS = ("moe_targets", "moe_config")


def base_recipe_for(model_node: Mapping[str, Any]) -> BaseRecipe:
    """The :class:`~convmoe.BaseRecipe` that rebuilds a training config's ``model`` without weights.

    The node's ``_target_`` becomes a ``factory`` recipe with the node's arguments, pretrained
    weights switched off. For ``convmoe.models.create_classifier`` the MoE arguments are dropped:
    ``create_classifier`` patches the model with :func:`convmoe.patch`, and ``save_pretrained``
    records that patch in ``config.json`` already (applying it twice would fail). Models whose MoE
    blocks are part of their own definition (``UPerNetMoE``) keep every argument.

    Args:
        model_node: The ``model`` section of a resolved training config.

    Returns:
        The recipe, JSON-ready.

    Raises:
        ValueError: No ``_target_``, positional or partial arguments, or a nested ``_target_``
            (a recipe holds plain keyword arguments).

    Example:
        >>> base_recipe_for({"_target_": "convmoe.models.create_classifier", "model_name": "test_resnet",
        ...                  "num_classes": 10, "pretrained": True, "moe_targets": "layer4.*"}).to_dict()
        {'library': 'factory', 'name': 'convmoe.models.classification:create_classifier', 'kwargs': {'model_name': 'test_resnet', 'num_classes': 10, 'pretrained': False}}
    """
    from convmoe.models import create_classifier  # convmoe.models imports smp, an optional extra

    node = dict(model_node)
    target = node.pop("_target_", None)
    if target is None:
        raise ValueError("the model config has no _target_; a zoo variant is published from an engine run, whose "
                         "model section names its builder.")
    if any(key in node for key in ("_args_", "_partial_", "_recursive_")):
        raise ValueError(f"the model config of {target} uses _args_/_partial_/_recursive_; a zoo recipe holds keyword "
                         "arguments only. Write the model's arguments as keywords.")
    for key, value in node.items():
        if "_target_" in repr(value):
            raise ValueError(f"model argument {key!r} of {target} builds an object (_target_); a zoo recipe holds "
                             "plain values. Wrap the model in a function taking plain values.")
    builder = locate(target)
    if builder is create_classifier:
        for key in _PATCHING_ARGUMENTS:
            node.pop(key, None)
    node = without_pretrained_download(node)  # the zoo checkpoint brings every weight
    if builder is create_classifier:
        node["pretrained"] = False  # recorded even where the config left the default
    return BaseRecipe.parse(builder, **node)


def export_weights(model: nn.Module, folder: str | Path, recipe: BaseRecipe, float16: bool = False) -> Path:
    """``save_pretrained(model, folder, base=recipe)``, with floating tensors stored as float16 if asked.

    The model itself is not changed (a copy is cast).

    Example:
        >>> import tempfile, convmoe
        >>> model = convmoe.create_model("timm:test_resnet", num_classes=3)
        >>> folder = export_weights(model, tempfile.mkdtemp(), BaseRecipe("timm", "test_resnet", {"num_classes": 3}),
        ...                         float16=True)
        >>> convmoe.from_pretrained(folder).fc.weight.dtype
        torch.float32
    """
    source = copy.deepcopy(model).half() if float16 else model
    return save_pretrained(source, folder, base=recipe)


def weights_dtype(path: str | Path) -> str:
    """The dtype of the floating tensors of a ``model.safetensors`` (``"float16"``, ``"float32"``, or
    ``"mixed"``).

    Example:
        >>> import tempfile, os
        >>> from safetensors.torch import save_file
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> save_file({"a": torch.zeros(2, dtype=torch.float16), "n": torch.zeros(1, dtype=torch.long)}, path)
        >>> weights_dtype(path)
        'float16'
    """
    dtypes = set()
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (not a dict)
            tensor = handle.get_slice(name)
            dtype = tensor.get_dtype()
            if dtype in ("F16", "BF16", "F32", "F64"):
                dtypes.add({"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}[dtype])
    if len(dtypes) == 1:
        return dtypes.pop()
    return "mixed" if dtypes else "none"


@dataclass(frozen=True)
class OutputCheck:
    """How close a reloaded model's outputs are to the original's on one batch.

    Attributes:
        max_abs_diff: Largest absolute difference of the outputs.
        max_abs_reference: Largest absolute output of the original (the scale of the difference).
        agreement: Share of predictions (argmax over classes, per image or per pixel) that agree.

    Example:
        >>> OutputCheck(0.0, 3.0, 1.0).exact
        True
    """

    max_abs_diff: float
    max_abs_reference: float
    agreement: float

    @property
    def exact(self) -> bool:
        """Whether the outputs are identical."""
        return self.max_abs_diff == 0.0


@torch.no_grad()
def compare_outputs(reference: nn.Module, candidate: nn.Module, inputs: Tensor) -> OutputCheck:
    """Run both models in eval mode on ``inputs`` and compare their outputs (logits).

    Example:
        >>> net = nn.Conv2d(3, 4, 1)
        >>> compare_outputs(net, copy.deepcopy(net), torch.randn(1, 3, 4, 4)).agreement
        1.0
    """
    expected = model_output(reference.eval()(inputs)).float()
    actual = model_output(candidate.eval()(inputs)).float()
    agreement = float((expected.argmax(1) == actual.argmax(1)).float().mean())
    return OutputCheck(max_abs_diff=float((expected - actual).abs().max()),
                       max_abs_reference=float(expected.abs().max()), agreement=agreement)
