"""A model evaluated or trained on a dataset of the other task (a segmentation model on class labels, a
classifier on masks), or on labels beyond its classes, is a one-line error naming both sides, not a torch
error from deep inside a loss or a metric (or, worse, a report of numbers that mean nothing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convmoe.engine.evaluate import run_evaluation
from convmoe.engine.metrics import check_output_fits_target

CPU = torch.device("cpu")


class Segmenter(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :3]  # (B, 3, H, W): per-pixel logits of 3 classes


def test_a_segmentation_model_on_class_labels_is_named():
    batches = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match=r"the model outputs per-pixel logits \(2, 3, 8, 8\), but the data gives "
                                         r"class labels \(2,\); use data of the model's task"):
        run_evaluation(Segmenter(), batches, CPU)


def test_a_classifier_on_masks_is_named():
    model = nn.Sequential(nn.Flatten(), nn.LazyLinear(4))
    batches = [(torch.randn(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"outputs class logits \(2, 4\), but the data gives per-pixel labels "
                                         r"\(2, 8, 8\)"):
        run_evaluation(model, batches, CPU)


def test_labels_beyond_the_models_classes_are_named():
    with pytest.raises(ValueError, match=r"the data has label 7 but the model outputs 3 classes"):
        check_output_fits_target(torch.zeros(2, 3, 4, 4), torch.full((2, 4, 4), 7))


def test_the_ignore_index_is_no_class():
    check_output_fits_target(torch.zeros(2, 3, 4, 4), torch.full((2, 4, 4), 11), ignore_index=11)
    check_output_fits_target(torch.zeros(2, 5), torch.tensor([4, 0]))

