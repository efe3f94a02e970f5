"""Dispatchers: every router x tokens x dispatcher runs and trains; sparse equals the dense reference."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import (
    TOKEN_SPECS,
    default_top_k,
    gradients,
    make_block,
    max_abs_diff,
    run_seeded,
    with_dispatcher,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from convmoe import DISPATCHERS, ROUTERS, MoEConv2d, create_dispatcher
from convmoe.dispatch import DenseDispatcher, SparseDispatcher, every_pair, routed
from convmoe.dispatch.sparse import DEPRECATED_PATHS, PATHS

# every forced sparse path ('sparse:gathered', 'sparse:regions', 'sparse:merged'), from the dispatcher itself
SPARSE_PATHS = [f"sparse:{path}" for path in PATHS if path != "auto"]
DISPATCHER_SPECS = [*DISPATCHERS.names(), *SPARSE_PATHS]


def path_applies(dispatcher: str, tokens: str, *, experts: str = "conv", linear: bool = True) -> bool:
    """Whether ``dispatcher`` can run ``tokens`` with these experts (forced sparse paths are restricted).

    'regions' runs anything; 'gathered' needs stacked-conv experts (conv or low-rank); 'merged' one
    token per image and linear stacked-conv experts; 'deltas' low-rank experts.
    """
    if dispatcher in ("dense", "sparse", "sparse:regions"):
        return True
    stacked = experts in ("conv", "lowrank")
    if dispatcher == "sparse:merged":
        return tokens == "image" and stacked and linear
    if dispatcher == "sparse:deltas":
        return experts == "lowrank"
    return stacked


COMBINATIONS = [
    (router, tokens, dispatcher)
    for router in ROUTERS.names() for tokens in TOKEN_SPECS for dispatcher in DISPATCHER_SPECS
    if path_applies(dispatcher, tokens)
]


def test_registry_and_forced_paths() -> None:
    assert DISPATCHERS.names() == ["dense", "sparse"]
    # every forced path runs conv experts, except 'deltas' (low-rank experts: tests/test_lowrank.py)
    assert {spec for _, _, spec in COMBINATIONS} == {"dense", "sparse", *SPARSE_PATHS} - {"sparse:deltas"}


@pytest.mark.parametrize(("router", "tokens", "dispatcher"), COMBINATIONS)
def test_forward_and_backward_every_combination(router: str, tokens: str, dispatcher: str, x_small: Tensor) -> None:
    block = make_block(router=router, tokens=tokens, dispatcher=dispatcher, top_k=default_top_k(router)).train()
    x = x_small.clone().requires_grad_()
    y = block(x)
    assert y.shape == (2, 6, 9, 9)
    assert torch.isfinite(y).all()

    # Only the task loss: the routing weights alone must carry gradient to the router.
    (y * torch.randn_like(y)).sum().backward()
    router_grads = [p.grad for p in block.router.parameters()]
    expert_grads = [p.grad for p in block.experts.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in router_grads + expert_grads)
    assert sum(float(g.abs().sum()) for g in router_grads) > 0, "no gradient reached the router"
    assert float(block.experts.weight.grad.abs().sum()) > 0, "no gradient reached the experts"
    assert x.grad is not None
    assert float(x.grad.abs().sum()) > 0
    # the experts that received tokens, and only those, get a gradient
    load = block.last_routing.expert_load()
    per_expert = block.experts.weight.grad.flatten(1).abs().sum(1)
    assert torch.equal(per_expert > 0, load > 0)


VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "act_norm": {"expert_act": "relu", "expert_norm": "layer"},
    "act_gelu": {"expert_act": "gelu"},
    "residual": {"experts": "residual"},
    "lowrank": {"experts": "lowrank", "expert_kwargs": {"rank": 3, "alpha": 6.0}},
    "lowrank_strided": {"experts": "lowrank", "stride": 2, "dilation": 2, "padding": 2, "bias": False},
    "shared": {"shared_expert": True},
    "capacity": {"capacity_factor": 0.5},
    "strided_grouped": {"stride": 2, "dilation": 2, "padding": 2, "groups": 2, "bias": False},
    "even_same": {"kernel_size": 2, "padding": "same", "padding_mode": "reflect"},
}
SPARSE_SPECS = ["sparse", *SPARSE_PATHS]


def compare_with_dense(block: MoEConv2d, x: Tensor, *, tokens: str, experts: str, linear: bool, train: bool) -> None:
    """Every sparse path that applies gives the dense reference's output and gradients (float32, 1e-4)."""
    dense = with_dispatcher(block, "dense").train(train)
    reference = run_seeded(dense, x)
    grad_out = torch.randn_like(reference)
    (reference * grad_out).sum().backward()
    reference_grads = gradients(dense)
    compared = 0
    for spec in SPARSE_SPECS:
        if not path_applies(spec, tokens, experts=experts, linear=linear):
            continue
        sparse = with_dispatcher(block, spec).train(train)
        y = run_seeded(sparse, x)
        assert torch.equal(sparse.last_routing.slot_mask, dense.last_routing.slot_mask), "routing differs"
        assert max_abs_diff(y, reference) <= 1e-4, f"{spec}: output differs from dense by {max_abs_diff(y, reference)}"
        (y * grad_out).sum().backward()
        for name, grad in gradients(sparse).items():
            diff = max_abs_diff(grad, reference_grads[name])
            assert diff <= 1e-4, f"{spec}: gradient of {name} differs from dense by {diff}"
        compared += 1
    assert compared >= 2 if tokens in ("pixel", "image") and linear and experts != "residual" else compared >= 1


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tokens", TOKEN_SPECS)
@pytest.mark.parametrize("router", ROUTERS.names())
def test_sparse_matches_dense_in_eval(router: str, tokens: str, variant: str, x_small: Tensor) -> None:
    kwargs = dict(VARIANTS[variant])
    if kwargs.get("experts") == "residual":
        kwargs["out_channels"] = 6
    block = make_block(router=router, tokens=tokens, top_k=default_top_k(router), **kwargs).eval()
    # the experts really differ, so agreement cannot come from symmetry
    weight = next(block.experts.parameters())
    assert not torch.allclose(weight[0], weight[1])
    linear = "expert_act" not in kwargs and "expert_norm" not in kwargs
    compare_with_dense(block, x_small, tokens=tokens, experts=kwargs.get("experts", "conv"), linear=linear, train=False)


