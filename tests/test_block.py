"""MoEConv2d: a drop-in for nn.Conv2d. Upcycling exactness, shapes, determinism, batch independence, errors."""

from __future__ import annotations

import copy
import itertools
import pickle
import warnings
from typing import Any

import pytest
import torch
from conftest import TOKEN_SPECS, make_block, max_abs_diff
from torch import Tensor, nn

from convmoe import MoEConfig, MoEConv2d

# nn.Conv2d's own note on its reference computation, not ours
EVEN_SAME_WARNING = "ignore:Using padding='same' with even kernel lengths:UserWarning"

# (in, out, kernel, conv kwargs, input size): odd sizes, strides, dilation, groups, bias, every padding form
UPCYCLE_CASES: dict[str, tuple[int, int, Any, dict[str, Any], tuple[int, int]]] = {
    "3x3-9x7": (4, 6, 3, {"padding": 1}, (9, 7)),
    "1x1": (4, 6, 1, {}, (9, 7)),
    "stride2": (4, 6, 3, {"stride": 2, "padding": 1}, (9, 7)),
    "stride2x1-5x5": (4, 6, 5, {"stride": (2, 1), "padding": 2}, (11, 9)),
    "dilation2": (4, 6, 3, {"dilation": 2, "padding": 2}, (9, 7)),
    "groups2": (4, 8, 3, {"groups": 2, "padding": 1}, (9, 7)),
    "depthwise": (4, 4, 3, {"groups": 4, "padding": 1}, (9, 7)),
    "depthwise-multiplier": (4, 8, 3, {"groups": 4, "padding": 1, "bias": False}, (9, 7)),
    "no-bias": (4, 6, 3, {"padding": 1, "bias": False}, (9, 7)),
    "padding-tuple": (4, 6, 3, {"padding": (1, 0)}, (9, 7)),
    "padding-same": (4, 6, 3, {"padding": "same"}, (9, 7)),
    "padding-valid": (4, 6, 3, {"padding": "valid"}, (9, 7)),
    "even-kernel-same": (4, 6, 4, {"padding": "same"}, (9, 7)),
    "even-2x4-same-dilated": (4, 6, (2, 4), {"padding": "same", "dilation": (2, 1)}, (9, 7)),
    "reflect": (4, 6, 3, {"padding": 1, "padding_mode": "reflect"}, (9, 7)),
    "replicate": (4, 6, 3, {"padding": (1, 2), "padding_mode": "replicate"}, (9, 7)),
    "circular": (4, 6, 3, {"padding": 1, "padding_mode": "circular"}, (9, 7)),
    "circular-same-even": (4, 6, 2, {"padding": "same", "padding_mode": "circular"}, (9, 7)),
    "1x1-input": (4, 6, 3, {"padding": 1}, (1, 1)),
    "1x1-input-stride2": (4, 6, 3, {"padding": 1, "stride": 2}, (1, 1)),
}


def grid_fits(tokens: str, out_size: tuple[int, int]) -> bool:
    if not tokens.startswith("grid:"):
        return True
    rows, cols = (int(v) for v in tokens.partition(":")[2].split("x"))
    return out_size[0] >= rows and out_size[1] >= cols


def upcycle_cases() -> list[Any]:
    params = []
    for (name, (cin, cout, kernel, kwargs, size)), tokens in itertools.product(UPCYCLE_CASES.items(), TOKEN_SPECS):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", EVEN_SAME_WARNING.split(":")[1])
            out = nn.Conv2d(cin, cout, kernel, **kwargs)(torch.zeros(1, cin, *size)).shape[-2:]
        if grid_fits(tokens, tuple(out)):  # a grid larger than the output is an error, tested elsewhere
            params.append(pytest.param(tokens, name, id=f"{tokens}-{name}"))
    return params


