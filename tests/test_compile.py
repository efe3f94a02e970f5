"""torch.compile of patched models: graph breaks where documented, outputs and gradients equal to eager.

Documented graph breaks (CPU, float32): sparse dispatch of pixel/grid/patch tokens selects tokens
with ``nonzero`` and reads per-expert counts on the host, so dynamo breaks the graph there (and
only there). Dense dispatch, sparse dispatch of ``image`` tokens (CondConv) and the export mode
(``convmoe.export.prepare_for_export``) compile to one graph, ``fullgraph=True`` included.

The default tests use the ``aot_eager`` backend (dynamo + AOTAutograd, no C++ compilation);
inductor, which needs minutes on a small CPU, runs with ``-m slow`` (and on CUDA with ``-m gpu``).
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch._dynamo
from conftest import gradients, max_abs_diff, randomize_experts
from torch import nn

import convmoe
from convmoe import MoEConfig
from convmoe.export import ExportDispatcher, prepare_for_export

DATA_DEPENDENT_BREAKS = ("Dynamic shape operator", "Data dependent operator")
DISPATCH_FILES = ("convmoe/dispatch/", "convmoe/experts/")


def _model(*configs: MoEConfig) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()]
    for _ in configs:
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    for i, config in enumerate(configs):
        convmoe.patch(model, targets=[str(2 + 2 * i)], config=config, upcycle=False)
    for _, block in convmoe.moe_blocks(model):
        randomize_experts(block)
    return model


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(7))


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = model(x)
    return y, convmoe.aux_loss(model)


def _explain(model: nn.Module, train: bool):
    model.train(train)
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(lambda x: _step(model, x))(_x())
    finally:
        torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    level = logging.getLogger("torch").level
    logging.getLogger("torch").setLevel(logging.CRITICAL)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    logging.getLogger("torch").setLevel(level)


def _static_model() -> nn.Module:
    """Dense dispatch, CondConv (image tokens), residual and low-rank experts in the export mode."""
    model = _model(MoEConfig(num_experts=4, top_k=2, dispatcher="dense"),
                   MoEConfig(num_experts=4, top_k=1, tokens="image", capacity_factor=1.0),
                   MoEConfig(num_experts=4, top_k=1, tokens="grid:2x2", router="positional", experts="residual"),
                   MoEConfig(num_experts=4, top_k=2, tokens="image", experts="lowrank", dispatcher="dense"))
    model[6].dispatcher = ExportDispatcher()
    return model


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_static_dispatch_compiles_to_one_graph(train):
    explained = _explain(_static_model(), train)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_sparse_dispatch_breaks_only_at_its_data_dependent_ops():
    model = _model(MoEConfig(num_experts=4, top_k=2), MoEConfig(num_experts=4, top_k=1, tokens="grid:3x3",
                                                                 router="expert_choice"))
    explained = _explain(model, train=True)
    for reason in explained.break_reasons:
        first_line = str(reason.reason).splitlines()[0]
        assert first_line.startswith(DATA_DEPENDENT_BREAKS), first_line
        where = reason.user_stack[-1].filename.replace("\\", "/")
        assert any(part in where for part in DISPATCH_FILES), where


def test_tracing_calls_no_cached_layout_helper():
    # Dynamo ignores an lru_cache wrapper and warns at each call it traces; the layout helpers bypass their
    # caches while compiling (convmoe/caching.py), so none is traced. Grid tokens on the gathered and regions
    # paths reach every cached helper: token map, averaging matrices, tile rows and index tensors.
    model = _model(MoEConfig(num_experts=4, top_k=2, tokens="grid:2x2"),
                   MoEConfig(num_experts=4, top_k=1, tokens="grid:2x2", dispatcher="sparse:regions"))
    convmoe.patch(model, targets=["0"], config=MoEConfig(num_experts=2, top_k=1, tokens="grid:2x2",
                                                         dispatcher="sparse:regions"), upcycle=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(model, backend="eager")(_x())
    cache_warnings = [str(w.message).splitlines()[0] for w in caught if "lru_cache" in str(w.message)]
    assert cache_warnings == []


def _compare_compiled(model: nn.Module, compiled: nn.Module, train: bool) -> None:
    model.train(train)
    x = _x()
    y, aux = _step(model, x)
    expected_grads = None
    if train:
        (y.square().mean() + aux).backward()
        expected_grads = gradients(model)
        model.zero_grad()
    y_c, aux_c = _step(compiled, x)
    assert max_abs_diff(y_c, y) < 1e-5
    assert max_abs_diff(aux_c, aux) < 1e-6
    if train:
        (y_c.square().mean() + aux_c).backward()
        for name, grad in gradients(model).items():
            assert max_abs_diff(grad, expected_grads[name]) < 1e-5, name


MIXED_DISPATCH = (MoEConfig(num_experts=4, top_k=2), MoEConfig(num_experts=4, top_k=1, tokens="patch:4",
                                                              router="positional", dispatcher="dense"))


# eval under -m slow: the train case runs the same forward pass (and the backward) and the
# one-graph test above already covers eval.
@pytest.mark.parametrize("train", [pytest.param(False, marks=pytest.mark.slow, id="eval"), pytest.param(True, id="train")])
def test_compiled_matches_eager(train):
    model = _model(*MIXED_DISPATCH)
    _compare_compiled(model, torch.compile(model, backend="aot_eager"), train)


def test_fullgraph_compile_after_prepare_for_export():
    model = _model(*MIXED_DISPATCH)
    assert prepare_for_export(model) == ["2", "4"]
    _compare_compiled(model, torch.compile(model, backend="aot_eager", fullgraph=True), train=True)


@pytest.mark.slow
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_inductor_matches_eager(train):
    model = _model(*MIXED_DISPATCH)
    _compare_compiled(model, torch.compile(model), train)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_inductor_on_cuda_matches_eager(train):
    model = _model(*MIXED_DISPATCH).cuda()
    compiled = torch.compile(model)
    model.train(train)
    x = _x().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, aux = _step(model, x)
        y_c, aux_c = _step(compiled, x)
    assert max_abs_diff(y_c.float(), y.float()) < 5e-2
    assert max_abs_diff(aux_c, aux) < 1e-4
