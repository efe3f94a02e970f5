"""Joint image/mask augmentations with the call convention and names of albumentations.

Each transform is called as ``t(image=image, mask=mask)`` and returns a dict with the same keys,
so a config's ``augmentation_list`` works with these classes or with albumentations' own.
``image`` is an (H, W, C) numpy array (uint8 until :class:`Normalize`), ``mask`` an (H, W) array
of class ids, or absent for classification. Randomness uses torch's generator, which the
DataLoader seeds per worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

Sample = dict[str, Any]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _coin(p: float) -> bool:
    return p >= 1.0 or (p > 0 and float(torch.rand(())) < p)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name}={value!r} must be a positive int or a pair of them (height, width).")
    return int(pair[0]), int(pair[1])


def _apply(sample: Sample, image_fn: Callable[[np.ndarray], np.ndarray],
           mask_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> Sample:
    out = dict(sample)
    out["image"] = image_fn(sample["image"])
    if sample.get("mask") is not None:
        out["mask"] = (mask_fn or image_fn)(sample["mask"])
    return out


def resize_array(array: np.ndarray, height: int, width: int, nearest: bool) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) array; bilinear with antialiasing, or nearest for masks.

    Example:
        >>> resize_array(np.zeros((4, 6, 3), np.uint8), 2, 3, nearest=False).shape
        (2, 3, 3)
    """
    if array.shape[:2] == (height, width):
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    tensor = (tensor[None, None] if array.ndim == 2 else tensor.permute(2, 0, 1)[None]).float()
    if nearest:
        out = F.interpolate(tensor, size=(height, width), mode="nearest-exact")
    else:
        out = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    out = out[0, 0] if array.ndim == 2 else out[0].permute(1, 2, 0)
    if array.dtype == np.uint8:
        out = out.round().clamp(0, 255)
    return out.numpy().astype(array.dtype)


class Compose:
    """Apply transforms in order.

    Example:
        >>> t = Compose([HorizontalFlip(p=1.0)])
        >>> t(image=np.arange(3).reshape(1, 3, 1))["image"].ravel().tolist()
        [2, 1, 0]
    """

    def __init__(self, transforms: Sequence[Callable[..., Sample]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, **sample: Any) -> Sample:
        for transform in self.transforms:
            sample = transform(**sample)
        return sample

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


class _Flip:
    axis = 1

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, **sample: Any) -> Sample:
        if not _coin(self.p):
            return sample
        return _apply(sample, lambda a: np.ascontiguousarray(np.flip(a, self.axis)))


class HorizontalFlip(_Flip):
    """Mirror left-right with probability ``p``.

    Example:
        >>> HorizontalFlip(p=1.0)(image=np.array([[[1], [2]]]))["image"].ravel().tolist()
        [2, 1]
    """

    axis = 1


class VerticalFlip(_Flip):
    """Mirror top-bottom with probability ``p``.

    Example:
        >>> VerticalFlip(p=1.0)(image=np.array([[[1]], [[2]]]))["image"].ravel().tolist()
        [2, 1]
    """

    axis = 0


class PadIfNeeded:
    """Pad (bottom and right equally split around the centre) to at least ``min_height x min_width``.

    Args:
        min_height: The smallest height after padding.
        min_width: The smallest width after padding.
        fill: Image fill value.
        fill_mask: Mask fill value; use the ignore index so padding is not scored.

    Example:
        >>> PadIfNeeded(4, 4)(image=np.ones((2, 3, 1), np.uint8))["image"].shape
        (4, 4, 1)
    """

    def __init__(self, min_height: int, min_width: int, fill: float = 0, fill_mask: int = 0) -> None:
        self.min_height, self.min_width = min_height, min_width
        self.fill, self.fill_mask = fill, fill_mask

    def __call__(self, **sample: Any) -> Sample:
        H, W = sample["image"].shape[:2]
        dh, dw = max(0, self.min_height - H), max(0, self.min_width - W)
        if dh == 0 and dw == 0:
            return sample
        rows, cols = (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)

        def pad(array: np.ndarray, value: float) -> np.ndarray:
            widths = (rows, cols) + ((0, 0),) * (array.ndim - 2)
            return np.pad(array, widths, constant_values=value)

        return _apply(sample, lambda a: pad(a, self.fill), lambda m: pad(m, self.fill_mask))


class RandomCrop:
    """A random ``height x width`` window; smaller inputs are an error unless ``pad_if_needed``.

    Example:
        >>> RandomCrop(2, 2)(image=np.zeros((5, 5, 3)), mask=np.zeros((5, 5)))["mask"].shape
        (2, 2)
    """

    def __init__(self, height: int, width: int, pad_if_needed: bool = False, fill: float = 0,
                 fill_mask: int = 0) -> None:
        self.height, self.width = _pair((height, width), "RandomCrop size")
        self.pad = PadIfNeeded(self.height, self.width, fill, fill_mask) if pad_if_needed else None

    def __call__(self, **sample: Any) -> Sample:
        if self.pad is not None:
            sample = self.pad(**sample)
        H, W = sample["image"].shape[:2]
        if self.height > H or self.width > W:
            raise ValueError(f"RandomCrop({self.height}, {self.width}) got an image of {H}x{W}; crop smaller, "
                             "resize first, or set pad_if_needed=True.")
        top = int(torch.randint(0, H - self.height + 1, ()))
        left = int(torch.randint(0, W - self.width + 1, ()))
        return _apply(sample, lambda a: a[top:top + self.height, left:left + self.width])