@pytest.mark.filterwarnings(EVEN_SAME_WARNING)
@pytest.mark.parametrize(("tokens", "case"), upcycle_cases())
def test_upcycled_block_equals_the_conv(tokens: str, case: str) -> None:
    cin, cout, kernel, kwargs, size = UPCYCLE_CASES[case]
    conv = nn.Conv2d(cin, cout, kernel, **kwargs)
    block = MoEConv2d.from_conv(conv, num_experts=4, top_k=2, tokens=tokens).eval()
    x = torch.randn(2, cin, *size)
    expected = conv(x)
    y = block(x)
    assert y.shape == expected.shape
    assert max_abs_diff(y, expected) <= 1e-5
    assert (block.kernel_size, block.stride, block.dilation, block.groups) == (
        conv.kernel_size, conv.stride, conv.dilation, conv.groups)


@pytest.mark.parametrize("dispatcher", ["dense", "sparse"])
@pytest.mark.parametrize("tokens", TOKEN_SPECS)
def test_upcycled_block_equals_the_conv_in_training_with_noise_and_dropout(tokens: str, dispatcher: str) -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1)
    config = MoEConfig(num_experts=8, top_k=2, tokens=tokens, dispatcher=dispatcher, noise_std=1.0, dropout="medoe",
                       drop_rate=0.25, shared_expert=True)
    block = MoEConv2d.from_conv(conv, config).train()
    x = torch.randn(2, 4, 9, 9)
    assert max_abs_diff(block(x), conv(x)) <= 1e-5
    assert block.last_routing.expert_mask is not None  # dropout really ran


def test_upcycled_expert_choice_equals_the_conv_when_no_token_is_dropped() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1)
    # capacity_factor = E / k makes every expert take every token
    block = MoEConv2d.from_conv(conv, num_experts=4, top_k=2, router="expert_choice", capacity_factor=2.0).eval()
    x = torch.randn(2, 4, 9, 9)
    assert max_abs_diff(block(x), conv(x)) <= 1e-5
    assert not block.last_routing.dropped.any()


def test_upcycled_capacity_limited_block_equals_the_conv_where_tokens_are_kept() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1)
    block = MoEConv2d.from_conv(conv, num_experts=4, top_k=2, tokens="grid:3x3", capacity_factor=0.5).eval()
    x = torch.randn(2, 4, 9, 9)
    y, expected = block(x), conv(x)
    routing = block.last_routing
    assert routing.dropped.any()
    assert not routing.dropped.all()
    dropped = routing.dropped[:, block.tokens.split(x).token_map].reshape(2, 1, 9, 9).expand_as(y)
    # a kept token's weights renormalise to 1 even when one of its slots was dropped
    assert (~routing.slot_mask & ~routing.dropped[..., None]).any()
    assert max_abs_diff(y[~dropped], expected[~dropped]) <= 1e-5
    assert (y[dropped] == 0).all()


def test_upcycle_noise_breaks_symmetry_but_stays_close() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1)
    block = MoEConv2d.from_conv(conv, num_experts=4, upcycle_noise_std=0.01).eval()
    assert not torch.equal(block.experts.weight[0], block.experts.weight[1])
    x = torch.randn(2, 4, 9, 9)
    diff = max_abs_diff(block(x), conv(x))
    assert 0 < diff < 0.1


def test_from_conv_without_upcycle_keeps_random_experts() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1)
    block = MoEConv2d.from_conv(conv, num_experts=4, upcycle=False)
    assert not torch.equal(block.experts.weight[0], conv.weight)


def test_from_conv_refuses_what_it_cannot_upcycle() -> None:
    with pytest.raises(TypeError, match=r"MoEConv2d.from_conv needs an nn.Conv2d, got Linear"):
        MoEConv2d.from_conv(nn.Linear(4, 4))
    with pytest.raises(TypeError, match=r"experts ResidualConvExperts cannot be upcycled from a conv; use experts='conv' "
                                        r"or upcycle=False"):
        MoEConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1), experts="residual")


