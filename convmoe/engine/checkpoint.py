"""Training checkpoints: everything needed to resume, written atomically, read without pickled code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_VERSION = 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or ``torch.compile``) wrapper.

    Example:
        >>> unwrap_model(nn.Linear(1, 1)).__class__.__name__
        'Linear'
    """
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (a temporary file, then a rename).

    ``state`` holds tensors, numbers, strings, lists and dicts only, so it loads with
    ``weights_only=True``.

    Example:
        >>> import tempfile, os
        >>> path = save_checkpoint(os.path.join(tempfile.mkdtemp(), "last.pt"), {"epoch": 1})
        >>> load_checkpoint(path)["epoch"]
        1
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save({"version": CHECKPOINT_VERSION, **state}, temporary)
    os.replace(temporary, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (no code is unpickled).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a convmoe training checkpoint.

    Example:
        >>> load_checkpoint("missing.pt")
        Traceback (most recent call last):
        ...
        FileNotFoundError: checkpoint missing.pt does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "version" not in state:
        raise ValueError(f"{path} is not a convmoe training checkpoint (no 'version' key); for a bare state dict "
                         "use torch.load and model.load_state_dict.")
    return state
