"""The expert-bank contract: a new bank plugs in by subclassing ExpertBank; capabilities, not probing, pick paths."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_dense_dispatch, make_block
from torch import Tensor, nn

from convmoe import EXPERTS, ConvGeometry, create_experts
from convmoe.experts import ExpertBank, ExpertCapabilities, ExpertPostOps, StackedConv


class ScaledPointwise(ExpertBank):
    """E per-expert 1x1 convs, each times a learned scale; implements only what the contract requires."""

    def __init__(self, in_channels: int, out_channels: int, num_experts: int, geometry: ConvGeometry,
                 device: torch.device | None = None, dtype: torch.dtype | None = None, **unused: Any) -> None:
        if geometry.kernel_size != (1, 1) or geometry.stride != (1, 1):
            raise ValueError(f"scaled_pointwise experts replace 1x1 stride-1 convs, got {geometry}.")
        super().__init__(in_channels, out_channels, num_experts, geometry)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.randn(num_experts, out_channels, in_channels, **kw) / in_channels ** 0.5)
        self.scale = nn.Parameter(torch.rand(num_experts, **kw) + 0.5)

    def forward_segments(self, windows: Tensor, counts: Tensor | list[int]) -> Tensor:
        counts = counts.tolist() if isinstance(counts, Tensor) else counts
        outputs = [torch.einsum("mchw,oc->mohw", x, self.weight[e]) * self.scale[e]
                   for e, x in enumerate(windows.split(counts)) if x.shape[0]]
        return torch.cat(outputs) if outputs else windows.new_zeros(0, self.out_channels, *windows.shape[2:])


class FoldedScaledPointwise(ScaledPointwise):
    """The same experts, declared a linear stacked conv (scale folded into the weight): the fast paths apply."""

    capabilities = ExpertCapabilities(gathered_columns=True, linear=True)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.post = ExpertPostOps(self.num_experts, self.out_channels)  # none: identity

    def stacked_conv(self) -> StackedConv:
        weight = (self.weight * self.scale[:, None, None])[..., None, None]  # (E, C_out, C_in, 1, 1)
        return StackedConv(weight, None, 1, self.post)


def reference(block: nn.Module, x: Tensor) -> Tensor:
    """Every expert's 1x1 conv * scale on the whole map, weighted by each position's token's combine weight."""
    experts, routing = block.experts, block.last_routing
    all_outputs = torch.einsum("bchw,eoc->beohw", x, experts.weight) * experts.scale[None, :, None, None, None]
    token_map = block.tokens.split(x).token_map
    weight = routing.dense_weights()[:, token_map].transpose(1, 2).reshape(x.shape[0], experts.num_experts, *x.shape[2:])
    return (all_outputs * weight[:, :, None]).sum(1)


def assert_matches_dense(block: nn.Module, x: Tensor) -> None:
    """``block`` gives the hand-written reference's output, and the dense dispatcher's output and gradients."""
    x = x.clone().requires_grad_()
    y = block(x)
    torch.testing.assert_close(y, reference(block, x), atol=1e-5, rtol=0)
    got = assert_matches_dense_dispatch(block, x, y)
    assert float(got["experts.scale"].abs().sum()) > 0


TOKENS = ["pixel", "grid:3x3", "patch:4", "image"]


@pytest.mark.usefixtures("isolated_registries")
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("dispatcher", ["sparse", "sparse:regions"])
def test_a_bank_with_only_the_required_methods_runs_sparse_and_matches_dense(tokens: str, dispatcher: str,
                                                                             x_small: Tensor) -> None:
    EXPERTS.register("scaled_pointwise")(ScaledPointwise)
    block = make_block(4, 6, 1, padding=0, experts="scaled_pointwise", tokens=tokens, dispatcher=dispatcher).train()
    assert isinstance(block.experts, ScaledPointwise)
    split = block.tokens.split(x_small)
    assert block.dispatcher.choose_path(split, block.experts) == "regions"  # nothing else is declared
    assert_matches_dense(block, x_small)


@pytest.mark.usefixtures("isolated_registries")
@pytest.mark.parametrize(("tokens", "path"), [("pixel", "gathered"), ("patch:2", "gathered"), ("image", "merged"),
                                              ("grid:3x3", "gathered")])  # 1x1 experts gather tiles of <= 64 positions
def test_declared_capabilities_choose_the_fast_paths(tokens: str, path: str, x_small: Tensor) -> None:
    EXPERTS.register("folded_pointwise")(FoldedScaledPointwise)
    block = make_block(4, 6, 1, padding=0, experts="folded_pointwise", tokens=tokens).train()
    assert block.dispatcher.choose_path(block.tokens.split(x_small), block.experts) == path
    assert_matches_dense(block, x_small)


def test_a_forced_path_the_bank_does_not_declare_raises(x_small: Tensor) -> None:
    experts = ScaledPointwise(4, 6, 2, ConvGeometry.create(1))
    block = make_block(4, 6, 1, padding=0, experts=experts, dispatcher="sparse:gathered")
    with pytest.raises(ValueError, match=r"sparse path 'gathered' needs conv experts.*ScaledPointwise has "
                                         r"ExpertCapabilities\(sees_no_halo=False, gathered_columns=False"):
        block(x_small)
    with pytest.raises(NotImplementedError, match=r"ScaledPointwise is not a stacked conv"):
        experts.stacked_conv()
    with pytest.raises(NotImplementedError, match=r"ScaledPointwise has no forward_all"):
        experts.forward_all(x_small)


def test_a_bank_without_forward_segments_cannot_be_instantiated() -> None:
    class NoSegments(ExpertBank):
        pass

    with pytest.raises(TypeError, match=r"abstract class NoSegments.*forward_segments"):
        NoSegments(4, 4, 2, ConvGeometry.create(1))


@pytest.mark.parametrize(("flag", "method"), [("gathered_columns", "stacked_conv"), ("dense_forward", "forward_all")])
def test_a_declared_capability_without_its_method_fails_at_class_creation(flag: str, method: str) -> None:
    with pytest.raises(TypeError, match=rf"Claims declares capabilities.{flag}=True but does not implement {method}\(\)"):
        type("Claims", (ScaledPointwise,), {"capabilities": ExpertCapabilities(**{flag: True})})


def test_a_bank_that_is_not_an_expert_bank_is_refused() -> None:
    class DuckTyped(nn.Module):
        patch_local = True

        def forward_segments(self, windows: Tensor, counts: list[int]) -> Tensor:
            return F.relu(windows)

    with pytest.raises(TypeError, match=r"experts DuckTyped do not subclass convmoe.experts.ExpertBank"):
        create_experts(DuckTyped(), 4, 4, 2, ConvGeometry.create(1))
