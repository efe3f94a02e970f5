"""Export: torch.export and ONNX (opset 18, onnxruntime) of patched models, in eval mode.

Sparse dispatch has data-dependent shapes; while exporting, blocks dispatch with
``convmoe.export.ExportDispatcher`` (static shapes, same outputs). The tests check that choice,
that exported graphs reproduce eager outputs at another batch size (dynamic batch), and the one
routing mode that needs a static batch.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import max_abs_diff, randomize_experts
from torch import nn

import convmoe
from convmoe import MoEConfig
from convmoe.dispatch import SparseDispatcher
from convmoe.export import ExportDispatcher, export_dispatcher, is_exporting, prepare_for_export

# One routing setup per tokens kind, plus patch-local (residual) and low-rank experts.
KINDS = {
    "pixel": MoEConfig(num_experts=4, top_k=2, tokens="pixel"),
    "grid": MoEConfig(num_experts=4, top_k=1, tokens="grid:3x3", router="expert_choice"),
    "patch": MoEConfig(num_experts=4, top_k=1, tokens="patch:4", router="positional"),  # capacity 1.25
    "image": MoEConfig(num_experts=4, top_k=1, tokens="image", capacity_factor=1.0),
    "residual": MoEConfig(num_experts=4, top_k=1, tokens="grid:2x2", router="positional", experts="residual"),
    "lowrank": MoEConfig(num_experts=4, top_k=2, tokens="pixel", experts="lowrank", expert_kwargs={"rank": 2}),
    "lowrank_image": MoEConfig(num_experts=4, top_k=2, tokens="image", experts="lowrank", bias_balancing=0.01),
}


def _model(*configs: MoEConfig) -> nn.Module:
    """A small CNN whose 3x3 convs after the stem are MoE blocks, one per config, with distinct experts."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()]
    for _ in configs:
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    model = nn.Sequential(*layers)
    for i, config in enumerate(configs):
        convmoe.patch(model, targets=[str(2 + 2 * i)], config=config, upcycle=False)
    for _, block in convmoe.moe_blocks(model):
        randomize_experts(block)
    return model.eval()


def _x(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, 9, 9, generator=torch.Generator().manual_seed(batch))


@pytest.fixture(autouse=True)
def _quiet_exporters():
    level = logging.getLogger("torch").level
    logging.getLogger("torch").setLevel(logging.ERROR)
    yield
    logging.getLogger("torch").setLevel(level)


def test_not_exporting_in_eager():
    assert not is_exporting()
    assert export_dispatcher(convmoe.create_dispatcher("sparse")).__class__ is ExportDispatcher
    custom = nn.Identity()
    assert export_dispatcher(custom) is custom  # a user dispatcher must trace on its own


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_export_dispatcher_matches_sparse(kind, train):
    model = _model(KINDS[kind]).train(train)
    exported_mode = copy.deepcopy(model)
    assert prepare_for_export(exported_mode) == ["2"]
    assert isinstance(exported_mode[2].dispatcher, ExportDispatcher)
    x = _x(3)
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    assert max_abs_diff(exported_mode(x), expected) < 1e-5
    assert isinstance(model[2].dispatcher, SparseDispatcher)  # the original keeps sparse dispatch


@pytest.mark.parametrize("kind", list(KINDS))
def test_torch_export_with_a_dynamic_batch_matches_eager(kind):
    model = _model(KINDS[kind])
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (_x(2),), dynamic_shapes=({0: batch},))
    for size in (1, 5):
        assert max_abs_diff(program.module()(_x(size)), model(_x(size))) < 1e-5
    assert isinstance(model[2].dispatcher, SparseDispatcher)
    graph_ops = {str(node.target) for node in program.graph.nodes}
    assert not any("nonzero" in op or "_local_scalar_dense" in op for op in graph_ops)


def test_expert_choice_over_image_tokens_needs_a_static_batch():
    model = _model(MoEConfig(num_experts=4, top_k=1, tokens="image", router="expert_choice"))
    batch = torch.export.Dim("batch", min=1, max=64)
    with pytest.raises(Exception, match="export it with a static batch"):
        torch.export.export(model, (_x(4),), dynamic_shapes=({0: batch},))
    program = torch.export.export(model, (_x(4),))
    assert max_abs_diff(program.module()(_x(4)), model(_x(4))) < 1e-5


