"""Reading images and masks from files as numpy arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path: str | Path) -> np.ndarray:
    """An image file as an RGB array, (H, W, 3) uint8.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.png")
        >>> Image.new("L", (5, 4)).save(path)
        >>> read_image(path).shape
        (4, 5, 3)
    """
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def read_mask(path: str | Path) -> np.ndarray:
    """A label image (one class id per pixel, 8- or 16-bit grey or palette) as (H, W) int64.

    Raises:
        ValueError: The file has colour channels: store class ids, not colours.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "m.png")
        >>> Image.fromarray(np.array([[0, 11]], dtype=np.uint8)).save(path)
        >>> read_mask(path).tolist()
        [[0, 11]]
    """
    with Image.open(path) as mask:
        if mask.mode not in ("L", "P", "I", "I;16", "1"):
            raise ValueError(f"mask {path} has mode {mask.mode!r}; expected a one-channel label image of class ids "
                             "(mode L, P or I), not a colour rendering.")
        return np.array(mask, dtype=np.int64)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name.

    Example:
        >>> import tempfile
        >>> list_images(tempfile.mkdtemp())
        []
    """
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
