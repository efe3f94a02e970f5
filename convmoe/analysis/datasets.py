"""Reading ``convmoe analyze``'s DATA argument: an image folder, a CamVid folder, or a training config.

Uses the dataset classes of :mod:`convmoe.data`:

- ``root/<class>/<image>`` (or ``root/<split>/<class>/<image>`` with a split): classification,
  :class:`~convmoe.data.ImageFolderDataset`;
- ``root/<split>/`` and ``root/<split>annot/`` (CamVid's SegNet layout): segmentation,
  :class:`~convmoe.data.CamVidDataset` (ignore index 11);
- a ``.yaml`` training config: its ``<split>_dataset`` section, with the transforms it trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from convmoe.data import CamVidDataset, ImageFolderDataset
from convmoe.data.io import list_images
from convmoe.data.transforms import Normalize, Resize
from convmoe.engine.config import load_config
from convmoe.engine.loaders import build_dataset

NORMALIZATIONS = ("imagenet", "none")


def _transforms(image_size: Sequence[int] | None, normalize: str) -> list[Any]:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} must be one of {', '.join(NORMALIZATIONS)}.")
    transforms: list[Any] = []
    if image_size is not None:
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size={image_size!r} must be (height, width) with positive sides.")
        transforms.append(Resize(int(image_size[0]), int(image_size[1])))
    if normalize == "imagenet":
        transforms.append(Normalize())
    return transforms


def _has_class_folders_with_images(folder: Path) -> bool:
    return any(sub.is_dir() and list_images(sub) for sub in folder.iterdir())


def load_dataset(data: str | Path, split: str | None = None, image_size: Sequence[int] | None = None,
                 normalize: str = "imagenet") -> Dataset:
    """The dataset that ``data`` names (see the module docstring), with ``Resize`` and ``Normalize`` for folders.

    Args:
        data: An image folder, a CamVid folder, or a YAML training config.
        split: Sub-folder (``"val"``, ``"test"``) or config section (``<split>_dataset``); default: none for
            an image folder, ``"val"`` for CamVid and configs.
        image_size: (height, width) to resize folder images to (needed to batch images of different sizes).
        normalize: ``"imagenet"`` (mean/std of ImageNet, what timm and smp encoders expect) or ``"none"``
            (pixels in [0, 1]). A config brings its own transforms and ignores both options.

    Raises:
        ValueError: ``data`` is none of these layouts; the message lists what was looked for.

    Example:
        >>> load_dataset("tests/fixtures/camvid", image_size=(32, 48)).classes[0]  # doctest: +SKIP
        'sky'
    """
    path = Path(data)
    if path.suffix in (".yaml", ".yml"):
        return _config_dataset(path, split or "val")
    if not path.is_dir():
        raise ValueError(f"dataset {str(data)!r} is not a folder or a .yaml config; give an image folder "
                         "(root/<class>/<image>), a CamVid folder (root/<split> and root/<split>annot) or a config.")
    transforms = _transforms(image_size, normalize)
    camvid_split = split or "val"
    if (path / camvid_split).is_dir() and (path / f"{camvid_split}annot").is_dir():
        return CamVidDataset(path, camvid_split, augmentation_list=transforms)
    if split is not None:
        if not (path / split).is_dir():
            found = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise ValueError(f"{path} has no split folder {split!r}; sub-folders: {found}.")
        return ImageFolderDataset(path, split, augmentation_list=transforms)
    if not _has_class_folders_with_images(path):
        found = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise ValueError(f"{path} has no <class>/<image> folders (sub-folders: {found}); if these are splits, pass "
                         "--split, e.g. --split val.")
    return ImageFolderDataset(path, augmentation_list=transforms)


def _config_dataset(path: Path, split: str) -> Dataset:
    config = load_config(path)
    node = config.get(f"{split}_dataset")
    if not node:
        raise ValueError(f"config {path} has no {split}_dataset section; available: "
                         f"{sorted(k for k in config if k.endswith('_dataset'))}.")
    return build_dataset(node)
