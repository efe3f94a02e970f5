"""Mixed precision: autocast training steps, routers in float32, z-loss, half-precision models.

On CPU: bfloat16 and float16 autocast (float16 with a GradScaler) and a model cast to float16.
With CUDA (``-m gpu``): the same steps on the GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import max_abs_diff, randomize_experts
from torch import Tensor, nn

import convmoe
from convmoe import MoEConfig, MoEConv2d
from convmoe.losses import z_loss

CONFIGS = {
    "pixel-sparse": MoEConfig(num_experts=4, top_k=2, losses={"switch": 0.01, "z": 0.001}),
    "grid-expert_choice": MoEConfig(num_experts=4, top_k=1, tokens="grid:3x3", router="expert_choice",
                                    losses={"z": 0.001}),
    "patch-positional-dense": MoEConfig(num_experts=4, top_k=1, tokens="patch:4", router="positional",
                                        dispatcher="dense", losses={"switch": 0.01, "z": 0.001}),
    "pixel-lowrank-bias": MoEConfig(num_experts=4, top_k=2, experts="lowrank", expert_kwargs={"rank": 4},
                                    bias_balancing=0.01, losses={"switch_global": 0.01}),
    "image-lowrank": MoEConfig(num_experts=4, top_k=2, tokens="image", experts="lowrank"),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _model(config: MoEConfig, device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 5))
    convmoe.patch(model, targets=["2", "4"], config=config, upcycle=False)
    return model.to(device)


def _data(device: str = "cpu") -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 12, 12, generator=g).to(device), torch.randint(0, 5, (8,), generator=g).to(device)


def _train(model: nn.Module, dtype: torch.dtype, device: str, steps: int = 12) -> list[float]:
    """SGD steps on one batch under autocast; float16 uses a GradScaler, as AMP recipes do."""
    x, y = _data(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast(device, dtype=dtype):
            logits = model(x)
            loss = F.cross_entropy(logits, y) + convmoe.aux_loss(model)
        for _, block in convmoe.moe_blocks(model):
            assert block.last_routing.logits.dtype == torch.float32
            assert block.last_routing.probs.dtype == torch.float32
            assert all(term.dtype == torch.float32 for term in block.last_aux.terms.values())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_autocast_training_is_stable_on_cpu(config, dtype):
    model = _model(CONFIGS[config])
    losses = _train(model, DTYPES[dtype], "cpu")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps float32 master weights


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_router_under_autocast_equals_float32_router(dtype):
    """Autocast changes the experts' precision, never the router's: same logits, same routing."""
    block = MoEConv2d(8, 8, 3, padding=1, num_experts=4, top_k=2, tokens="grid:3x3").eval()
    x = torch.randn(2, 8, 9, 9)
    block(x)
    expected = block.last_routing
    with torch.autocast("cpu", dtype=DTYPES[dtype]):
        y = block(x)
    assert y.dtype == DTYPES[dtype]
    torch.testing.assert_close(block.last_routing.logits, expected.logits, rtol=0, atol=0)
    assert torch.equal(block.last_routing.expert_index, expected.expert_index)


def _overflowing_block(router: str, gate: str | None) -> MoEConv2d:
    """Router weights large enough that float16 logits (or their float16 hidden layer) overflow."""
    torch.manual_seed(0)
    block = MoEConv2d(8, 8, 3, padding=1, num_experts=4, top_k=1, router=router, gate=gate, tokens="patch:3")
    randomize_experts(block, scale=0.01)
    with torch.no_grad():
        for parameter in block.router.parameters():
            parameter.mul_(300)
    return block.eval()


@pytest.mark.parametrize(("router", "gate"), [("token_choice", None), ("token_choice", "conv_gap"),
                                              ("positional", None)])
def test_model_cast_to_float16_keeps_its_router_in_float32(router, gate):
    """``model.half()``: router logits beyond float16's range stay finite and route as the float32 model does."""
    block = _overflowing_block(router, gate)
    x = torch.randn(2, 8, 9, 9) * 1000
    block(x)
    expected = block.last_routing
    assert float(expected.logits.abs().max()) > 65504  # beyond float16's range
    half = block.half()
    y = half(x.half())
    routing = half.last_routing
    assert y.dtype == torch.float16
    assert bool(y.isfinite().all())
    assert bool(routing.logits.isfinite().all())
    assert torch.equal(routing.expert_index, expected.expert_index)


def test_z_loss_is_available_and_float32_for_large_logits():
    block = _overflowing_block("token_choice", None).train()
    block.balancing = convmoe.losses.BalancingLoss({"switch": 0.01, "z": 1e-4})
    x = torch.randn(2, 8, 9, 9) * 1000
    with torch.autocast("cpu", dtype=torch.float16):
        block(x)
    z = block.last_aux.terms["z"]
    assert z.dtype == torch.float32
    assert bool(z.isfinite().all())
    assert float(z.detach()) > 65504  # lse^2 would overflow in float16
    torch.testing.assert_close(z, z_loss(block.last_routing.logits))
    block.last_aux.total.backward()
    assert bool(block.router.gate.proj.weight.grad.isfinite().all())


def test_z_loss_shrinks_the_router_logits():
    block = MoEConv2d(8, 8, 3, padding=1, num_experts=4, top_k=1, losses={"z": 1.0}).train()
    with torch.no_grad():
        block.router.gate.proj.weight.mul_(20)
    optimizer = torch.optim.SGD(block.router.parameters(), lr=0.05)
    x = torch.randn(2, 8, 9, 9)
    sizes = []
    for _ in range(5):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            block(x)
        sizes.append(float(block.last_routing.logits.abs().mean()))
        block.last_aux.total.backward()
        optimizer.step()
    assert sizes[-1] < 0.9 * sizes[0]


def test_non_finite_input_under_float16_amp_skips_the_step():
    """NaN/Inf reach the loss (no silent routing): GradScaler finds inf gradients and skips the step."""
    model = _model(CONFIGS["pixel-sparse"])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, y = _data()
    x[0, :, 3, 3] = float("inf")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y) + convmoe.aux_loss(model)
    assert not bool(loss.isfinite())
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() < 65536.0  # the scale backed off
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_autocast_training_is_stable_on_cuda(config, dtype):
    model = _model(CONFIGS[config], device="cuda")
    losses = _train(model, DTYPES[dtype], "cuda")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_model_on_cuda_matches_float32_routing():
    block = _overflowing_block("positional", None).cuda()
    x = torch.randn(2, 8, 9, 9, device="cuda") * 1000
    block(x)
    expected = block.last_routing.expert_index
    y = block.half()(x.half())
    assert bool(y.isfinite().all())
    assert torch.equal(block.last_routing.expert_index, expected)
    assert max_abs_diff(block.last_routing.logits.float().isfinite().float(), torch.ones_like(
        block.last_routing.logits)) == 0
