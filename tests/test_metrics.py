"""Metrics: top-k accuracy, confusion matrix, per-class IoU and mIoU against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from convmoe.engine.metrics import (
    ClassificationMetrics,
    SegmentationMetrics,
    confusion_matrix,
    iou_from_confusion,
    topk_correct,
)

# Target and prediction of a 2x3 image, 3 classes, 255 = ignore. Scored pixels (5 of 6):
# truth 0 0 1 1 2, prediction 0 1 1 1 2.
#   class 0: TP 1, FP 0, FN 1 -> 1/2;  class 1: TP 2, FP 1, FN 0 -> 2/3;  class 2: TP 1 -> 1
#   (the ignored pixel predicted 2 is not a false positive). mIoU = (1/2 + 2/3 + 1) / 3.
TARGET = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
PRED = torch.tensor([[[0, 1, 1], [1, 2, 2]]])
EXPECTED_IOU = [0.5, 2 / 3, 1.0]


def one_hot_logits(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(pred, num_classes).permute(0, 3, 1, 2).float()


def test_confusion_matrix_counts_rows_as_truth_and_skips_ignore():
    confusion = confusion_matrix(PRED, TARGET, 3, ignore_index=255)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]


def test_miou_matches_hand_computed_example():
    metric = SegmentationMetrics(3, ignore_index=255, class_names=["a", "b", "c"])
    metric.update(one_hot_logits(PRED, 3), TARGET)
    result = metric.compute()
    assert [result["iou/a"], result["iou/b"], result["iou/c"]] == pytest.approx(EXPECTED_IOU)
    assert result["miou"] == pytest.approx(sum(EXPECTED_IOU) / 3)
    assert result["pixel_accuracy"] == pytest.approx(4 / 5)


def test_miou_accumulates_over_batches_like_one_batch():
    split = SegmentationMetrics(3, ignore_index=255)
    split.update(one_hot_logits(PRED[:, :1], 3), TARGET[:, :1])
    split.update(one_hot_logits(PRED[:, 1:], 3), TARGET[:, 1:])
    whole = SegmentationMetrics(3, ignore_index=255)
    whole.update(one_hot_logits(PRED, 3), TARGET)
    assert split.confusion.equal(whole.confusion)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    iou = iou_from_confusion(confusion_matrix(PRED, TARGET, 4, ignore_index=255))
    assert math.isnan(float(iou[3]))
    metric = SegmentationMetrics(4, ignore_index=255)
    metric.update(one_hot_logits(PRED, 4), TARGET)
    assert metric.compute()["miou"] == pytest.approx(sum(EXPECTED_IOU) / 3)


def test_logits_at_lower_resolution_are_resized_to_the_target():
    metric = SegmentationMetrics(2)
    logits = torch.tensor([[[[1.0]], [[0.0]]]])  # 1x1 map predicting class 0
    metric.update(logits, torch.zeros(1, 4, 4, dtype=torch.long))
    assert metric.compute()["pixel_accuracy"] == 1.0
    assert int(metric.confusion.sum()) == 16


def test_class_names_must_match_the_number_of_classes():
    with pytest.raises(ValueError, match="2 class_names for num_classes=3"):
        SegmentationMetrics(3, class_names=["a", "b"])


def test_topk_correct_and_accuracy_percentages():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    target = torch.tensor([2, 0, 0])
    assert topk_correct(logits, target, ks=(1, 2, 3)).tolist() == [1, 2, 3]
    metric = ClassificationMetrics(topk=(1, 2))
    metric.update(logits, target)
    metric.update(logits[:1], torch.tensor([1]))
    assert metric.compute() == pytest.approx({"top1": 50.0, "top2": 75.0})
    metric.reset()
    metric.update(logits, target)
    assert metric.compute()["top1"] == pytest.approx(100 / 3)


def test_sync_in_a_single_process_keeps_the_counts():
    metric = SegmentationMetrics(3, ignore_index=255)
    metric.update(one_hot_logits(PRED, 3), TARGET)
    before = metric.confusion.clone()
    metric.sync(torch.device("cpu"))
    assert metric.confusion.equal(before)