TRAIN_VARIANTS: dict[str, dict[str, Any]] = {
    "noise": {"noise_std": 1.0},
    "noise_capacity": {"noise_std": 1.0, "capacity_factor": 0.75},
    "noise_medoe_shared": {"noise_std": 0.5, "dropout": "medoe", "drop_rate": 0.25, "shared_expert": True,
                           "num_experts": 8},
    "residual_noise": {"noise_std": 1.0, "experts": "residual"},
    "lowrank_noise_capacity": {"noise_std": 1.0, "capacity_factor": 0.75, "experts": "lowrank"},
}


@pytest.mark.parametrize("variant", list(TRAIN_VARIANTS))
@pytest.mark.parametrize("tokens", TOKEN_SPECS)
@pytest.mark.parametrize("router", ROUTERS.names())
def test_sparse_matches_dense_in_training_with_the_same_seed(router: str, tokens: str, variant: str,
                                                             x_small: Tensor) -> None:
    kwargs = TRAIN_VARIANTS[variant]
    block = make_block(router=router, tokens=tokens, top_k=default_top_k(router), **kwargs).train()
    # the noise is really on: two seeds give two sets of logits
    run_seeded(block, x_small, seed=1)
    first = block.last_routing.logits
    run_seeded(block, x_small, seed=2)
    assert not torch.equal(first, block.last_routing.logits)
    compare_with_dense(block, x_small, tokens=tokens, experts=kwargs.get("experts", "conv"), linear=True, train=True)


@pytest.mark.parametrize(("tokens", "dispatcher"), [
    (tokens, dispatcher) for tokens in TOKEN_SPECS for dispatcher in ["dense", *SPARSE_SPECS]
    if path_applies(dispatcher, tokens)
])
def test_dropped_tokens_output_zero(tokens: str, dispatcher: str) -> None:
    x = torch.randn(4, 4, 9, 9)
    block = make_block(router="expert_choice", tokens=tokens, dispatcher=dispatcher, top_k=1, capacity_factor=0.5).eval()
    y = block(x)
    routing = block.last_routing
    assert routing.dropped.any()
    assert not routing.dropped.all()
    dropped_positions = routing.dropped[:, block.tokens.split(x).token_map].reshape(4, 1, 9, 9).expand_as(y)
    assert (y[dropped_positions] == 0).all()
    assert (y[~dropped_positions] != 0).any()


