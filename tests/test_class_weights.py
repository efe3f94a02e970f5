"""Median frequency class weights, and class weights in a recipe's loss (torch.tensor is data, allowed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from convmoe.data import CamVidDataset, dataset_masks, median_frequency_weights
from convmoe.engine import instantiate
from convmoe.trust import UntrustedCodeError, check_config_targets

FIXTURES = Path(__file__).parent / "fixtures"


def test_weights_by_hand_and_ignored_pixels_do_not_count():
    masks = [np.array([[0, 0, 0, 1, 3]]), np.array([[0, 0, 2, 2, 3]])]  # 3 is void
    # freq: class 0 5/8 (both masks), class 1 1/4 (first mask only), class 2 2/4; median 1/2
    assert median_frequency_weights(masks, num_classes=3, ignore_index=3) == [0.8, 2.0, 1.0]


def test_weighted_frequencies_are_equal_on_camvid():
    masks = list(dataset_masks(CamVidDataset(FIXTURES / "camvid", split="train")))
    present = sorted({int(c) for m in masks for c in m.unique() if c != 11})
    remap = {c: i for i, c in enumerate(present)}  # the fixture has a few of the 11 classes
    masks = [m.clone().apply_(lambda v: remap.get(v, 11)) for m in masks]
    weights = median_frequency_weights(masks, num_classes=len(present), ignore_index=11)
    pixels = np.array([sum(int((m == c).sum()) for m in masks) for c in range(len(present))])
    seen = np.array([sum(int((m != 11).sum()) for m in masks if (m == c).any()) for c in range(len(present))])
    balanced = np.array(weights) * pixels / seen
    assert np.allclose(balanced, np.median(pixels / seen), rtol=1e-3)  # every class weighs the median in


@pytest.mark.parametrize(("masks", "message"), [
    ([np.array([0, 5])], r"label 5 is not a class id 0..2 nor ignore_index=None; pass the dataset's ignore_index"),
    ([np.array([0, 1])], r"classes \[2\] never appear in the masks"),
])
def test_bad_masks_are_one_line_errors(masks, message):
    with pytest.raises(ValueError, match=message):
        median_frequency_weights(masks, num_classes=3)


def test_a_recipe_loss_with_class_weights_is_data_and_builds():
    loss = {"_target_": "torch.nn.CrossEntropyLoss", "ignore_index": 11,
            "weight": {"_target_": "torch.tensor", "_args_": [[0.5, 2.0, 1.0]]}}
    check_config_targets({"loss": loss}, trust_remote_code=False, where="config.json")
    built = instantiate(loss)
    assert torch.equal(built.weight, torch.tensor([0.5, 2.0, 1.0]))
    with pytest.raises(UntrustedCodeError, match=r"'torch.load' at 'loss.weight'"):
        check_config_targets({"loss": {**loss, "weight": {"_target_": "torch.load", "_args_": ["x.pt"]}}},
                             trust_remote_code=False, where="config.json")
