"""Training checkpoints: everything needed to resume, written atomically, read without pickled code.

    save_checkpoint  state -> <name>.<random>.tmp (fsync) -> os.replace -> <name>; stale temporaries removed
    load_checkpoint  torch.load(weights_only=True); junk, truncated or code-carrying files -> one-line ValueError
    capture_rng_state / restore_rng_state   torch (CPU, CUDA), numpy and python ``random`` as plain types
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convmoe.atomic_files import atomic_write

# 2: checkpoints carry the RNG states ("rng") and the loader's position ("loader").
CHECKPOINT_VERSION = 2


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel (``.module``) or ``torch.compile`` (``._orig_mod``).

    Only those wrappers come off: a model's own submodule named ``module`` stays. Layer names and
    checkpoint keys are then the same whether or not the model is wrapped.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 1, 1))
        >>> unwrap_model(nn.DataParallel(model)) is model
        True
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a unique temporary file beside it, fsync, then a rename.

    A process killed mid-write leaves ``path`` as it was (the previous checkpoint) and a stale
    ``.<name>.*.tmp``, which the next save of ``path`` removes (:mod:`convmoe.atomic_files`). ``state`` holds tensors, numbers,
    strings, lists and dicts only, so it loads with ``weights_only=True``.

    Example:
        >>> import tempfile, os
        >>> path = save_checkpoint(os.path.join(tempfile.mkdtemp(), "last.pt"), {"epoch": 1})
        >>> load_checkpoint(path)["epoch"]
        1
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as temporary:
        torch.save({"version": CHECKPOINT_VERSION, **state}, temporary)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (no code is unpickled).

    Raises:
        FileNotFoundError: No such file.
        ValueError: The file is junk, truncated, refused by ``weights_only`` loading, or not a
            convmoe training checkpoint; the one-line message names the file, the cause and the fix.

    Example:
        >>> load_checkpoint("missing.pt")
        Traceback (most recent call last):
        ...
        FileNotFoundError: checkpoint missing.pt does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise
    except Exception as error:  # torch.load fails on junk with any of a dozen types (KeyError, EOFError, ...)
        raise ValueError(_unreadable_message(path, error)) from error
    if not isinstance(state, dict) or "version" not in state:
        raise ValueError(f"{path} is not a convmoe training checkpoint (no 'version' key); for a bare state dict "
                         "use torch.load and model.load_state_dict.")
    return state


def _unreadable_message(path: Path, error: Exception) -> str:
    text = str(error)
    if "WeightsUnpickler error:" in text:  # torch wraps the unpickler's reason in paragraphs of advice
        text = text.split("WeightsUnpickler error:", 1)[1]
    reason = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if reason.startswith("Unsupported global:"):
        words = reason.removeprefix("Unsupported global:").split()  # "GLOBAL fractions.Fraction was not ..."
        name = words[1] if len(words) > 1 and words[0] == "GLOBAL" else "object"
        return (f"{path} cannot be read as a checkpoint: it holds a pickled {name}, which "
                "torch.load(weights_only=True) refuses, as convmoe loads no pickled code; if you trust the file, "
                "load it with torch.load(weights_only=False) and re-save its tensors with save_checkpoint.")
    reason = reason.split(". ")[0][:160]
    cause = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
    return (f"{path} cannot be read as a checkpoint ({cause}): it is truncated or corrupt (an interrupted copy, a full "
            "disk?) or not a torch file; copy it again, or use another checkpoint of the run (best.pt or "
            "last.pt; to resume training, delete it to start over).")


def capture_rng_state() -> dict[str, Any]:
    """Every global random state of this process, as plain types that load with ``weights_only=True``.

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor per device] (empty without CUDA in use),
        "numpy": dict or None (numpy not installed), "python": [version, int64 tensor, gauss_next]}``.

    Example:
        >>> state = capture_rng_state()
        >>> a = torch.rand(2)
        >>> restore_rng_state(state)
        >>> torch.equal(torch.rand(2), a)
        True
    """
    version, internal, gauss_next = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": _numpy_state(),
            "python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next]}


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global random states saved by :func:`capture_rng_state`.

    CUDA states are restored when this process sees as many devices as the saving one did (else a
    warning says the continuation is not exact).

    Example:
        >>> restore_rng_state(capture_rng_state())
    """
    torch.set_rng_state(state["torch"].cpu())
    cuda = list(state.get("cuda") or [])
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            warnings.warn(f"the checkpoint holds RNG states of {len(cuda)} CUDA devices, this process sees "
                          f"{torch.cuda.device_count()}; their random streams restart, so the continuation is not "
                          "exact.", UserWarning, stacklevel=2)
    if state.get("numpy") is not None:
        _set_numpy_state(state["numpy"])
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), gauss_next))


def _numpy_state() -> dict[str, Any] | None:
    try:
        import numpy as np
    except ImportError:
        return None
    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {"algorithm": str(algorithm), "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _set_numpy_state(state: dict[str, Any]) -> None:
    try:
        import numpy as np
    except ImportError:
        return
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((state["algorithm"], keys, state["position"], state["has_gauss"], state["cached_gaussian"]))