@pytest.mark.parametrize(("tokens", "kwargs", "allowed"), [
    ("image", {}, {"merged"}),  # CondConv: one grouped conv, wherever it applies
    ("pixel", {"experts": "residual"}, {"regions"}),  # experts that see no halo: only regions apply
    ("image", {"experts": "residual"}, {"regions"}),
    ("grid:3x3", {"experts": "residual"}, {"regions"}),
    *[(tokens, kwargs, set(PATHS) - {"auto", "merged"})
      for tokens in ("pixel", "grid:3x3", "patch:4") for kwargs in ({}, {"expert_act": "relu"}, {"groups": 2})],
    ("image", {"expert_norm": "layer"}, set(PATHS) - {"auto", "merged"}),
])
def test_auto_path_choice(tokens: str, kwargs: dict, allowed: set[str], x_small: Tensor) -> None:
    block = make_block(tokens=tokens, **kwargs)
    split = block.tokens.split(x_small)
    path = block.dispatcher.choose_path(split, block.experts)
    assert path in allowed
    # the path auto picks is one that may be forced
    assert SparseDispatcher(path).choose_path(split, block.experts) == path


@pytest.mark.parametrize(("dispatcher", "tokens", "kwargs", "match"), [
    ("sparse:gathered", "pixel", {"experts": "residual"}, (r"sparse path 'gathered' needs conv experts "
                                                           r"\(capabilities.gathered_columns, a halo\), "
                                                           r"ResidualConvExperts has .*sees_no_halo=True.*; "
                                                           r"use path='auto' or 'regions'")),
    ("sparse:merged", "pixel", {}, (r"sparse path 'merged' needs one token per image \('image' tokens\) and linear "
                                   r"conv experts")),
    ("sparse:merged", "image", {"expert_act": "silu"}, (r"sparse path 'merged' needs one token per image.*"
                                                       r"\(no expert norm or activation\)")),
    ("sparse:merged", "image", {"experts": "residual"}, r"sparse path 'merged' needs one token per image"),
])
def test_forced_path_that_cannot_apply_raises(dispatcher: str, tokens: str, kwargs: dict, match: str,
                                              x_small: Tensor) -> None:
    block = make_block(tokens=tokens, dispatcher=dispatcher, **kwargs)
    with pytest.raises(ValueError, match=match):
        block(x_small)


def test_unknown_sparse_path_raises() -> None:
    with pytest.raises(ValueError, match=rf"unknown sparse dispatch path 'pixel'; available: {', '.join(PATHS)} "
                                         r"\(did you mean 'gathered'\?\)"):
        create_dispatcher("sparse:pixel")


@pytest.mark.parametrize(("old", "new"), list(DEPRECATED_PATHS.items()))
def test_old_path_names_still_work_with_a_deprecation_warning(old: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=rf"sparse path '{old}' is deprecated; use '{new}'") as caught:
        dispatcher = SparseDispatcher(path=old)
    assert caught[0].filename == __file__  # stacklevel: the warning points at the caller
    assert dispatcher.path == new
    with pytest.warns(DeprecationWarning, match=rf"sparse path '{old}'"):
        assert create_dispatcher(f"sparse:{old}").path == new
    with pytest.warns(DeprecationWarning, match=rf"sparse path '{old}'"):
        block = make_block(tokens="image" if new == "merged" else "pixel", dispatcher=f"sparse:{old}")
    assert block.dispatcher.path == new


def test_old_gathered_max_positions_keyword_is_deprecated() -> None:
    with pytest.warns(DeprecationWarning, match="columns_max_positions is deprecated; use gathered_max_positions"):
        assert SparseDispatcher(columns_max_positions=16).gathered_max_positions == 16


def test_create_dispatcher_specs() -> None:
    assert isinstance(create_dispatcher("dense"), DenseDispatcher)
    assert create_dispatcher("sparse").path == "auto"
    assert create_dispatcher("sparse:regions").path == "regions"
    instance = SparseDispatcher("gathered")
    assert create_dispatcher(instance) is instance
    with pytest.raises(ValueError, match=r"unknown dispatcher 'sprase'; available: dense, sparse \(did you mean 'sparse'\?\)"):
        create_dispatcher("sprase")