SHAPE_GRID = [
    (kernel, stride, padding, dilation)
    for kernel, stride, padding, dilation in itertools.product(
        [1, 3, (3, 5), 4], [1, 2, (2, 1)], [0, 1, (2, 1), "same", "valid"], [1, (2, 1)])
    if not (padding == "same" and stride != 1)
]


@pytest.mark.filterwarnings(EVEN_SAME_WARNING)
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), SHAPE_GRID)
def test_output_shape_equals_conv2d(kernel: Any, stride: Any, padding: Any, dilation: Any) -> None:
    x = torch.randn(1, 4, 9, 8)
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation)
    expected = conv(x).shape
    for tokens in ("pixel", "patch:4"):
        block = MoEConv2d(4, 6, kernel, stride=stride, padding=padding, dilation=dilation, num_experts=2,
                          top_k=1, tokens=tokens)
        assert block(x).shape == expected, tokens


@pytest.mark.parametrize("router", ["token_choice", "expert_choice", "positional"])
@pytest.mark.parametrize("tokens", TOKEN_SPECS)
def test_eval_is_deterministic(router: str, tokens: str, x_small: Tensor) -> None:
    block = make_block(router=router, tokens=tokens, noise_std=1.0, dropout="medoe", drop_rate=0.5,
                       top_k=1 if router == "positional" else 2).eval()
    first = block(x_small)
    torch.manual_seed(123)  # eval must not consume randomness
    assert torch.equal(block(x_small), first)
    assert block.last_routing.expert_mask is None


BATCH_INDEPENDENT = [
    pytest.param(tokens, dispatcher, kwargs, id=f"{tokens}-{dispatcher}-{name}")
    for tokens in TOKEN_SPECS
    for dispatcher in ("sparse", "dense")
    for name, kwargs in {"token_choice": {"router": "token_choice"},
                         "act_norm_shared": {"expert_act": "relu", "expert_norm": "layer", "shared_expert": True}}.items()
] + [
    # expert choice groups per image, so any per-image tokens are independent of the batch too
    pytest.param(tokens, "sparse", {"router": "expert_choice"}, id=f"{tokens}-expert_choice")
    for tokens in TOKEN_SPECS if tokens != "image"
]


@pytest.mark.parametrize(("tokens", "dispatcher", "kwargs"), BATCH_INDEPENDENT)
def test_a_sample_does_not_depend_on_the_rest_of_the_batch(tokens: str, dispatcher: str, kwargs: dict) -> None:
    block = make_block(tokens=tokens, dispatcher=dispatcher, top_k=2, noise_std=1.0, **kwargs).eval()
    x = torch.randn(5, 4, 9, 9)
    batch = block(x)
    for i in (0, 3):
        alone = block(x[i:i + 1])
        assert max_abs_diff(alone[0], batch[i]) <= 1e-5
    # and against a different batch around it
    other = torch.cat([torch.randn(2, 4, 9, 9), x[3:4], torch.randn(1, 4, 9, 9)])
    assert max_abs_diff(block(other)[2], batch[3]) <= 1e-5


def test_channels_last_and_non_contiguous_inputs(x_small: Tensor) -> None:
    block = make_block(tokens="grid:3x3").eval()
    expected = block(x_small)
    assert max_abs_diff(block(x_small.to(memory_format=torch.channels_last)), expected) <= 1e-5
    wide = torch.randn(2, 4, 9, 18)
    assert max_abs_diff(block(wide[..., ::2]), block(wide[..., ::2].contiguous())) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes(dtype: torch.dtype) -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1).to(dtype)
    block = MoEConv2d.from_conv(conv, num_experts=4, tokens="grid:3x3").eval()
    x = torch.randn(2, 4, 9, 9, dtype=dtype)
    y = block(x)
    assert y.dtype == dtype
    assert block.last_routing.logits.dtype == torch.float32
    # float32 routing weights sum to 1 within float32 rounding, hence 1e-6 rather than float64's eps
    tolerance = 1e-6 if dtype == torch.float64 else 0.1
    assert float((y - conv(x)).detach().abs().max()) <= tolerance


