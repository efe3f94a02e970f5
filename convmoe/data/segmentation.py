"""Segmentation datasets: CamVid in its SegNet layout, and random crops from a CSV of image/mask paths."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from convmoe.data.io import list_images, read_image, read_mask
from convmoe.data.transforms import compose, to_tensors

CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car",
                  "pedestrian", "bicyclist")
CAMVID_IGNORE_INDEX = 11


class CamVidDataset(Dataset):
    """CamVid in the SegNet layout: ``root/<split>/<name>.{png,jpg}`` and ``root/<split>annot/<name>.png``.

    11 classes (ids 0..10), id 11 is void: train with ``ignore_index=11``. Images and labels are
    paired by file name. Items are dicts ``{"image": (3, H, W) float tensor, "mask": (H, W) int64}``.

    Args:
        root: The CamVid folder.
        split: ``"train"``, ``"val"`` or ``"test"``.
        augmentation_list: Joint transforms called as ``t(image=..., mask=...)``.

    Raises:
        ValueError: Missing folders, or images without labels.

    Example:
        >>> dataset = CamVidDataset("tests/fixtures/camvid", split="val")  # doctest: +SKIP
        >>> dataset[0]["mask"].dtype  # doctest: +SKIP
        torch.int64
    """

    classes = CAMVID_CLASSES
    ignore_index = CAMVID_IGNORE_INDEX

    def __init__(self, root: str | Path, split: str = "train",
                 augmentation_list: Sequence[Callable[..., dict]] | None = None) -> None:
        image_dir, label_dir = Path(root) / split, Path(root) / f"{split}annot"
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise ValueError(f"CamVid folder {folder} does not exist; expected {root}/{split}/ and "
                                 f"{root}/{split}annot/ (the SegNet layout).")
        labels = {p.stem: p for p in list_images(label_dir)}
        images = list_images(image_dir)
        unpaired = [p.name for p in images if p.stem not in labels]
        if unpaired or not images:
            raise ValueError(f"{len(unpaired)} of {len(images)} images in {image_dir} have no label in {label_dir}, "
                             f"e.g. {unpaired[:3]}." if images else f"no image in {image_dir}.")
        self.pairs = [(p, labels[p.stem]) for p in images]
        self.transform = compose(augmentation_list)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, label_path = self.pairs[index]
        sample = to_tensors(self.transform(image=read_image(image_path), mask=read_mask(label_path)))
        return {"image": sample["image"], "mask": sample["mask"]}


def read_pairs_csv(path: str | Path, root_dir: str | Path | None = None, image_key: str = "image",
                   mask_key: str = "mask") -> list[tuple[Path, Path]]:
    """(image, mask) paths from a CSV with a header; relative paths are under ``root_dir`` (default: the CSV's folder).

    Example:
        >>> read_pairs_csv("tests/fixtures/camvid/train.csv")[0][1].suffix  # doctest: +SKIP
        '.png'
    """
    base = Path(root_dir) if root_dir is not None else Path(path).parent
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {image_key, mask_key} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} has no column {sorted(missing)}; columns: {reader.fieldnames}. Set image_key / "
                             "mask_key to the columns holding the paths.")
        return [(base / row[image_key], base / row[mask_key]) for row in reader]


class RandomCropSegmentationDataset(Dataset):
    """Random ``crop_size`` windows from the full-size image/mask pairs listed in a CSV.

    Each item picks an image with probability proportional to its number of crop positions
    (so large images are sampled as often as their area deserves), then a uniformly random
    window, then the augmentations. An epoch is ``samples_per_epoch`` items, whatever the
    number of images. Randomness uses torch's generator (seeded per DataLoader worker).

    Args:
        input_csv_path: CSV with a header and columns ``image_key`` and ``mask_key``.
        crop_size: (height, width) or one int.
        samples_per_epoch: Items per epoch.
        n_classes: Number of classes (for reference; masks are not checked against it).
        root_dir: Folder relative paths start from (default: the CSV's folder).
        augmentation_list: Joint transforms called after the crop as ``t(image=..., mask=...)``.
        image_key: The CSV column of the image paths.
        mask_key: The CSV column of the mask paths.

    Raises:
        ValueError: No image at least as large as the crop.

    Example:
        >>> dataset = RandomCropSegmentationDataset("tests/fixtures/camvid/train.csv", crop_size=64,
        ...                                         samples_per_epoch=10)  # doctest: +SKIP
        >>> len(dataset), dataset[3]["image"].shape  # doctest: +SKIP
        (10, torch.Size([3, 64, 64]))
    """

    def __init__(self, input_csv_path: str | Path, crop_size: int | Sequence[int] = (256, 256),
                 samples_per_epoch: int = 10000, n_classes: int | None = None, root_dir: str | Path | None = None,
                 augmentation_list: Sequence[Callable[..., dict]] | None = None, image_key: str = "image",
                 mask_key: str = "mask") -> None:
        crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        if len(crop) != 2 or min(crop) < 1:
            raise ValueError(f"crop_size={crop_size!r} must be a positive int or (height, width).")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch={samples_per_epoch} must be >= 1.")
        self.crop_size, self.samples_per_epoch, self.n_classes = crop, samples_per_epoch, n_classes
        pairs = read_pairs_csv(input_csv_path, root_dir, image_key, mask_key)
        sizes = [_image_size(image) for image, _ in pairs]
        positions = [(h - crop[0] + 1) * (w - crop[1] + 1) if h >= crop[0] and w >= crop[1] else 0 for h, w in sizes]
        if not any(positions):
            raise ValueError(f"no image in {input_csv_path} is at least {crop[0]}x{crop[1]} (sizes: {sorted(set(sizes))[:3]}); "
                             "use a smaller crop_size.")
        self.pairs = [pair for pair, n in zip(pairs, positions, strict=True) if n > 0]
        self.weights = torch.tensor([n for n in positions if n > 0], dtype=torch.float64)
        self.transform = compose(augmentation_list)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(f"index {index} out of range for samples_per_epoch={self.samples_per_epoch}.")
        image_path, mask_path = self.pairs[int(torch.multinomial(self.weights, 1))]
        image, mask = read_image(image_path), read_mask(mask_path)
        if image.shape[:2] != mask.shape:
            raise ValueError(f"{image_path} is {image.shape[:2]} but its mask {mask_path} is {mask.shape}.")
        h, w = self.crop_size
        top = int(torch.randint(0, image.shape[0] - h + 1, ()))
        left = int(torch.randint(0, image.shape[1] - w + 1, ()))
        window = (slice(top, top + h), slice(left, left + w))
        sample = to_tensors(self.transform(image=image[window], mask=mask[window]))
        return {"image": sample["image"], "mask": sample["mask"]}


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.height, image.width


def write_pairs_csv(path: str | Path, pairs: Sequence[tuple[str | Path, str | Path]], image_key: str = "image",
                    mask_key: str = "mask") -> None:
    """Write (image, mask) paths as a CSV that :class:`RandomCropSegmentationDataset` reads.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "pairs.csv")
        >>> write_pairs_csv(path, [("a.png", "a_mask.png")])
        >>> open(path).read().split()
        ['image,mask', 'a.png,a_mask.png']
    """
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([image_key, mask_key])
        writer.writerows([str(image), str(mask)] for image, mask in pairs)