@pytest.mark.parametrize(("tokens", "dispatcher"), [
    (tokens, dispatcher) for tokens in TOKEN_SPECS for dispatcher in SPARSE_SPECS if path_applies(dispatcher, tokens)
])
def test_sparse_paths_never_run_every_expert_everywhere(tokens: str, dispatcher: str, x_small: Tensor,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    block = make_block(tokens=tokens, dispatcher=dispatcher).eval()

    def refuse(*args: Any) -> Tensor:
        raise AssertionError(f"{dispatcher} called the dense forward_all")

    monkeypatch.setattr(block.experts, "forward_all", refuse)
    block(x_small)


def test_assignments_of_routed_and_every_pair() -> None:
    block = make_block(tokens="grid:3x3", capacity_factor=0.5).eval()
    block(torch.randn(2, 4, 9, 9))
    routing = block.last_routing
    sent = routed(routing)
    assert sent.batch.numel() == int(routing.slot_mask.sum())
    assert torch.equal(sent.expert, routing.expert_index[routing.slot_mask])
    reference = every_pair(routing)
    assert reference.batch.numel() == 2 * 9 * 4
    dense = reference.weight.reshape(2, 9, 4)
    torch.testing.assert_close(dense, routing.dense_weights())
    sorted_rows, counts = sent.sorted_by_expert(4)
    assert counts == torch.bincount(sent.expert, minlength=4).tolist()
    assert (sorted_rows.expert.diff() >= 0).all()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    kernel=st.sampled_from([1, 2, 3, (1, 3), (3, 2)]),
    stride=st.sampled_from([1, 2, (1, 2)]),
    dilation=st.sampled_from([1, 2]),
    padding=st.sampled_from([0, 1, (2, 0)]),
    groups=st.sampled_from([1, 2]),
    tokens=st.sampled_from(TOKEN_SPECS),
    router=st.sampled_from(ROUTERS.names()),
    height=st.integers(5, 12),
    width=st.integers(5, 12),
    batch=st.integers(1, 3),
)
def test_sparse_matches_dense_on_random_geometries(kernel: Any, stride: Any, dilation: int, padding: Any, groups: int,
                                                   tokens: str, router: str, height: int, width: int,
                                                   batch: int) -> None:
    block = make_block(4, 6, kernel, stride=stride, dilation=dilation, padding=padding, groups=groups, tokens=tokens,
                       router=router, top_k=default_top_k(router)).eval()
    x = torch.randn(batch, 4, height, width)
    out_size = block.geometry.output_size(height, width)
    assume(min(out_size) >= 1)
    assume(not tokens.startswith("grid") or (out_size[0] >= 3 and out_size[1] >= 4))
    reference = with_dispatcher(block, "dense")(x)
    assert reference.shape == nn.Conv2d(4, 6, kernel, stride=stride, dilation=dilation, padding=padding)(x).shape
    for spec in SPARSE_SPECS:
        if path_applies(spec, tokens):
            assert max_abs_diff(with_dispatcher(block, spec)(x), reference) <= 1e-4, spec


@pytest.mark.parametrize(("tokens", "experts", "padding_mode", "pads"), [
    ("image", "conv", "zeros", 0),           # merged: the conv takes the zero padding
    ("pixel", "lowrank", "zeros", 0),        # deltas: likewise
    ("pixel", "conv", "zeros", 1),           # gathered: windows of the padded map
    ("image", "conv", "reflect", 1),         # reflect padding is copied
])
def test_whole_map_paths_pad_inside_the_conv_and_match_the_padded_input(
        tokens: str, experts: str, padding_mode: str, pads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1, padding_mode=padding_mode)
    block = MoEConv2d.from_conv(conv, num_experts=4, top_k=2, tokens=tokens, experts=experts,
                                **({"expert_kwargs": {"rank": 2}} if experts == "lowrank" else {})).eval()
    if experts == "lowrank":
        with torch.no_grad():
            block.experts.up.normal_()
    x = torch.randn(2, 6, 8, 8)  # 64 positions per image: "auto" merges a batch of 2
    with torch.no_grad():
        expected = DenseDispatcher()(block.geometry.pad(x), block.tokens.split(x), block.router(block.tokens.split(x)),
                                     block.experts, (8, 8))
        calls: list[int] = []
        original = torch.nn.functional.pad
        monkeypatch.setattr(torch.nn.functional, "pad", lambda *a, **k: calls.append(1) or original(*a, **k))
        y = block(x)
    assert len(calls) == pads
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
