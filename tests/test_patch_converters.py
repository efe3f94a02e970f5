"""Converters: TF-style dynamic 'SAME' padding and every nn.Conv2d geometry convert exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convmoe import ConvGeometry, MoEConfig, MoEConv2d
from convmoe.patch.converters import (
    CONVERTERS,
    convert_conv2d,
    convert_timm_conv2d_same,
    dense_template,
    find_converter,
    refusal_reason,
)

timm = pytest.importorskip("timm")
CONFIG = MoEConfig(num_experts=3, top_k=2)


def test_builtin_converters_are_tried_most_specific_first() -> None:
    assert list(CONVERTERS) == ["timm_conv2d_same", "conv2d"]
    same = timm.layers.Conv2dSame(4, 4, 3, stride=2)
    assert find_converter(same, CONFIG, upcycle=True)[0] == "timm_conv2d_same"
    from timm.layers.conv2d_same import Conv2dSameExport

    export = Conv2dSameExport(4, 4, 3, stride=2)
    assert find_converter(export, CONFIG, upcycle=True)[0] == "timm_conv2d_same"
    assert convert_timm_conv2d_same(nn.Conv2d(4, 4, 3), CONFIG, True) is None
    assert convert_conv2d(nn.ConvTranspose2d(4, 4, 3), CONFIG, True) is None


@pytest.mark.parametrize(("height", "width", "kernel", "stride", "dilation", "expected"), [
    (8, 8, 3, 2, 1, (0, 1, 0, 1)),   # even size, stride 2: the extra pixel goes bottom/right
    (9, 9, 3, 2, 1, (1, 1, 1, 1)),
    (7, 10, 4, 1, 1, (1, 2, 1, 2)),  # even kernel, stride 1
    (5, 5, 3, 1, 2, (2, 2, 2, 2)),
    (6, 6, 1, 2, 1, (0, 0, 0, 0)),
])
def test_dynamic_same_padding_matches_tensorflow(height: int, width: int, kernel: int, stride: int, dilation: int,
                                                 expected: tuple[int, int, int, int]) -> None:
    geometry = ConvGeometry.create(kernel, stride=stride, dilation=dilation, padding="dynamic_same")
    assert geometry.padding_for(height, width) == expected
    assert geometry.output_size(height, width) == (-(-height // stride), -(-width // stride))
    pad_w = timm.layers.padding.pad_same_arg([height, width], [kernel, kernel], [stride, stride], [dilation, dilation])
    assert (expected[2], expected[3], expected[0], expected[1]) == tuple(pad_w)


@settings(max_examples=15, deadline=None)
@given(kernel=st.sampled_from([1, 2, 3, 4, 5, (3, 5), (2, 3)]), stride=st.sampled_from([1, 2, 3, (2, 1)]),
       dilation=st.sampled_from([1, 2]), depthwise=st.booleans(), height=st.integers(5, 12),
       width=st.integers(5, 12))
def test_timm_conv2d_same_upcycles_exactly(kernel: object, stride: object, dilation: int, depthwise: bool,
                                           height: int, width: int) -> None:
    torch.manual_seed(0)
    groups = 4 if depthwise else 1
    conv = timm.layers.Conv2dSame(4, 8, kernel, stride=stride, dilation=dilation, groups=groups).eval()
    block = convert_timm_conv2d_same(conv, CONFIG, upcycle=True).eval()
    assert block.padding == "dynamic_same"
    assert block.geometry.dynamic_same
    x = torch.randn(2, 4, height, width)
    expected = conv(x)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=0)


@settings(max_examples=15, deadline=None)
@given(kernel=st.sampled_from([1, 3, (1, 3), (3, 1), 5]), stride=st.sampled_from([1, 2]),
       padding=st.sampled_from([0, 1, 2, "same", "valid"]), dilation=st.sampled_from([1, 2]),
       groups=st.sampled_from([1, 2, 8]), mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
       bias=st.booleans())
def test_conv2d_geometries_upcycle_exactly(kernel: object, stride: int, padding: object, dilation: int, groups: int,
                                           mode: str, bias: bool) -> None:
    if padding == "same" and stride != 1:
        padding = 1
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                     padding_mode=mode).eval()
    x = torch.randn(2, 8, 11, 10)
    block = convert_conv2d(conv, CONFIG, upcycle=True).eval()
    torch.testing.assert_close(block(x), conv(x), atol=1e-5, rtol=0)


def test_dense_template_keeps_the_class_and_geometry_without_memory() -> None:
    conv = timm.layers.Conv2dSame(4, 8, 3, stride=2, bias=False)
    template = dense_template(conv)
    assert type(template) is timm.layers.Conv2dSame
    assert template.weight.device.type == "meta"
    assert template.bias is None
    assert (template.stride, template.kernel_size) == (conv.stride, conv.kernel_size)
    assert conv.weight.device.type == "cpu", "the original is not touched"


@pytest.mark.parametrize(("module", "reason"), [
    (MoEConv2d(4, 4, 3), "already an MoE block"),
    (nn.ConvTranspose2d(4, 4, 2), "is a transposed convolution"),
    (nn.Conv1d(4, 4, 3), "Conv1d is not an nn.Conv2d"),
    (nn.Linear(4, 4), "Linear is not an nn.Conv2d"),
    (nn.LazyConv2d(4, 3), "lazy conv whose weight is not created yet"),
    (nn.utils.parametrizations.spectral_norm(nn.Conv2d(4, 4, 3)), "weight is parametrised"),
    (timm.layers.StdConv2d(4, 4, 3), "standardises its weight"),
    (timm.layers.CondConv2d(4, 4, 3, num_experts=2), "mixes per-sample expert kernels"),
    (timm.layers.MixedConv2d(4, 4, [3, 5]), "target its per-kernel convs (children '0', '1')"),
])
def test_refusal_reasons_name_the_problem(module: nn.Module, reason: str) -> None:
    assert reason in refusal_reason(module)


def test_hooked_conv_is_refused() -> None:
    conv = nn.Conv2d(4, 4, 3)
    conv.register_forward_hook(lambda module, args, output: output * 2)
    assert "forward hooks" in refusal_reason(conv)
