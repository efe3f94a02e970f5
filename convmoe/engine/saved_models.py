"""Weights saved by convmoe, read back: a training checkpoint's model weights, or a saved model (a
``save_pretrained`` folder or a Hub id) rebuilt by the class its ``config.json`` records.

    checkpoint_weights(path)             checkpoints/best.pt -> its 'model' state dict (weights_only loading)
    load_saved_model(source)             folder or Hub id -> convmoe.models class | smp architecture | convmoe.from_pretrained
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from convmoe.engine.checkpoint import load_checkpoint
from convmoe.hub import from_pretrained
from convmoe.hub_files import resolve_file
from convmoe.trust import OPT_IN, UntrustedCodeError
from convmoe.weight_sources import FILE_KEYWORDS, NAME_KEYWORDS, hub_model_names

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def is_checkpoint_file(source: str | Path) -> bool:
    """A training checkpoint (a file, or a path with a checkpoint suffix) rather than a folder or Hub id.

    Example:
        >>> is_checkpoint_file("runs/x/checkpoints/best.pt"), is_checkpoint_file("convmoe/upernet-lite0-moe8-camvid")
        (True, False)
    """
    path = Path(source)
    return path.suffix in CHECKPOINT_SUFFIXES or path.is_file()


def checkpoint_weights(path: str | Path, state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model weights of a ``convmoe train`` checkpoint (no code is unpickled).

    Args:
        path: The checkpoint file.
        state: Its contents when the caller has read them already (:func:`~convmoe.engine.checkpoint.load_checkpoint`).

    Raises:
        FileNotFoundError: No such file.
        ValueError: An unreadable file, or a checkpoint without a ``model`` state dict.

    Example:
        >>> checkpoint_weights("missing.pt")
        Traceback (most recent call last):
        ...
        FileNotFoundError: checkpoint missing.pt does not exist.
    """
    state = load_checkpoint(path) if state is None else state
    if not isinstance(state.get("model"), Mapping):
        # the file is readable but holds the wrong thing: a wrong value to its reader
        raise ValueError(f"{path} holds no model weights (no 'model' state dict); pass a checkpoint written by "  # noqa: TRY004
                         "convmoe train (checkpoints/last.pt or best.pt).")
    return dict(state["model"])


def load_saved_model(source: str, trust_remote_code: bool = False) -> nn.Module:
    """A model from a ``save_pretrained`` folder or a Hub id, built by the class its ``config.json`` records:
    a :mod:`convmoe.models` class, an smp architecture, otherwise :func:`convmoe.hub.from_pretrained`.

    Raises:
        FileNotFoundError: No such folder or Hub repo.
        ValueError: A ``_model_class`` that is neither, or files that do not fit their config.
        convmoe.trust.UntrustedCodeError: A recipe target outside the allow-list without ``trust_remote_code``.
    """
    from convmoe import models  # convmoe.models imports smp, an optional extra

    config_path = resolve_file(source, "config.json")
    config = json.loads(config_path.read_text())
    class_name = config.get("_model_class")
    if class_name is not None and not trust_remote_code:
        _check_no_weight_sources(config, config_path)
    model_class = getattr(models, class_name, None) if class_name in models.__all__ else None
    if isinstance(model_class, type) and issubclass(model_class, nn.Module):
        return model_class.from_pretrained(source)
    if class_name is not None:
        import segmentation_models_pytorch as smp

        if not isinstance(class_name, str) or class_name.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
            raise ValueError(f"{source}/config.json names _model_class {class_name!r}, which is neither a convmoe.models "
                             "class nor an smp architecture; point to a folder written by save_pretrained.")
        return smp.from_pretrained(source, encoder_weights=None)  # the folder brings every weight
    return from_pretrained(source, trust_remote_code=trust_remote_code)


def _check_no_weight_sources(config: Mapping[str, Any], where: Path) -> None:
    """Refuse an smp-style ``config.json`` whose keywords would make its builder read a file or the Hub."""
    named = [(key, config[key]) for key in FILE_KEYWORDS if config.get(key)]
    named += [(key, config[key]) for key in NAME_KEYWORDS if config.get(key) in hub_model_names(config)]
    if named:
        key, value = named[0]
        raise UntrustedCodeError(f"{where} names {key} {value!r}, which would read a file or the Hub outside the "
                                 f"folder; nothing was read. If you trust the source, load it with {OPT_IN}.")
