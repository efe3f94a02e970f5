"""Target errors read well on real models: a reason shared by many convs is given once, and a class or a
predicate that matches nothing is not answered with name suggestions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convmoe


class ShiftedConv(nn.Conv2d):
    """A conv with its own forward: no converter knows what it computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


def test_a_reason_shared_by_many_refused_convs_is_given_once():
    model = nn.Sequential(*[ShiftedConv(4, 4, 3, padding=1) for _ in range(7)])
    with pytest.raises(ValueError, match="matched only convolutions convmoe cannot convert") as caught:
        convmoe.patch(model, targets="*")
    message = str(caught.value)
    assert message.count("overrides nn.Conv2d's forward") == 1
    assert "'0', '1', '2', '3', '4' and 2 more (ShiftedConv: ShiftedConv overrides" in message


def test_the_skipping_warning_groups_reasons_too():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), *[ShiftedConv(4, 4, 3, padding=1) for _ in range(3)])
    with pytest.warns(UserWarning, match=r"skipping 3 selected conv\(s\)") as caught:
        convmoe.patch(model, targets="*")
    assert str(caught[0].message).count("overrides nn.Conv2d's forward") == 1


def test_a_class_that_matches_nothing_names_the_models_conv_classes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ShiftedConv(4, 4, 1))
    with pytest.raises(ValueError, match=r"ConvTranspose2d matched no module; the model's convolutions are "
                                         r"Conv2d, ShiftedConv\.$") as caught:
        convmoe.patch(model, targets=nn.ConvTranspose2d)
    assert "closest names" not in str(caught.value)


def test_a_predicate_that_matches_nothing_says_so_without_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"matched no module; the predicate returned False for every module\.$"):
        convmoe.patch(model, targets=lambda name, module: False)
