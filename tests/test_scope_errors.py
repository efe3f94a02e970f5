"""A forward pass that raises is not a pass in which blocks "did not run": the error is the user's news,
named by the block that raised, and the check for unused blocks stays armed for the next real pass."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import convmoe
from convmoe import MoEConfig


class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 4, 3, padding=1)
        self.second = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, skip_second: bool = False) -> torch.Tensor:
        x = self.first(x)
        return x if skip_second else self.second(x)


def test_a_failing_training_pass_names_the_block_and_warns_of_nothing():
    model = convmoe.patch(TwoConvs(), targets=["first", "second"], config=MoEConfig(num_experts=2, tokens="grid:8x8"))
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "did not run" warning would fail the test here
        with pytest.raises(ValueError, match=r"MoEConv2d \(replacing 'first'\): tokens 'grid:8x8' needs a feature map "
                                             r"of at least 8x8, got 4x4"):
            model(torch.randn(1, 3, 4, 4))


def test_the_check_stays_armed_after_a_failed_pass():
    # It warns once, after the first training pass that finishes: here the one that skips a block.
    model = convmoe.patch(TwoConvs(), targets=["first", "second"], config=MoEConfig(num_experts=2, tokens="grid:8x8"))
    model.train()
    with pytest.raises(ValueError, match="needs a feature map"):
        model(torch.randn(1, 3, 4, 4))
    with pytest.warns(UserWarning, match=r"did not run .*'second'"):
        model(torch.randn(1, 3, 8, 8), skip_second=True)


def test_a_pass_started_inside_an_except_block_still_checks():
    model = convmoe.patch(TwoConvs(), targets=["first", "second"], config=MoEConfig(num_experts=2))
    model.train()
    try:
        raise KeyError("the caller's own, handled error")
    except KeyError:
        with pytest.warns(UserWarning, match=r"did not run .*'second'"):
            model(torch.randn(1, 3, 8, 8), skip_second=True)
