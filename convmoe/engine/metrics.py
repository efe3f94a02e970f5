"""Metrics: top-k accuracy for classification; per-class IoU and mIoU with an ignore index for segmentation.

Each metric keeps additive counts (``update``), sums them over processes (``sync``) and turns
them into numbers (``compute``), so distributed results equal single-process ones exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from convmoe.engine.processes import all_reduce_sum


def check_output_fits_target(logits: Tensor, target: Tensor, ignore_index: int | None = None,
                             check_labels: bool = True) -> None:
    """Raise unless ``logits`` and ``target`` are of one task and (``check_labels``) the labels are among the
    model's classes, which the metrics would otherwise pass over silently.

    Classification: logits (B, C) and labels (B,); segmentation: logits (B, C, H, W) and labels (B, H, W).
    Labels must lie in [0, C), except ``ignore_index``.

    Raises:
        ValueError: The model's output and the data's labels, and the fix.

    Example:
        >>> check_output_fits_target(torch.zeros(2, 5), torch.tensor([4, 0]))
        >>> check_output_fits_target(torch.zeros(2, 5), torch.zeros(2, 8, 8))
        Traceback (most recent call last):
        ...
        ValueError: the model outputs class logits (2, 5), but the data gives per-pixel labels (2, 8, 8); use data of the model's task (the config of the recipe it was trained with).
    """
    kinds = {2: "class logits", 4: "per-pixel logits"}
    labels = {1: "class labels", 3: "per-pixel labels"}
    if logits.dim() not in kinds or target.dim() != logits.dim() - 1:
        raise ValueError(f"the model outputs {kinds.get(logits.dim(), 'a tensor')} {tuple(logits.shape)}, but the data "
                         f"gives {labels.get(target.dim(), 'targets')} {tuple(target.shape)}; use data of the model's "
                         "task (the config of the recipe it was trained with).")
    if target.is_floating_point() or not check_labels:
        return  # soft targets (mixup, label smoothing by hand): no label to check
    scored = target if ignore_index is None else target[target != ignore_index]
    if not scored.numel():
        return
    low, high = int(scored.min()), int(scored.max())
    if low < 0 or high >= logits.shape[1]:
        wrong = high if high >= logits.shape[1] else low
        raise ValueError(f"the data has label {wrong} but the model outputs {logits.shape[1]} classes; use a model "
                         "with as many classes as the dataset, or set the loss's ignore_index (or the config's) "
                         "for that label.")


def topk_correct(logits: Tensor, target: Tensor, ks: Sequence[int]) -> Tensor:
    """How many samples have their label among the top-k logits, for each k, (len(ks),) int64.

    k larger than the number of classes counts every sample.

    Example:
        >>> logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
        >>> topk_correct(logits, torch.tensor([1, 2]), ks=(1, 2)).tolist()
        [1, 1]
    """
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices  # (B, k_max)
    hit = top.eq(target[:, None])
    return torch.stack([hit[:, :min(k, k_max)].any(dim=1).sum() for k in ks]).long()


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None) -> Tensor:
    """Counts of (true class, predicted class), (num_classes, num_classes) int64; row = truth.

    Pixels whose target is ``ignore_index`` or outside ``[0, num_classes)`` are not counted.

    Example:
        >>> confusion_matrix(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 2]), 2, ignore_index=2).tolist()
        [[1, 1], [0, 1]]
    """
    pred, target = pred.flatten().long(), target.flatten().long()
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    index = target[keep] * num_classes + pred[keep]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(confusion: Tensor) -> Tensor:
    """Per-class IoU = TP / (TP + FP + FN), (C,) float64; NaN for a class absent from both truth and prediction.

    Example:
        >>> iou_from_confusion(torch.tensor([[1, 1], [0, 1]])).tolist()
        [0.5, 0.5]
    """
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp_min(1), torch.full_like(union, float("nan")))


class ClassificationMetrics:
    """Top-k accuracy (in %) over all updates since the last ``reset``.

    Args:
        topk: The k's to report, as ``top1``, ``top5``, ...

    Example:
        >>> metric = ClassificationMetrics(topk=(1,))
        >>> metric.update(torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0]))
        >>> metric.compute()
        {'top1': 50.0}
    """

    def __init__(self, topk: Sequence[int] = (1, 5)) -> None:
        self.topk = tuple(topk)
        self.reset()

    def reset(self) -> None:
        """Forget all updates."""
        self.correct = torch.zeros(len(self.topk), dtype=torch.long)
        self.total = torch.zeros((), dtype=torch.long)

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add a batch: logits (B, num_classes), target (B,) class ids."""
        self.correct += topk_correct(logits.float(), target, self.topk).cpu()
        self.total += target.numel()

    def sync(self, device: torch.device) -> None:
        """Sum the counts over processes (call once, before ``compute``)."""
        self.correct = all_reduce_sum(self.correct.to(device)).cpu()
        self.total = all_reduce_sum(self.total.to(device)).cpu()

    def compute(self) -> dict[str, float]:
        """``{"top1": %, "top5": %, ...}``."""
        total = max(int(self.total), 1)
        return {f"top{k}": 100.0 * int(c) / total for k, c in zip(self.topk, self.correct, strict=True)}


class SegmentationMetrics:
    """Per-class IoU, mIoU (mean over classes present in truth or prediction) and pixel accuracy.

    Logits of another spatial size than the target are resized (bilinear) before the argmax.

    Args:
        num_classes: Number of classes C (the logits' channels).
        ignore_index: Target value that is not scored (CamVid: 11).
        class_names: Names for the per-class keys ``iou/<name>`` (default: the class ids).

    Example:
        >>> metric = SegmentationMetrics(num_classes=2, ignore_index=255)
        >>> logits = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])   # predicts [[0, 1]]
        >>> metric.update(logits, torch.tensor([[[0, 255]]]))
        >>> metric.compute()["miou"]
        1.0
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None,
                 class_names: Sequence[str] | None = None) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}; give one name per class.")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        """Forget all updates."""
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    @torch.no_grad()
    def update(self, logits: Tensor, target: Tensor) -> None:
        """Add a batch: logits (B, C, H', W'), target (B, H, W) class ids."""
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
        pred = logits.argmax(dim=1)
        self.confusion += confusion_matrix(pred, target, self.num_classes, self.ignore_index).cpu()

    def sync(self, device: torch.device) -> None:
        """Sum the confusion matrices over processes (call once, before ``compute``)."""
        self.confusion = all_reduce_sum(self.confusion.to(device)).cpu()

    def compute(self) -> dict[str, float]:
        """``{"miou", "pixel_accuracy", "iou/<class>"...}``; IoUs in [0, 1], NaN for absent classes."""
        iou = iou_from_confusion(self.confusion)
        scored = int(self.confusion.sum())
        out = {"miou": float(iou.nanmean()) if bool((~iou.isnan()).any()) else float("nan"),
               "pixel_accuracy": float(self.confusion.diagonal().sum()) / scored if scored else float("nan")}
        out.update({f"iou/{name}": float(value) for name, value in zip(self.class_names, iou, strict=True)})
        return out
