"""Load pretrained weights into an smp model's encoder from a local model or state dict."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn


def load_encoder_weights(model: nn.Module, source: nn.Module | Mapping[str, Tensor] | Callable[[], nn.Module]) -> list[str]:
    """Copy a classification backbone's weights into ``model.encoder`` (smp), without a download.

    For a ``tu-`` encoder the weights go to ``model.encoder.model`` (timm's ``features_only``
    wrapper), whose keys are the backbone's minus its head; keys the encoder lacks (the
    classifier, the last conv) are skipped and returned.

    Args:
        model: An smp model (has ``.encoder``).
        source: A model, its state dict, or a function returning the model
            (e.g. ``convmoe.pretrained.load_efficientnet_lite0``).

    Returns:
        The source keys that were not used.

    Raises:
        ValueError: The encoder has weights the source does not provide, or shapes differ.

    Example:
        >>> import timm, segmentation_models_pytorch as smp
        >>> seg = smp.UPerNet("tu-test_resnet", encoder_weights=None, decoder_channels=16)
        >>> unused = load_encoder_weights(seg, timm.create_model("test_resnet"))
        >>> "fc.weight" in unused
        True
    """
    if callable(source) and not isinstance(source, nn.Module):
        source = source()
    state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        raise ValueError(f"{type(model).__name__} has no .encoder; load_encoder_weights works on smp models.")
    target = getattr(encoder, "model", encoder)  # TimmUniversalEncoder keeps the timm model in .model
    own = target.state_dict()
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise ValueError(f"the source has no weights for {len(missing)} encoder keys, e.g. {missing[:3]}; "
                         "it is not the encoder's backbone.")
    wrong = [k for k in own if state[k].shape != own[k].shape]
    if wrong:
        raise ValueError(f"shapes differ for {wrong[:3]}: source {tuple(state[wrong[0]].shape)} vs encoder "
                         f"{tuple(own[wrong[0]].shape)}.")
    target.load_state_dict({k: state[k] for k in own})
    return sorted(k for k in state if k not in own)