def test_block_builds_on_meta() -> None:
    block = MoEConv2d(64, 64, 3, padding=1, num_experts=8, device="meta")
    assert all(p.is_meta for p in block.parameters())


def test_side_outputs_after_forward(x_small: Tensor) -> None:
    block = make_block(tokens="grid:3x3", losses={"switch": 0.01, "z": 0.001})
    assert block.last_aux is None
    assert block.last_routing is None
    block(x_small)
    assert block.last_aux.total.requires_grad
    assert block.last_aux.total.shape == ()
    assert set(block.last_aux.terms) == {"switch", "z"}
    assert not block.last_routing.probs.requires_grad  # stats never hold the graph


def test_deepcopy_and_pickle_after_a_training_forward(x_small: Tensor) -> None:
    block = make_block(tokens="grid:3x3").train()
    block(x_small)
    for clone in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert clone.last_aux is None
        clone.eval()
        assert torch.equal(clone(x_small), block.eval()(x_small))


def test_extra_repr_describes_the_block() -> None:
    block = MoEConv2d(8, 16, 3, stride=2, padding=1, groups=2, num_experts=4, top_k=2, tokens="grid:3x3")
    assert block.extra_repr() == ("8, 16, kernel_size=(3, 3), stride=(2, 2), padding=1, groups=2, experts=4, "
                                  "top_k=2, tokens=grid:3x3, router=token_choice, dispatcher=sparse")


def test_config_object_dict_and_overrides() -> None:
    config = MoEConfig(num_experts=4, top_k=1, tokens="patch:4")
    assert MoEConv2d(4, 4, 3, config=config).config == config
    assert MoEConv2d(4, 4, 3, config=config.to_dict()).config == config
    block = MoEConv2d(4, 4, 3, config=config, top_k=2)
    assert block.config.top_k == 2
    assert config.top_k == 1
    assert MoEConv2d(4, 4, 3).config == MoEConfig()


