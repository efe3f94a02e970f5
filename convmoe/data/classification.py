"""Classification datasets from standard layouts: an image folder and the CIFAR-10 python batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from convmoe.data.io import list_images, read_image
from convmoe.data.safe_pickle import load_cifar_pickle
from convmoe.data.transforms import compose, to_tensors

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class ImageFolderDataset(Dataset):
    """Images in one folder per class: ``root/<class>/<image>`` (or ``root/<split>/<class>/<image>``).

    Classes are the sorted folder names; label ``i`` is the i-th. Items are dicts
    ``{"image": (C, H, W) float tensor, "label": int}``.

    A validation split without touching the test set: ``hold_out`` images of the folder (a count, or a
    fraction in (0, 1)), the same share of every class, chosen by ``hold_out_seed``, are left out
    (``part="rest"``, the default) or are the dataset (``part="held_out"``). Two datasets with the same
    ``hold_out`` and seed and the two parts are disjoint and together the whole folder.

    Args:
        root: The dataset folder.
        split: Optional sub-folder (``"train"``, ``"test"``).
        augmentation_list: Transforms called as ``t(image=...)`` (see :mod:`convmoe.data.transforms`).
        hold_out: Images held out for validation: a count or a fraction; 0 (the default) holds out none.
        part: ``"rest"`` or ``"held_out"``.
        hold_out_seed: Seed of the choice of held-out images.

    Raises:
        ValueError: No class folder or no image found; a bad ``hold_out`` or ``part``.

    Example:
        >>> dataset = ImageFolderDataset("tests/fixtures/cifar10_folder", split="test")  # doctest: +SKIP
        >>> dataset[0]["image"].shape  # doctest: +SKIP
        torch.Size([3, 32, 32])
    """

    def __init__(self, root: str | Path, split: str | None = None,
                 augmentation_list: Sequence[Callable[..., dict]] | None = None, hold_out: float = 0,
                 part: str = "rest", hold_out_seed: int = 0) -> None:
        folder = Path(root) / split if split else Path(root)
        if not folder.is_dir():
            raise ValueError(f"image folder {folder} does not exist.")
        self.classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"{folder} has no class folders; expected {folder}/<class>/<image>.")
        self.samples = [(path, label) for label, name in enumerate(self.classes) for path in list_images(folder / name)]
        if not self.samples:
            raise ValueError(f"no image found under {folder}/<class>/.")
        self.samples = held_out_part(self.samples, hold_out, part, hold_out_seed)
        self.transform = compose(augmentation_list)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        sample = to_tensors(self.transform(image=read_image(path)))
        return {"image": sample["image"], "label": label}


def held_out_part(samples: list[tuple[Path, int]], hold_out: float, part: str, seed: int) -> list[tuple[Path, int]]:
    """The ``part`` (``"rest"`` or ``"held_out"``) of ``(path, label)`` samples when ``hold_out`` of them
    (a count or a fraction), the same share of every label, are held out; order kept.

    Example:
        >>> samples = [(Path(f"{i}.png"), i % 2) for i in range(10)]
        >>> sorted(label for _, label in held_out_part(samples, 0.4, "held_out", seed=0))  # 2 of each label
        [0, 0, 1, 1]
    """
    if part not in ("rest", "held_out"):
        raise ValueError(f"part={part!r} must be 'rest' or 'held_out'.")
    if isinstance(hold_out, bool) or not isinstance(hold_out, (int, float)) or hold_out < 0 or (
            not isinstance(hold_out, int) and hold_out >= 1) or hold_out >= len(samples):
        raise ValueError(f"hold_out={hold_out!r} must be a count below the {len(samples)} images or a fraction in "
                         "(0, 1); e.g. hold_out=5000 or 0.1.")
    if hold_out == 0:
        if part == "held_out":
            raise ValueError("part='held_out' needs hold_out > 0 (the images to hold out).")
        return samples
    fraction = hold_out / len(samples) if isinstance(hold_out, int) else hold_out
    generator = torch.Generator().manual_seed(seed)
    held: set[int] = set()
    by_label: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(samples):
        by_label.setdefault(label, []).append(index)
    for label in sorted(by_label):
        indices = by_label[label]
        count = round(fraction * len(indices))
        order = torch.randperm(len(indices), generator=generator)[:count].tolist()
        held.update(indices[i] for i in order)
    keep = (lambda i: i in held) if part == "held_out" else (lambda i: i not in held)
    return [sample for i, sample in enumerate(samples) if keep(i)]


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch file: images (N, 32, 32, 3) uint8 and labels (N,) int64.

    Example:
        >>> images, labels = read_cifar_batch("tests/fixtures/cifar-10-batches-py/test_batch")  # doctest: +SKIP
    """
    with open(path, "rb") as f:
        # The CIFAR-10 release is a pickle: read with an unpickler that resolves only arrays and bytes.
        batch = load_cifar_pickle(f, str(path))
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch.get(b"labels", batch.get(b"fine_labels")), dtype=np.int64)
    return cifar_images(data), labels


def cifar_images(data: np.ndarray) -> np.ndarray:
    """A CIFAR batch's ``data`` rows (N, 3072: the R, G and B planes of 32 x 32) as images (N, 32, 32, 3).

    Example:
        >>> cifar_images(np.zeros((2, 3072), np.uint8)).shape
        (2, 32, 32, 3)
    """
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


class CIFAR10Dataset(Dataset):
    """CIFAR-10 from its python release: ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``.

    ``root`` is the folder holding the batches (``cifar-10-batches-py``) or its parent.
    Items are dicts ``{"image": (3, 32, 32) float tensor, "label": int}``.

    Args:
        root: Folder with the batch files.
        split: ``"train"`` (every ``data_batch_*`` present) or ``"test"``.
        augmentation_list: Transforms called as ``t(image=...)``.

    Raises:
        ValueError: Unknown split, or no batch file found.

    Example:
        >>> dataset = CIFAR10Dataset("tests/fixtures/cifar-10-batches-py", split="test")  # doctest: +SKIP
        >>> len(dataset.classes)  # doctest: +SKIP
        10
    """

    classes = CIFAR10_CLASSES

    def __init__(self, root: str | Path, split: str = "train",
                 augmentation_list: Sequence[Callable[..., dict]] | None = None) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r} must be 'train' or 'test'.")
        folder = Path(root)
        if not (folder / "test_batch").exists() and (folder / "cifar-10-batches-py").is_dir():
            folder = folder / "cifar-10-batches-py"
        files = sorted(folder.glob("data_batch_*")) if split == "train" else [folder / "test_batch"]
        files = [f for f in files if f.is_file()]
        if not files:
            raise ValueError(f"no CIFAR-10 {split} batch in {folder}; expected data_batch_1.. or test_batch there.")
        parts = [read_cifar_batch(f) for f in files]
        self.images = np.concatenate([images for images, _ in parts])
        self.labels = np.concatenate([labels for _, labels in parts])
        self.transform = compose(augmentation_list)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = to_tensors(self.transform(image=self.images[index]))
        return {"image": sample["image"], "label": int(self.labels[index])}
