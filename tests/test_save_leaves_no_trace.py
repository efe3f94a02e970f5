"""Saving looks at the model (a probe forward, a rebuilt twin) and must leave no trace on it: the last
training pass's aux loss and routing stay for the loss that follows, the random streams go on as if
nothing had run, and the training flags are as they were."""

from __future__ import annotations

import pytest
import torch

import convmoe
from convmoe import MoEConfig
from convmoe.scope import leaving_no_trace


def _trained_forward():
    model = convmoe.create_model("timm:test_resnet", num_classes=5)
    convmoe.patch(model, targets="last_stage", config=MoEConfig(num_experts=4, top_k=2, noise_std=1.0))
    model.train()
    output = model(torch.randn(8, 3, 32, 32))
    return model, output


def test_save_pretrained_keeps_the_last_passes_aux_loss_and_routing(tmp_path):
    model, output = _trained_forward()
    aux_before = convmoe.aux_loss(model)
    stats_before = {name: block.tokens for name, block in convmoe.routing_stats(model).blocks.items()}
    assert aux_before.item() > 0
    convmoe.save_pretrained(model, tmp_path / "ckpt")
    aux_after = convmoe.aux_loss(model)
    assert aux_after.item() == aux_before.item()
    assert {name: block.tokens for name, block in convmoe.routing_stats(model).blocks.items()} == stats_before
    (output.square().mean() + aux_after).backward()  # the graph of the training pass is still there
    assert all(p.grad is not None for name, p in model.named_parameters() if "router" in name)
    assert all(m.training for m in model.modules())


def test_save_pretrained_leaves_the_random_streams_as_they_were(tmp_path):
    model, _ = _trained_forward()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    convmoe.save_pretrained(model, tmp_path / "ckpt")
    assert torch.equal(torch.rand(3), expected)


def test_leaving_no_trace_restores_after_an_error():
    model, _ = _trained_forward()
    aux = convmoe.aux_loss(model).item()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)

    def probe() -> None:
        with leaving_no_trace(model):
            model.eval()
            model(torch.randn(1, 3, 32, 32))
            raise RuntimeError("probe failed")

    with pytest.raises(RuntimeError, match="probe failed"):
        probe()
    assert torch.equal(torch.rand(3), expected)
    assert all(m.training for m in model.modules())
    assert convmoe.aux_loss(model).item() == aux