@pytest.mark.parametrize(("make", "x", "match"), [
    (lambda: MoEConv2d(4, 6, 3, padding=1, num_experts=2), torch.randn(2, 3, 9, 9),
     r"^MoEConv2d got 3 input channels, expected in_channels=4\.$"),
    (lambda: MoEConv2d(4, 6, 3, padding=1, num_experts=2), torch.randn(4, 9, 9),
     r"MoEConv2d expects a \(B, C, H, W\) input, got shape \(4, 9, 9\)"),
    (lambda: MoEConv2d(4, 6, 3, num_experts=2), torch.randn(2, 4, 2, 5),
     (r"input of spatial size \(2, 5\) is smaller than the kernel's reach \(3, 3\) after padding; use a larger input "
     r"or more padding")),
    (lambda: MoEConv2d(4, 6, 3, dilation=3, padding=1, num_experts=2), torch.randn(2, 4, 4, 9),
     r"input of spatial size \(4, 9\) is smaller than the kernel's reach \(7, 7\)"),
    (lambda: MoEConv2d(4, 6, 3, padding=1, num_experts=2, tokens="grid:4x4"), torch.randn(2, 4, 3, 9),
     r"tokens 'grid:4x4' needs a feature map of at least 4x4, got 3x9; use a smaller grid or 'pixel'"),
])
def test_bad_input_raises(make: Any, x: Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()(x)


def test_errors_name_the_replaced_module() -> None:
    block = MoEConv2d(4, 6, 3, padding=1, num_experts=2)
    block.name = "layer3.0.conv1"
    with pytest.raises(ValueError, match=r"MoEConv2d \(replacing 'layer3.0.conv1'\) got 8 input channels, expected "
                                         r"in_channels=4"):
        block(torch.randn(1, 8, 9, 9))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"top_k": 5, "num_experts": 4}, r"top_k=5 must be in \[1, num_experts=4\]; lower top_k or raise num_experts"),
    ({"router": "topk"}, r"unknown router 'topk'; available: expert_choice, positional, token_choice"),
    ({"experts": "residual", "stride": 2}, (r"residual experts keep the spatial size: the replaced conv needs stride 1 "
                                           r"and 'same' padding.*use experts='conv'")),
    ({"experts": "residual", "padding": 0}, r"residual experts keep the spatial size"),
    ({"padding": "same", "stride": 2}, r"padding='same' is not supported for strided convolutions"),
    ({"padding": "full"}, r"padding 'full' is not understood; use an int, a pair, 'same'"),
    ({"padding_mode": "mirror"}, (r"padding_mode 'mirror' is not supported; use one of \['circular', 'reflect', "
                                 r"'replicate', 'zeros'\]")),
    ({"groups": 4}, r"in_channels=4 and out_channels=6 must both be divisible by groups=4"),
    ({"expert_act": "tanh"}, r"unknown expert activation 'tanh'"),
    ({"kernel_size": 0}, r"kernel_size, stride and dilation must be >= 1"),
    ({"padding": -1}, r"padding must be >= 0"),
])
def test_bad_block_arguments_raise(kwargs: dict, match: str) -> None:
    args = {"kernel_size": 3, "padding": 1, "num_experts": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        MoEConv2d(4, 6, **args)


class _CountingLoss(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, routing: Any) -> Any:
        self.calls += 1
        return self.inner(routing)


@pytest.mark.parametrize("tokens", TOKEN_SPECS)
def test_eval_and_no_grad_compute_no_balancing_loss(tokens: str, x_small: Tensor) -> None:
    """Issue 15: losses are a training signal; eval and no_grad passes skip them, routing stats still work."""
    import convmoe

    block = make_block(tokens=tokens, losses={"switch": 0.01, "z": 0.001})
    block.balancing = counting = _CountingLoss(block.balancing)
    block.eval()(x_small)
    with torch.no_grad():
        block.train()(x_small)
    assert counting.calls == 0
    assert float(convmoe.aux_loss(block)) == 0.0
    assert block.last_aux.terms == {}
    stats = convmoe.routing_stats(block)  # computed on request from the kept routing
    assert stats[""].tokens == block.last_routing.dropped.numel()
    block.eval()(x_small)
    eval_routing = block.last_routing
    assert not eval_routing.probs.requires_grad
    block.train()(x_small)
    assert counting.calls == 1
    assert set(block.last_aux.terms) == {"switch", "z"}
    assert torch.equal(block.last_routing.expert_index, eval_routing.expert_index)  # no noise: same routing


def test_eval_aux_loss_is_zero_in_a_scoped_model_called_twice(x_small: Tensor) -> None:
    import convmoe

    block = make_block(4, 4, tokens="grid:3x3")
    model = nn.Sequential(block, nn.ReLU(), block)
    convmoe.scope.add_forward_scope(model)
    model.eval()(x_small)
    assert block.forward_calls == 2
    assert float(convmoe.aux_loss(model)) == 0.0
    assert convmoe.routing_stats(model)["0"].tokens == 2 * block.last_routing.dropped.numel()


@pytest.mark.parametrize(("tokens", "dispatcher", "experts"), [
    ("pixel", "sparse:gathered", "conv"),
    ("grid:3x3", "sparse:regions", "conv"),
    ("image", "sparse:merged", "conv"),
    ("pixel", "sparse:deltas", "lowrank"),
    ("pixel", "dense", "conv"),
])
def test_forward_on_meta_gives_the_output_shape(tokens: str, dispatcher: str, experts: str) -> None:
    """Shape inference (``device="meta"``) runs every dispatch path without allocating."""
    block = MoEConv2d(8, 12, 3, padding=1, num_experts=4, top_k=2, tokens=tokens, dispatcher=dispatcher,
                      experts=experts, device="meta").eval()
    y = block(torch.empty(2, 8, 9, 9, device="meta"))
    assert y.is_meta
    assert y.shape == (2, 12, 9, 9)
