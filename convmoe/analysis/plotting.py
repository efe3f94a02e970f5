"""Shared plotting helpers: matplotlib imported lazily (an optional dependency), expert colours, saving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_INSTALL_HINT = "pip install 'convmoe[analysis]' (or pip install matplotlib)"


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or an ImportError that says how to install it.

    Figures are only ever written to files, so the Agg backend is forced: it needs no display and is
    safe in worker processes and on servers.

    Raises:
        ImportError: matplotlib is not installed.

    Example:
        >>> plt = require_matplotlib()
        >>> plt.get_backend().lower()
        'agg'
    """
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(f"convmoe.analysis plots need matplotlib, which is not installed; {_INSTALL_HINT}.") from error
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def expert_colors(num_experts: int) -> list[tuple[float, float, float, float]]:
    """One distinct RGBA colour per expert (tab10 up to 10 experts, tab20 up to 20, then a hue wheel).

    Example:
        >>> len(expert_colors(4)), len(expert_colors(32))
        (4, 32)
    """
    plt = require_matplotlib()
    if num_experts <= 10:
        cmap = plt.get_cmap("tab10")
        return [cmap(i) for i in range(num_experts)]
    if num_experts <= 20:
        cmap = plt.get_cmap("tab20")
        return [cmap(i) for i in range(num_experts)]
    cmap = plt.get_cmap("hsv")
    return [cmap(i / num_experts) for i in range(num_experts)]


def display_image(image: Tensor) -> Tensor:
    """A (C, H, W) tensor as an (H, W, 3) float image in [0, 1] for display (min-max scaled per image).

    Normalised network inputs have no fixed range, so each image is stretched to [0, 1]; a
    one-channel image is shown in grey.

    Example:
        >>> display_image(torch.tensor([[[-1.0, 1.0]]])).shape
        torch.Size([1, 2, 3])
    """
    image = image.detach().float().cpu()
    if image.dim() != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {tuple(image.shape)}.")
    image = image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else torch.zeros_like(image)
    return image.permute(1, 2, 0)


def save_figure(figure: Any, path: str | Path, dpi: int = 100) -> Path:
    """Write ``figure`` as a PNG (creating the folder) and close it; returns the path.

    Example:
        >>> import tempfile, os
        >>> plt = require_matplotlib()
        >>> save_figure(plt.figure(figsize=(1, 1)), os.path.join(tempfile.mkdtemp(), "a.png")).suffix
        '.png'
    """
    plt = require_matplotlib()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return path


def safe_filename(name: str) -> str:
    """A layer name as a file name stem: dots kept, anything but ``[A-Za-z0-9._-]`` replaced by ``_``.

    Example:
        >>> safe_filename("layer4.0.conv2"), safe_filename("")
        ('layer4.0.conv2', 'model')
    """
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return cleaned or "model"