def _onnx_matches(model: nn.Module, path, sizes=(1, 4)) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(model, (_x(2),), str(path), opset_version=18, dynamo=True, input_names=["x"],
                      output_names=["y"], dynamic_shapes=({0: batch},), verbose=False)
    opsets = {entry.domain: entry.version for entry in onnx.load(str(path)).opset_import}
    assert opsets[""] >= 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in sizes:
        x = _x(size)
        (y,) = session.run(None, {"x": x.numpy()})
        assert max_abs_diff(torch.from_numpy(y), model(x).detach()) < 1e-4


# ONNX export takes seconds per block on a small CPU: pixel tokens by default, the other kinds with -m slow.
ONNX_KINDS = [pytest.param(kind, marks=() if kind == "pixel" else pytest.mark.slow) for kind in KINDS]


@pytest.mark.parametrize("kind", ONNX_KINDS)
def test_onnx_export_matches_pytorch(kind, tmp_path):
    model = _model(KINDS[kind])
    _onnx_matches(model, tmp_path / f"{kind}.onnx")
    assert isinstance(model[2].dispatcher, SparseDispatcher)


@pytest.mark.slow
def test_onnx_every_tokens_kind_in_one_model_matches_pytorch(tmp_path):
    """Five MoE blocks in a row: pixel, grid, patch, image tokens and residual experts."""
    _onnx_matches(_model(*KINDS.values()), tmp_path / "model.onnx")


@pytest.mark.slow
def test_onnx_patched_timm_model_and_its_unpatched_fold(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5).eval()
    convmoe.patch(model, targets="layer4.*.conv2", config=MoEConfig(num_experts=4, top_k=1, tokens="grid:2x2"))
    for _, block in convmoe.moe_blocks(model):
        randomize_experts(block, scale=0.05)
    model = model.eval()
    x = torch.randn(2, 3, 64, 64)
    ort = pytest.importorskip("onnxruntime")
    for name, candidate in {"patched": model, "unpatched": _unpatched(model, x)}.items():
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(candidate, (x,), str(path), opset_version=18, dynamo=True, input_names=["x"])
        (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
        assert max_abs_diff(torch.from_numpy(y), candidate(x).detach()) < 1e-4


def _unpatched(model: nn.Module, x: torch.Tensor) -> nn.Module:
    folded = copy.deepcopy(model)
    convmoe.unpatch(folded, how="usage", inputs=x)
    assert not list(convmoe.moe_blocks(folded))
    return folded.eval()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_the_torchscript_onnx_exporter_is_refused_where_it_would_be_wrong(tmp_path):
    """``dynamo=False`` converts the pooling of region tokens wrongly (outputs off by ~1e-2, silently)."""
    pytest.importorskip("onnx")
    with pytest.raises(ValueError, match=r"mis-converts the pooling of 'grid:3x3' tokens.*dynamo=True"):
        torch.onnx.export(_model(KINDS["grid"]), (_x(2),), str(tmp_path / "grid.onnx"), opset_version=17,
                          dynamo=False)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("top_k", [1, 2])
def test_jit_trace_of_image_tokens_follows_each_inputs_routing(top_k):
    """A trace records operators, not the host's reads of values: the experts picked at trace time must not
    be baked in (one image with one expert once ran that expert's conv by its index, read on the host)."""
    model = _model(MoEConfig(num_experts=4, top_k=top_k, tokens="image"))
    with torch.no_grad():
        model[2].router.gate.proj.weight.normal_(std=3.0)  # images spread over the experts
    generator = torch.Generator().manual_seed(0)
    # a colour per image, so the pooled features (and the experts) differ from image to image
    inputs = [torch.randn(1, 3, 1, 1, generator=generator) * 3 + torch.randn(1, 3, 9, 9, generator=generator)
              for _ in range(12)]
    with torch.no_grad():
        picked = {tuple(model[2].router(model[2].tokens.split(model[1](model[0](x)))).expert_index.flatten().tolist())
                  for x in inputs}
        traced = torch.jit.trace(model, (inputs[0],), check_trace=False)
        assert len(picked) > 1  # some input routes elsewhere than the traced one
        assert max(max_abs_diff(traced(x), model(x)) for x in inputs) < 1e-5
