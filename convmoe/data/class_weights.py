"""Class weights for an imbalanced segmentation loss: median frequency balancing (Eigen & Fergus, 2015)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from torch import Tensor


def median_frequency_weights(masks: Iterable[Tensor | np.ndarray], num_classes: int,
                             ignore_index: int | None = None) -> list[float]:
    """Median frequency balancing: ``weight[c] = median(freq) / freq[c]``.

    ``freq[c]`` is the pixels of class ``c`` over the pixels of the masks in which ``c`` appears (as in
    Eigen & Fergus, 2015, and SegNet's CamVid weights), so rare small classes such as poles and signs
    weigh more than sky and road. Pass the result as the ``weight`` of ``torch.nn.CrossEntropyLoss``
    (in a recipe: ``weight: {_target_: torch.tensor, _args_: [[...]]}``).

    Args:
        masks: Label masks (any shape) with ids ``0..num_classes-1``; ``ignore_index`` pixels are not counted.
        num_classes: The number of classes.
        ignore_index: A label that is not a class (void).

    Returns:
        One weight per class, rounded to 4 decimals.

    Raises:
        ValueError: A mask holds a label outside the classes and ``ignore_index``, or a class never appears.

    Example:
        >>> import torch
        >>> masks = [torch.tensor([[0, 0, 0, 1]]), torch.tensor([[0, 0, 2, 2]])]
        >>> median_frequency_weights(masks, num_classes=3)  # freq 5/8, 1/4, 1/2: median 1/2
        [0.8, 2.0, 1.0]
    """
    pixels = np.zeros(num_classes, dtype=np.float64)
    seen_in = np.zeros(num_classes, dtype=np.float64)
    for mask in masks:
        labels = np.asarray(mask.cpu() if isinstance(mask, Tensor) else mask).ravel().astype(np.int64)
        if ignore_index is not None:
            labels = labels[labels != ignore_index]
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            bad = labels[(labels < 0) | (labels >= num_classes)][0]
            raise ValueError(f"median_frequency_weights(): label {bad} is not a class id 0..{num_classes - 1} "
                             f"nor ignore_index={ignore_index}; pass the dataset's ignore_index.")
        counts = np.bincount(labels, minlength=num_classes)
        pixels += counts
        seen_in += (counts > 0) * labels.size
    missing = [c for c in range(num_classes) if pixels[c] == 0]
    if missing:
        raise ValueError(f"median_frequency_weights(): classes {missing} never appear in the masks, so they have "
                         "no frequency; check num_classes or the split.")
    frequency = pixels / seen_in
    return [round(float(w), 4) for w in np.median(frequency) / frequency]


def dataset_masks(dataset: Iterable[dict[str, Tensor]]) -> Iterable[Tensor]:
    """The ``mask`` of each item of a segmentation dataset (e.g. :class:`convmoe.data.CamVidDataset`).

    Example:
        >>> import torch
        >>> [m.tolist() for m in dataset_masks([{"mask": torch.tensor([1])}])]
        [[1]]
    """
    return (item["mask"] for item in dataset)
