"""State of patched models: state_dict, deepcopy, pickle, .to() across dtypes and devices, mode toggles and
gradient checkpointing."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from conftest import gradients, max_abs_diff, randomize_experts
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import convmoe
from convmoe import MoEConfig

CONFIGS = {
    "pixel": MoEConfig(num_experts=4, top_k=2, losses={"switch": 0.01, "z": 0.001}),
    "grid-expert_choice": MoEConfig(num_experts=4, top_k=1, tokens="grid:3x3", router="expert_choice"),
    "patch-positional-shared": MoEConfig(num_experts=4, top_k=1, tokens="patch:4", router="positional",
                                         shared_expert=True, expert_norm="layer", expert_act="relu"),
    "image-residual": MoEConfig(num_experts=3, top_k=1, tokens="image", experts="residual"),
    "noisy-medoe": MoEConfig(num_experts=4, top_k=1, noise_std=1.0, dropout="medoe", drop_rate=0.5),
    "grid-lowrank-bias": MoEConfig(num_experts=4, top_k=2, tokens="grid:3x3", experts="lowrank",
                                   expert_kwargs={"rank": 2, "alpha": 4.0}, bias_balancing=0.01),
}


def _model(config: MoEConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1))
    convmoe.patch(model, targets=["3"], config=config, upcycle=False)
    # the strided conv takes conv experts (residual experts keep the spatial size)
    convmoe.patch(model, targets=["5"], config=config.replace(experts="conv", expert_kwargs={}), upcycle=False)
    for _, block in convmoe.moe_blocks(model):
        randomize_experts(block)
    return model


def _x(batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, 9, 9, generator=torch.Generator().manual_seed(5))


def _seeded(model: nn.Module, x: Tensor, seed: int = 3) -> Tensor:
    torch.manual_seed(seed)
    return model(x)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_state_dict_round_trip(config):
    model = _model(CONFIGS[config]).eval()
    other = _model(CONFIGS[config], seed=1).eval()
    x = _x()
    assert max_abs_diff(other(x), model(x)) > 1e-3  # different weights before loading
    result = other.load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys
    assert not result.unexpected_keys
    assert max_abs_diff(other(x), model(x)) == 0
    assert {"3.experts.weight", "3.experts.conv1", "3.experts.down"} & set(model.state_dict())


@pytest.mark.parametrize("config", list(CONFIGS))
def test_deepcopy_after_a_training_step_is_independent(config):
    """The EMA pattern: copy the model right after forward/backward (last_aux still holds a graph)."""
    model = _model(CONFIGS[config]).train()
    x = _x()
    (model(x).square().mean() + convmoe.aux_loss(model)).backward()
    ema = copy.deepcopy(model)
    assert all(block.last_aux is None for _, block in convmoe.moe_blocks(ema))
    assert max_abs_diff(_seeded(ema, x), _seeded(model, x)) == 0
    with torch.no_grad():
        next(iter(dict(convmoe.moe_blocks(ema)).values())).experts.parameters().__next__().add_(1.0)
    assert max_abs_diff(_seeded(ema, x), _seeded(model, x)) > 0
    assert dict(convmoe.moe_blocks(model))["3"].last_aux is not None  # the original keeps its side outputs


@pytest.mark.parametrize("config", list(CONFIGS))
def test_pickle_and_torch_save_of_the_whole_model(config):
    model = _model(CONFIGS[config]).train()
    x = _x()
    model(x)  # side outputs with a graph must not break pickling
    for restored in (pickle.loads(pickle.dumps(model)), _torch_round_trip(model)):
        assert max_abs_diff(_seeded(restored.eval(), x), _seeded(model.eval(), x)) == 0
        names = [name for name, _ in convmoe.moe_blocks(restored)]
        assert names == ["3", "5"]
        assert dict(convmoe.moe_blocks(restored))["3"].name == "3"


def _torch_round_trip(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_float64_matches_float32(config):
    model = _model(CONFIGS[config]).eval()
    x = _x()
    expected = model(x)
    wide = copy.deepcopy(model).to(torch.float64)
    y = wide(x.double())
    assert y.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in wide.parameters())
    assert max_abs_diff(y.float(), expected) < 1e-4
    for _, block in convmoe.moe_blocks(wide):
        assert block.last_routing.logits.dtype == torch.float32


@pytest.mark.parametrize("config", list(CONFIGS))
def test_bfloat16_model_runs_with_a_float32_router(config):
    model = _model(CONFIGS[config]).eval()
    x = _x()
    expected = model(x)
    narrow = copy.deepcopy(model).to(torch.bfloat16)
    y = narrow(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert bool(y.isfinite().all())
    for _, block in convmoe.moe_blocks(narrow):
        assert block.last_routing.logits.dtype == torch.float32
    # bfloat16 weights round the router too; most outputs agree to bfloat16 precision
    close = ((y.float() - expected).abs() <= 0.05 + 0.05 * expected.abs()).float().mean()
    assert float(close) > 0.9
    back = narrow.float()
    assert back(x).dtype == torch.float32


def test_to_and_back_keeps_working_state():
    model = _model(CONFIGS["pixel"]).eval()
    x = _x()
    expected = model(x)
    model.to(torch.float64).to(torch.float32)
    assert max_abs_diff(model(x), expected) == 0
    assert dict(convmoe.moe_blocks(model))["3"].dense_template is not None  # unpatch information survives


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cuda_round_trip_matches_cpu(config):
    model = _model(CONFIGS[config]).eval()
    x = _x()
    expected = model(x)
    on_gpu = copy.deepcopy(model).cuda()
    y = on_gpu(x.cuda())
    assert y.device.type == "cuda"
    assert max_abs_diff(y.cpu(), expected) < 1e-4
    assert max_abs_diff(on_gpu.cpu()(x), expected) < 1e-5


def test_eval_train_toggling():
    model = _model(CONFIGS["noisy-medoe"])
    model[1].momentum = 0.0  # BatchNorm's running statistics stay put: only the MoE blocks' modes matter here
    x = _x()
    model.eval()
    expected = model(x)
    assert all(not m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    noisy = [_seeded(model, x, seed) for seed in (1, 2)]
    assert max_abs_diff(noisy[0], noisy[1]) > 0  # router noise and expert dropout in training
    assert max_abs_diff(_seeded(model, x, 1), noisy[0]) == 0  # ... reproducible under a seed
    block = dict(convmoe.moe_blocks(model))["3"]
    assert block.last_routing.expert_mask is not None
    model.eval()
    model(x)
    assert block.last_routing.expert_mask is None
    model.train().eval()
    assert max_abs_diff(model(x), expected) == 0  # eval is deterministic and unchanged by the toggles


@pytest.mark.parametrize("config", list(CONFIGS))
def test_gradient_checkpointing_matches_plain_backward(config):
    """torch.utils.checkpoint (use_reentrant=False) of each block: same outputs, aux losses and gradients,
    router noise and expert dropout replayed by the saved RNG state."""
    model = _model(CONFIGS[config]).train()
    checkpointed = copy.deepcopy(model)
    for _, block in convmoe.moe_blocks(checkpointed):
        block.forward = _checkpointed(block.forward)
    x = _x()
    results = []
    for candidate in (model, checkpointed):
        y = _seeded(candidate, x)
        aux = convmoe.aux_loss(candidate)
        (y.square().mean() + aux).backward()
        results.append((y.detach(), aux.detach(), gradients(candidate)))
    (y_plain, aux_plain, grads_plain), (y_ckpt, aux_ckpt, grads_ckpt) = results
    assert max_abs_diff(y_ckpt, y_plain) == 0
    assert max_abs_diff(aux_ckpt, aux_plain) == 0
    for name, grad in grads_plain.items():
        assert max_abs_diff(grads_ckpt[name], grad) < 1e-6, name
    assert any(float(g.abs().sum()) > 0 for name, g in grads_ckpt.items() if "router" in name)


def _checkpointed(forward):
    def run(x: Tensor) -> Tensor:
        return checkpoint(forward, x, use_reentrant=False)
    return run


def test_checkpointing_the_whole_patched_model():
    model = _model(CONFIGS["pixel"]).train()
    x = _x()
    y = checkpoint(model, x, use_reentrant=False)
    (y.square().mean() + convmoe.aux_loss(model)).backward()
    grads = gradients(model)
    model.zero_grad()
    (model(x).square().mean() + convmoe.aux_loss(model)).backward()
    for name, grad in gradients(model).items():
        assert max_abs_diff(grads[name], grad) < 1e-6, name


def test_save_pretrained_mid_training_of_a_bfloat16_model(tmp_path):
    """A bfloat16 model saved right after a training step (its side outputs still hold a graph) loads
    back with ``from_pretrained`` as a float32 model holding exactly the saved values."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    convmoe.patch(model, targets="layer4.*.conv2", config=MoEConfig(num_experts=4, top_k=1, tokens="grid:2x2"))
    model = model.to(torch.bfloat16).train()
    x = torch.randn(2, 3, 64, 64)
    (model(x.bfloat16()).float().square().mean() + convmoe.aux_loss(model)).backward()
    loaded = convmoe.from_pretrained(convmoe.save_pretrained(model, tmp_path / "ckpt"))
    state = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert value.dtype == (torch.float32 if state[name].is_floating_point() else state[name].dtype), name
        assert torch.equal(value, state[name].to(value.dtype)), name
    assert max_abs_diff(loaded(x), copy.deepcopy(model).float().eval()(x)) == 0
