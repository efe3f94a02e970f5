"""Expert banks and their dispatch kernels against plain per-expert convolutions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from convmoe import EXPERTS, ConvGeometry, create_experts
from convmoe.dispatch.gathered import gathered_experts
from convmoe.dispatch.merged import merged_conv
from convmoe.experts import ConvExperts, ExpertCapabilities, ExpertPostOps, ResidualConvExperts

E = 3
GEOMETRIES = [
    pytest.param({"kernel_size": 3, "padding": 1}, 1, id="3x3"),
    pytest.param({"kernel_size": 3, "stride": 2, "padding": 1}, 1, id="stride2"),
    pytest.param({"kernel_size": 3, "dilation": 2, "padding": 2}, 1, id="dilation2"),
    pytest.param({"kernel_size": (1, 3), "padding": (0, 1)}, 2, id="1x3-groups2"),
    pytest.param({"kernel_size": 3, "padding": 1}, 4, id="depthwise"),
    pytest.param({"kernel_size": 2, "padding": "same"}, 1, id="even-same"),
]


def bank(geometry_kwargs: dict, groups: int, *, out_channels: int = 8, bias: bool = True, norm: str | None = None,
         act: str | None = None) -> ConvExperts:
    experts = ConvExperts(4, out_channels, num_experts=E, geometry=ConvGeometry.create(**geometry_kwargs),
                          groups=groups, bias=bias, norm=norm, act=act)
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return experts


def expert_conv(experts: ConvExperts, e: int, x_pad: Tensor) -> Tensor:
    """Expert e as a plain F.conv2d followed by its post-ops (layer norm over channels, activation)."""
    g = experts.geometry
    bias = None if experts.bias is None else experts.bias[e]
    y = F.conv2d(x_pad, experts.weight[e], bias, stride=g.stride, dilation=g.dilation, groups=experts.groups)
    if experts.post.norm == "layer":
        y = F.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],), experts.post.norm_weight[e],
                         experts.post.norm_bias[e]).permute(0, 3, 1, 2)
    if experts.post.act is not None:
        y = {"relu": F.relu, "silu": F.silu, "gelu": F.gelu}[experts.post.act](y)
    return y


@pytest.mark.parametrize("post", [{}, {"act": "relu"}, {"norm": "layer", "act": "gelu"}, {"bias": False}])
@pytest.mark.parametrize(("geometry_kwargs", "groups"), GEOMETRIES)
def test_forward_all_and_segments_match_per_expert_convs(geometry_kwargs: dict, groups: int, post: dict) -> None:
    experts = bank(geometry_kwargs, groups, **post)
    x_pad = experts.geometry.pad(torch.randn(2, 4, 9, 7))
    expected = torch.stack([expert_conv(experts, e, x_pad) for e in range(E)], dim=1)

    torch.testing.assert_close(experts.forward_all(x_pad), expected, atol=1e-5, rtol=0)

    # forward_segments: expert e on the e-th consecutive segment (an empty segment is skipped)
    windows = torch.cat([x_pad, x_pad[:1], x_pad])  # 5 windows: expert 0 takes 2, expert 1 none, expert 2 three
    out = experts.forward_segments(windows, [2, 0, 3])
    reference = torch.cat([expert_conv(experts, 0, windows[:2]), expert_conv(experts, 2, windows[2:])])
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("post", [{}, {"act": "silu"}, {"norm": "layer"}, {"bias": False}])
@pytest.mark.parametrize(("geometry_kwargs", "groups"), GEOMETRIES)
def test_gathered_kernel_matches_convs(geometry_kwargs: dict, groups: int, post: dict) -> None:
    experts = bank(geometry_kwargs, groups, **post)
    g = experts.geometry
    x_pad = g.pad(torch.randn(1, 4, 9, 7))
    columns = F.unfold(x_pad, g.kernel_size, dilation=g.dilation, stride=g.stride)[0].t()  # (L, C_in * kh * kw)
    L = columns.shape[0]
    counts = [L // 3, 0, L - L // 3]
    out = gathered_experts(experts, columns, counts)
    assert out.shape == (L, 8)
    reference = [expert_conv(experts, e, x_pad).flatten(2)[0].t() for e in range(E)]  # (L, C_out) each
    expected = torch.cat([reference[0][:counts[0]], reference[2][counts[0]:]])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("geometry_kwargs", "groups"), GEOMETRIES)
def test_merged_conv_is_the_weighted_sum_of_experts(geometry_kwargs: dict, groups: int) -> None:
    experts = bank(geometry_kwargs, groups)
    x_pad = experts.geometry.pad(torch.randn(2, 4, 9, 7))
    weights = torch.tensor([[0.5, 0.0, 0.5], [0.1, 0.7, 0.2]])
    expected = (experts.forward_all(x_pad) * weights[:, :, None, None, None]).sum(1)
    torch.testing.assert_close(merged_conv(experts, x_pad, weights), expected, atol=1e-5, rtol=0)


def test_old_kernel_methods_are_deprecated_and_still_compute() -> None:
    experts = bank({"kernel_size": 3, "padding": 1}, 1)
    x_pad, weights = experts.geometry.pad(torch.randn(2, 4, 5, 5)), torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
    with pytest.warns(DeprecationWarning, match=r"ConvExperts.forward_mixed is deprecated; use .*merged_conv"):
        mixed = experts.forward_mixed(x_pad, weights)
    torch.testing.assert_close(mixed, merged_conv(experts, x_pad, weights))
    columns = torch.randn(5, 36)
    with pytest.warns(DeprecationWarning, match=r"ConvExperts.forward_columns is deprecated; use .*gathered_experts"):
        out = experts.forward_columns(columns, [2, 0, 3])
    torch.testing.assert_close(out, gathered_experts(experts, columns, [2, 0, 3]))
    with pytest.warns(DeprecationWarning, match=r"patch_local is deprecated; use capabilities.sees_no_halo"):
        assert not experts.patch_local


def test_empty_segments_give_empty_outputs() -> None:
    experts = bank({"kernel_size": 3, "padding": 1}, 1)
    assert experts.forward_segments(torch.randn(0, 4, 5, 5), [0, 0, 0]).shape[0] == 0
    assert gathered_experts(experts, torch.randn(0, 36), [0, 0, 0]).shape == (0, 8)


def test_load_dense_copies_the_conv_into_every_expert() -> None:
    experts = ConvExperts(4, 6, num_experts=E, geometry=ConvGeometry.create(3))
    weight, bias = torch.randn(6, 4, 3, 3), torch.randn(6)
    experts.load_dense(weight, bias)
    for e in range(E):
        assert torch.equal(experts.weight[e], weight)
        assert torch.equal(experts.bias[e], bias)
    experts.load_dense(weight, None)
    assert (experts.bias == 0).all()
    experts.load_dense(weight, bias, noise_std=0.1)
    assert not torch.equal(experts.weight[0], experts.weight[1])
    assert (experts.weight - weight).std() < 0.5 * weight.std()
    with pytest.raises(ValueError, match=r"dense weight of shape \(6, 4, 5, 5\) does not fit experts of shape \(6, 4, 3, 3\)"):
        experts.load_dense(torch.randn(6, 4, 5, 5), None)


def test_expert_post_ops() -> None:
    post = ExpertPostOps(2, 4, norm="layer", act="relu")
    with torch.no_grad():
        post.norm_weight.copy_(torch.randn(2, 4))
        post.norm_bias.copy_(torch.randn(2, 4))
    y = torch.randn(3, 4, 2, 2)
    expected = F.relu(F.layer_norm(y.permute(0, 2, 3, 1), (4,), post.norm_weight[1], post.norm_bias[1])).permute(0, 3, 1, 2)
    torch.testing.assert_close(post(y, 1), expected)
    # every expert at once: (B, E, C, h, w)
    stacked = torch.randn(3, 2, 4, 2, 2)
    torch.testing.assert_close(post(stacked), torch.stack([post(stacked[:, e], e) for e in range(2)], dim=1))
    assert ExpertPostOps(2, 4).is_identity
    assert not post.is_identity


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"act": "tanh"}, r"unknown expert activation 'tanh'; available: gelu, relu, silu \(or None\)"),
    ({"norm": "batch"}, r"unknown expert norm 'batch'; available: layer \(or None\)"),
    ({"groups": 3}, r"in_channels=4 and out_channels=6 must both be divisible by groups=3"),
])
def test_conv_expert_arguments_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ConvExperts(4, 6, num_experts=2, geometry=ConvGeometry.create(3), **kwargs)


def test_residual_experts_compute_each_region_as_an_image() -> None:
    experts = ResidualConvExperts(4, 6, num_experts=2, geometry=ConvGeometry.create(3, padding=1), norm_groups=2)
    x = torch.randn(3, 4, 5, 5)
    out = experts.forward_segments(x, [1, 2])
    assert out.shape == (3, 6, 5, 5)
    for row, e in [(0, 0), (1, 1), (2, 1)]:
        h = F.conv2d(x[row:row + 1], experts.conv1[e], padding=1)
        h = F.silu(F.group_norm(h, 2, experts.norm1_weight[e], experts.norm1_bias[e]))
        h = F.group_norm(F.conv2d(h, experts.conv2[e], padding=1), 2, experts.norm2_weight[e], experts.norm2_bias[e])
        expected = F.conv2d(x[row:row + 1], experts.skip[e]) + h
        torch.testing.assert_close(out[row:row + 1], expected, atol=1e-5, rtol=0)
    assert experts.capabilities == ExpertCapabilities(sees_no_halo=True)
    assert not experts.is_linear


@pytest.mark.parametrize(("post", "linear"), [({}, True), ({"act": "relu"}, False), ({"norm": "layer"}, False)])
def test_conv_experts_declare_their_capabilities(post: dict, linear: bool) -> None:
    experts = bank({"kernel_size": 3, "padding": 1}, 1, **post)
    assert experts.capabilities == ExpertCapabilities(gathered_columns=True, linear=linear, dense_forward=True)
    assert experts.is_linear is linear
    conv = experts.stacked_conv()
    assert conv.weight is experts.weight
    assert conv.bias is experts.bias
    assert conv.post is experts.post
    assert conv.groups == 1


def test_residual_experts_accept_a_single_1x1_region() -> None:
    # one channel per norm group and a lone 1x1 region: the norm is defined (it gives its bias), no error
    experts = ResidualConvExperts(4, 4, num_experts=2, geometry=ConvGeometry.create(3, padding=1), norm_groups=4)
    out = experts.forward_segments(torch.randn(1, 4, 1, 1), [0, 1])
    assert out.shape == (1, 4, 1, 1)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("geometry", "kwargs", "match"), [
    (ConvGeometry.create(3, stride=2, padding=1), {}, (r"residual experts keep the spatial size.*stride=\(2, 2\).*"
                                                      r"use experts='conv'")),
    (ConvGeometry.create(3, padding=0), {}, r"residual experts keep the spatial size"),
    (ConvGeometry.create(3, padding=1), {"groups": 2}, r"no conv groups"),
    (ConvGeometry.create(3, padding=1), {"act": "relu"}, r"have their own norm and activation"),
])
def test_residual_experts_reject_what_they_cannot_do(geometry: ConvGeometry, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ResidualConvExperts(4, 4, num_experts=2, geometry=geometry, **kwargs)


def test_create_experts_by_name_class_and_instance() -> None:
    geometry = ConvGeometry.create(3, padding=1)
    assert EXPERTS.names() == ["conv", "lowrank", "residual"]
    assert isinstance(create_experts("residual", 4, 4, 2, geometry), ResidualConvExperts)
    assert isinstance(create_experts(ConvExperts, 4, 4, 2, geometry), ConvExperts)
    instance = ConvExperts(4, 4, 2, geometry)
    assert create_experts(instance, 4, 4, 2, geometry) is instance
    with pytest.raises(ValueError, match=r"unknown experts 'conv2d'.*did you mean 'conv'"):
        create_experts("conv2d", 4, 4, 2, geometry)


def test_experts_build_on_meta() -> None:
    experts = ConvExperts(4, 6, num_experts=2, geometry=ConvGeometry.create(3), device=torch.device("meta"))
    assert experts.weight.is_meta
    assert experts.weight.shape == (2, 6, 4, 3, 3)