class CenterCrop:
    """The central ``height x width`` window.

    Example:
        >>> CenterCrop(1, 1)(image=np.arange(9).reshape(3, 3, 1))["image"].item()
        4
    """

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = _pair((height, width), "CenterCrop size")

    def __call__(self, **sample: Any) -> Sample:
        H, W = sample["image"].shape[:2]
        if self.height > H or self.width > W:
            raise ValueError(f"CenterCrop({self.height}, {self.width}) got an image of {H}x{W}.")
        top, left = (H - self.height) // 2, (W - self.width) // 2
        return _apply(sample, lambda a: a[top:top + self.height, left:left + self.width])


class Resize:
    """Resize to ``height x width`` (bilinear for the image, nearest for the mask).

    Example:
        >>> Resize(4, 6)(image=np.zeros((2, 3, 3), np.uint8), mask=np.zeros((2, 3)))["mask"].shape
        (4, 6)
    """

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = _pair((height, width), "Resize size")

    def __call__(self, **sample: Any) -> Sample:
        return _apply(sample, lambda a: resize_array(a, self.height, self.width, nearest=False),
                      lambda m: resize_array(m, self.height, self.width, nearest=True))


class RandomScale:
    """Rescale by a factor drawn uniformly from ``1 + scale_limit`` (a float ``l`` means ``(-l, l)``).

    Example:
        >>> RandomScale(scale_limit=(1.0, 1.0))(image=np.zeros((4, 4, 3), np.uint8))["image"].shape
        (8, 8, 3)
    """

    def __init__(self, scale_limit: float | Sequence[float] = 0.1, p: float = 1.0) -> None:
        low, high = (-scale_limit, scale_limit) if isinstance(scale_limit, (int, float)) else scale_limit
        if 1 + low <= 0 or high < low:
            raise ValueError(f"scale_limit={scale_limit!r} must give factors 1 + limit > 0, low <= high.")
        self.low, self.high, self.p = 1 + low, 1 + high, p

    def __call__(self, **sample: Any) -> Sample:
        if not _coin(self.p):
            return sample
        factor = self.low + (self.high - self.low) * float(torch.rand(()))
        H, W = sample["image"].shape[:2]
        h, w = max(1, round(H * factor)), max(1, round(W * factor))
        return _apply(sample, lambda a: resize_array(a, h, w, nearest=False),
                      lambda m: resize_array(m, h, w, nearest=True))


class Normalize:
    """``(image / max_pixel_value - mean) / std`` per channel, as float32.

    Example:
        >>> Normalize(mean=(0.5,), std=(0.5,))(image=np.full((1, 1, 1), 255, np.uint8))["image"].item()
        1.0
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 max_pixel_value: float = 255.0) -> None:
        self.mean = np.asarray(mean, dtype=np.float32) * max_pixel_value
        self.inv_std = 1.0 / (np.asarray(std, dtype=np.float32) * max_pixel_value)

    def __call__(self, **sample: Any) -> Sample:
        out = dict(sample)
        out["image"] = ((sample["image"].astype(np.float32) - self.mean) * self.inv_std).astype(np.float32)
        return out


class ToTensorV2:
    """Image (H, W, C) array -> (C, H, W) tensor; mask (H, W) -> int64 tensor.

    Example:
        >>> ToTensorV2()(image=np.zeros((2, 3, 4), np.float32))["image"].shape
        torch.Size([4, 2, 3])
    """

    def __call__(self, **sample: Any) -> Sample:
        return to_tensors(sample)


def to_tensors(sample: Sample) -> Sample:
    """What the model takes: a float (C, H, W) image (uint8 scaled to [0, 1]) and an int64 mask.

    Leaves tensors as they are, so it can follow any ``ToTensorV2``.

    Example:
        >>> to_tensors({"image": np.full((1, 1, 3), 255, np.uint8)})["image"].flatten().tolist()
        [1.0, 1.0, 1.0]
    """
    out = dict(sample)
    image = sample["image"]
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image if image.ndim == 3 else image[..., None])).permute(2, 0, 1)
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    out["image"] = image
    mask = sample.get("mask")
    if mask is not None:
        out["mask"] = (torch.from_numpy(np.ascontiguousarray(mask)) if isinstance(mask, np.ndarray) else mask).long()
    return out


def compose(augmentation_list: Sequence[Callable[..., Sample]] | Callable[..., Sample] | None) -> Callable[..., Sample]:
    """One callable from a list of transforms (or one transform, or None for no augmentation).

    Example:
        >>> compose(None)(image=np.zeros((1, 1, 3)))["image"].shape
        (1, 1, 3)
    """
    if augmentation_list is None:
        return Compose([])
    if callable(augmentation_list):
        return augmentation_list
    return Compose(augmentation_list)
