"""convmoe.analysis: routing collection, specialisation, balance, heatmaps, routing maps, redundancy, tracking, CLI.

Tiny models and data only: a two-layer classifier, a three-conv segmenter, hand-set routers.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image
from torch import Tensor, nn

import convmoe
from convmoe import MoEConfig, MoEConv2d
from convmoe.analysis import (
    RoutingTracker,
    analyze,
    class_order,
    collect_routing,
    folded_layer,
    layer_cost,
    layer_redundancy,
    layer_tokens,
    load_history,
    model_card_section,
    mutual_information,
    plot_heatmap,
    plot_heatmap_grid,
    plot_routing_maps,
    routing_assignment,
    routing_maps,
    specialization_score,
    token_labels,
)
from convmoe.analysis.labels import NO_LABEL, resize_labels
from convmoe.analysis.plotting import expert_colors, require_matplotlib, save_figure
from convmoe.tokens import create_tokens

FIXTURES = "tests/fixtures"


# -- tiny models ---------------------------------------------------------------------------------------


def tiny_classifier(num_classes: int = 4, upcycle_first: bool = True) -> nn.Module:
    """conv(4->8) -> relu -> conv(8->8, stride 2) -> pool -> linear; both convs patched into MoE blocks.

    The first block is upcycled with identical experts (folding it changes nothing); the second has
    fresh random experts (folding it changes the output).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
    convmoe.patch(model, targets="0", config=MoEConfig(num_experts=4, top_k=1, tokens="grid:2x2"), upcycle=upcycle_first)
    convmoe.patch(model, targets="2", config=MoEConfig(num_experts=3, top_k=2, tokens="pixel"), upcycle=False)
    return model.eval()


class TinySegmenter(nn.Module):
    """stem (stride 2) -> mid -> 1x1 head, upsampled back to the input size."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.head(F.relu(self.mid(F.relu(self.stem(x)))))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def tiny_segmenter(num_classes: int = 4, in_channels: int = 3) -> nn.Module:
    """The factory ``convmoe.create_model("test_analysis:tiny_segmenter")`` calls."""
    return TinySegmenter(num_classes, in_channels)


def patched_segmenter(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    model = convmoe.create_model("test_analysis:tiny_segmenter", num_classes=num_classes)
    convmoe.patch(model, targets="mid", config=MoEConfig(num_experts=4, top_k=1, tokens="grid:2x2",
                                                         upcycle_noise_std=0.5))
    return model.eval()


def class_batches(num_batches: int = 3, batch: int = 8, num_classes: int = 4) -> list[tuple[Tensor, Tensor]]:
    """Images whose channel c is bright for class c (so a linear gate can route by class)."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(num_batches):
        labels = torch.randint(0, num_classes, (batch,), generator=generator)
        images = 0.1 * torch.randn(batch, 4, 8, 8, generator=generator)
        images += 2.0 * F.one_hot(labels, 4).float()[:, :, None, None]
        out.append((images, labels))
    return out


# -- token labels --------------------------------------------------------------------------------------


def test_token_labels_take_the_image_label_for_classification() -> None:
    tokens = create_tokens("grid:2x2").split(torch.zeros(2, 1, 4, 4))
    assert token_labels(torch.tensor([3, 1]), tokens).tolist() == [[3] * 4, [1] * 4]


def test_token_labels_are_the_majority_of_labelled_pixels() -> None:
    tokens = create_tokens("grid:1x2").split(torch.zeros(1, 1, 2, 4))
    mask = torch.tensor([[[1, 2, 0, 7], [2, 2, 7, 7]]])  # left token: 2 wins 3:1; right: 0 alone, 7 ignored
    assert token_labels(mask, tokens, ignore_index=7).tolist() == [[2, 0]]
    only_ignored = torch.full((1, 2, 4), 7)
    assert token_labels(only_ignored, tokens, ignore_index=7).tolist() == [[NO_LABEL, NO_LABEL]]


def test_token_labels_resize_with_nearest_to_the_layer_grid() -> None:
    mask = torch.randint(0, 5, (2, 9, 13))
    tokens = create_tokens("pixel").split(torch.zeros(1, 1, 4, 6))
    expected = F.interpolate(mask[:, None].float(), size=(4, 6), mode="nearest")[:, 0].long()
    assert torch.equal(resize_labels(mask, (4, 6)), expected)
    assert torch.equal(token_labels(mask, tokens), expected.reshape(2, -1))


def test_token_labels_reject_other_shapes() -> None:
    tokens = create_tokens("pixel").split(torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"image labels \(B,\) or label maps \(B, H, W\)"):
        token_labels(torch.zeros(1, 1, 2, 2), tokens)


def test_layer_tokens_reproduce_the_blocks_partition() -> None:
    block = MoEConv2d(4, 4, 3, stride=2, padding=1, num_experts=2, tokens="grid:2x3")
    x = torch.randn(1, 4, 11, 9)
    out = block(x)
    tokens = layer_tokens(block, tuple(out.shape[-2:]))
    expected = block.tokens.split(torch.zeros(1, 1, *out.shape[-2:]))
    assert tokens.row_edges == expected.row_edges
    assert tokens.col_edges == expected.col_edges
    assert tokens.num_tokens == block.last_routing.probs.shape[1]


# -- specialisation ------------------------------------------------------------------------------------


def test_mutual_information_by_hand() -> None:
    assert mutual_information(torch.eye(4) * 5) == pytest.approx(math.log(4))
    assert mutual_information(torch.ones(3, 5)) == 0.0
    # P(C, E) = [[0.5, 0], [0.25, 0.25]]: H(C) = log 2, H(E) = H(0.75, 0.25), H(C, E) = H(0.5, 0.25, 0.25)
    h = lambda *p: -sum(q * math.log(q) for q in p)  # noqa: E731
    expected = h(0.5, 0.5) + h(0.75, 0.25) - h(0.5, 0.25, 0.25)
    assert mutual_information(torch.tensor([[2.0, 0.0], [1.0, 1.0]])) == pytest.approx(expected)


def test_specialization_score_is_normalised_mutual_information() -> None:
    assert specialization_score(torch.eye(3) * 7).score == pytest.approx(1.0)
    # 4 balanced classes mapped without error onto 2 experts: 2 log 2 / (log 4 + log 2) = 2/3.
    assert specialization_score(torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])).score == pytest.approx(2 / 3)
    # A collapsed layer scores 0, even with a stray token.
    collapsed = torch.tensor([[100.0, 0.0], [99.0, 1.0]])
    assert specialization_score(collapsed).score < 0.02
    assert specialization_score(torch.zeros(2, 2)).score == 0.0


def test_specialization_is_high_when_each_class_is_forced_to_its_expert() -> None:
    model = nn.Sequential(MoEConv2d(4, 4, 1, num_experts=4, top_k=1, tokens="grid:2x2"))
    with torch.no_grad():  # gate = 10 * identity: channel c (bright for class c) wins expert c
        model[0].router.gate.proj.weight.copy_(10 * torch.eye(4))
        model[0].router.gate.proj.bias.zero_()
    collection = collect_routing(model, class_batches())
    layer = collection.layers["0"]
    assert specialization_score(layer.class_expert).score > 0.9
    assert torch.allclose(layer.class_shares(), torch.eye(4, dtype=torch.float64))
    assert class_order(layer.class_shares()) == [0, 1, 2, 3]


def test_specialization_is_near_zero_for_a_random_router() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(MoEConv2d(4, 4, 1, num_experts=4, top_k=1, tokens="grid:2x2"))
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(500, 4, 4, 4, generator=generator), torch.randint(0, 4, (500,), generator=generator))
               for _ in range(8)]
    layer = collect_routing(model, batches).layers["0"]
    assert layer.tokens == 8 * 500 * 4
    assert len(layer.load.nonzero()) >= 3  # the router really spreads tokens: not a collapse
    assert specialization_score(layer.class_expert).score < 0.05


# -- collection and balance ----------------------------------------------------------------------------


def test_collection_counts_match_the_routing() -> None:
    model = tiny_classifier()
    batches = class_batches(num_batches=2)
    collection = collect_routing(model, batches)
    assert collection.task == "classification"
    assert collection.images == 16
    second = collection.layers["2"]
    assert second.top_k == 2
    assert second.tokens == 16 * 4 * 4
    assert float(second.load.sum()) == 2 * second.tokens  # top-2, no capacity: two slots per token
    assert float(second.usage.sum()) == pytest.approx(second.tokens)
    shares = second.class_shares()
    seen = second.class_tokens() > 0
    assert torch.allclose(shares[seen].sum(dim=1), torch.ones(int(seen.sum()), dtype=torch.float64))
    # the last batch's routing, recomputed, is the last batch's part of the sums
    images, labels = batches[-1]
    with torch.no_grad():
        model(images)
    assignment = routing_assignment(model[2].last_routing, torch.float64).sum(dim=1)  # (B, E)
    first_batch = collect_routing(model, batches[-1:]).layers["2"].class_expert
    expected = torch.zeros_like(first_batch).index_add_(0, labels, assignment)
    assert torch.allclose(first_batch, expected)


def test_segmentation_tokens_are_labelled_by_majority_and_ignore_index() -> None:
    model = nn.Sequential(MoEConv2d(3, 4, 3, padding=1, num_experts=2, top_k=1, tokens="grid:2x2"))
    mask = torch.zeros(2, 8, 8, dtype=torch.long)  # quadrants: class 0, 1, ignored (11), 2
    mask[:, :4, 4:], mask[:, 4:, :4], mask[:, 4:, 4:] = 1, 11, 2
    collection = collect_routing(model, [{"image": torch.randn(2, 3, 8, 8), "mask": mask}], ignore_index=11)
    layer = collection.layers["0"]
    assert collection.task == "segmentation"
    assert layer.class_tokens().tolist() == [2.0, 2.0, 2.0]
    assert layer.tokens == 8
    assert layer.output_size == (8, 8)


def test_balance_figures_of_a_collapsed_layer() -> None:
    block = MoEConv2d(4, 4, 1, num_experts=4, top_k=1, tokens="pixel")
    with torch.no_grad():
        block.router.gate.proj.weight.zero_()
        block.router.gate.proj.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    report = analyze(nn.Sequential(block), [(torch.randn(2, 4, 3, 3), torch.tensor([0, 1]))], redundancy=False)
    balance = report.layers["0"].balance
    assert balance.utilization == [0.0, 0.0, 1.0, 0.0]
    assert balance.imbalance == pytest.approx(4.0)
    assert balance.utilization_entropy == 0.0
    assert balance.dead_experts == [0, 1, 3]
    assert balance.dropped_rate == 0.0


def test_layer_cost_counts_dispatched_slots() -> None:
    model = nn.Sequential(MoEConv2d(4, 6, 3, padding=1, num_experts=4, top_k=2, tokens="grid:2x2"))
    layer = collect_routing(model, [(torch.randn(3, 4, 6, 6), torch.tensor([0, 1, 2]))]).layers["0"]
    cost = layer_cost(model[0], layer)
    dense = 6 * 4 * 3 * 3 * 36  # MACs of the dense conv on a 6x6 output
    router = 4 * 4 * 4  # 4 tokens x (C_in x E) gate weights
    assert cost.dense_macs == dense
    assert cost.active_macs == 2 * dense + router
    assert cost.macs_saved == dense + router
    assert cost.expert_slots_per_token == 2.0
    assert cost.params_saved == sum(p.numel() for p in model.parameters()) - (6 * 4 * 9 + 6)


# -- files: heatmaps, routing maps, report -------------------------------------------------------------


@pytest.fixture
def drawn(monkeypatch) -> dict[Path, Any]:
    """Every figure the analysis saves, by the path it went to; a closed figure can still be inspected."""
    figures: dict[Path, Any] = {}

    def record(figure: Any, path: str | Path, dpi: int = 100) -> Path:
        saved = save_figure(figure, path, dpi)
        figures[saved] = figure
        return saved

    for module in ("heatmap", "spatial", "tracking"):
        monkeypatch.setattr(importlib.import_module(f"convmoe.analysis.{module}"), "save_figure", record)
    return figures


def _check_png(path: str | Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _heatmap_axes(figure: Any) -> list[Any]:
    return [axes for axes in figure.axes if axes.images]  # the colour bar draws no image


def _rendered(figure: Any) -> np.ndarray:
    canvas = FigureCanvasAgg(figure)  # save_figure closed the figure, which took its canvas away
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


def _pixel(pixels: np.ndarray, axes: Any, x: float, y: float) -> np.ndarray:
    column, row = axes.transData.transform((x, y))
    return pixels[int(pixels.shape[0] - row), int(column)]


def _check_heatmap(figure: Any, axes: Any, rows: Tensor) -> None:
    """``axes`` shows ``rows`` (classes x experts): the image data, the annotations and the rendered colours."""
    np.testing.assert_allclose(axes.images[0].get_array(), rows.numpy(), rtol=0, atol=1e-7)
    if axes.texts:
        assert [text.get_text() for text in axes.texts] == [f"{float(v):.2f}" for v in rows.flatten()]
    pixels = _rendered(figure)
    viridis = matplotlib.colormaps["viridis"]
    for (i, e), value in np.ndenumerate(rows.numpy()):
        # a cell's corner: its centre holds the annotation
        expected = np.array(viridis(float(value))[:3]) * 255
        np.testing.assert_allclose(_pixel(pixels, axes, e - 0.4, i - 0.4), expected, atol=2.5, err_msg=f"cell {i, e}")


def test_heatmap_draws_each_class_row_in_class_order(tmp_path, drawn) -> None:
    shares = torch.tensor([[0.1, 0.7, 0.2], [0.9, 0.05, 0.05], [0.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    tokens = torch.tensor([10.0, 2500.0, 0.0, 7.0])
    path = plot_heatmap(tmp_path / "h.png", shares, ["a", "b", "c", "d"], title="layer", class_tokens=tokens)
    _check_png(path)
    figure = drawn[path]
    (axes,) = _heatmap_axes(figure)
    assert len(figure.axes) == 2  # the heatmap and its colour bar
    assert axes.get_title() == "layer"
    assert [label.get_text() for label in axes.get_yticklabels()] == ["b (2.50K)", "a (10)", "d (7)"]  # c: no tokens
    assert [label.get_text() for label in axes.get_xticklabels()] == ["0", "1", "2"]
    _check_heatmap(figure, axes, shares[[1, 0, 3]])


def test_heatmap_grid_draws_one_panel_per_layer(tmp_path, drawn) -> None:
    first, second = torch.eye(2), torch.tensor([[0.25, 0.75], [0.6, 0.4]])
    path = plot_heatmap_grid(tmp_path / "g.png", [("first", first), ("second", second)], ["x", "y"])
    figure = drawn[path]
    panels = _heatmap_axes(figure)
    assert [axes.get_title() for axes in panels] == ["first", "second"]
    _check_heatmap(figure, panels[0], first)
    _check_heatmap(figure, panels[1], second[[1, 0]])  # y leads: its dominant expert is 0


def test_analyze_writes_well_formed_files(tmp_path, drawn) -> None:
    model = tiny_classifier()
    names = ["red", "green", "blue", "alpha"]
    images = class_batches(1)[0][0][:3]
    report = analyze(model, class_batches(), tmp_path, class_names=names, images=images, captions=["a", "b", "c"])

    payload = json.loads((tmp_path / "report.json").read_text())
    assert set(payload) >= {"model", "data", "task", "images", "class_names", "layers", "redundancy", "files"}
    assert list(payload["layers"]) == ["0", "2"]
    for entry in payload["layers"].values():
        assert set(entry) >= {"num_experts", "top_k", "tokens", "specialization", "balance", "cost", "classes", "files"}
        assert set(entry["specialization"]) >= {"score", "mutual_information_bits"}
        assert set(entry["balance"]) >= {"utilization", "utilization_entropy", "imbalance", "dead_experts",
                                         "dropped_rate"}
        assert set(entry["files"]) == {"heatmap_csv", "heatmap_png", "routing_map_png"}
    assert set(payload["redundancy"]) >= {"metric_name", "baseline", "layers", "recommendation"}

    for name, layer in report.layers.items():
        with open(layer.files["heatmap_csv"], newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["class", *[f"expert_{e}" for e in range(layer.num_experts)]]
        seen = [names[c] for c in range(len(names)) if layer.class_tokens[c] > 0]
        assert sorted(row[0] for row in rows[1:]) == sorted(seen), name
        for row in rows[1:]:
            assert sum(float(v) for v in row[1:]) == pytest.approx(1.0, abs=1e-5)
        order = class_order(layer.class_shares)
        title = f"{name}\nspecialisation {layer.specialization.score:.2f}"
        _check_png(layer.files["heatmap_png"])
        figure = drawn[Path(layer.files["heatmap_png"])]
        (axes,) = _heatmap_axes(figure)
        assert axes.get_title() == title
        assert [label.get_text().split(" (")[0] for label in axes.get_yticklabels()] == [names[c] for c in order]
        _check_heatmap(figure, axes, layer.class_shares[order])

        _check_png(layer.files["routing_map_png"])
        figure = drawn[Path(layer.files["routing_map_png"])]
        assert len(figure.axes) == 6  # three images: overlaid on the image (top row) and alone
        assert [axes.get_title() for axes in figure.axes[:3]] == ["a", "b", "c"]
        expert_map = routing_maps(model, images)[name]
        for b, axes in enumerate(figure.axes[3:]):
            np.testing.assert_array_equal(axes.images[0].get_array(), (expert_map[b] + 1).numpy())
    _check_png(report.files["heatmaps_png"])
    grid = drawn[Path(report.files["heatmaps_png"])]
    panels = _heatmap_axes(grid)
    assert [axes.get_title() for axes in panels] == [f"{name}\nspecialisation {layer.specialization.score:.2f}"
                                                     for name, layer in report.layers.items()]
    for axes, layer in zip(panels, report.layers.values(), strict=True):
        _check_heatmap(grid, axes, layer.class_shares[class_order(layer.class_shares)])
    assert "red" in report.table() or "0" in report.table()


def test_routing_maps_show_each_positions_top_expert(tmp_path, drawn) -> None:
    model = tiny_classifier()
    images = class_batches(1)[0][0][:2]
    maps = routing_maps(model, images)
    assert maps["0"].shape == (2, 8, 8)
    assert maps["2"].shape == (2, 4, 4)
    routing = model[2].last_routing  # pixel tokens: one token per position; the top slot's expert
    expected = routing.expert_index.gather(-1, routing.combine_weight.argmax(dim=-1, keepdim=True))[..., 0]
    assert torch.equal(maps["2"].reshape(2, -1), expected)
    grid = maps["0"]  # grid:2x2: every quadrant holds one expert
    for a in (0, 4):
        for b in (0, 4):
            assert grid[:, a:a + 4, b:b + 4].flatten(1).unique(dim=1).shape[1] == 1
    files = plot_routing_maps(model, images, tmp_path)
    assert sorted(files) == ["0", "2"]
    for name, path in files.items():
        _check_png(path)
        figure = drawn[path]
        assert figure.get_suptitle().startswith(f"{name}: top expert per token")
        overlay, alone = figure.axes[:2], figure.axes[2:]
        shown = sorted(int(e) for e in maps[name].unique())
        assert [text.get_text() for text in figure.legends[0].get_texts()] == [f"expert {e}" for e in shown]
        colors = np.array(expert_colors(model[int(name)].config.num_experts))[:, :3] * 255
        pixels = _rendered(figure)
        H_out, W_out = maps[name].shape[-2:]
        for b in range(2):
            assert len(overlay[b].images) == 2  # the image, the experts over it
            np.testing.assert_array_equal(overlay[b].images[1].get_array(), (maps[name][b] + 1).numpy())
            np.testing.assert_array_equal(alone[b].images[0].get_array(), (maps[name][b] + 1).numpy())
            for r in range(H_out):  # the expert's own colour at the centre of each output position
                for c in range(W_out):
                    x, y = (c + 0.5) * 8 / W_out, (r + 0.5) * 8 / H_out
                    np.testing.assert_allclose(_pixel(pixels, alone[b], x, y), colors[maps[name][b, r, c]], atol=2.5)


def test_model_card_section_has_the_table_and_the_image(tmp_path, drawn) -> None:
    model = tiny_classifier()
    report = analyze(model, class_batches(), class_names=["r", "g", "b", "a"], model_name="tiny", data_name="synthetic")
    card = model_card_section(report, folder=tmp_path)
    assert card.startswith("## Routing analysis")
    assert "| `0` |" in card
    assert "| `2` |" in card
    assert "![Expert x class routing heatmaps](routing_heatmaps.png)" in card
    assert "Fold back" in card or "Keep every" in card
    _check_png(tmp_path / "routing_heatmaps.png")
    figure = drawn[tmp_path / "routing_heatmaps.png"]
    panels = _heatmap_axes(figure)
    assert [axes.get_title().split("\n")[0] for axes in panels] == ["0", "2"]
    for axes, layer in zip(panels, report.layers.values(), strict=True):
        _check_heatmap(figure, axes, layer.class_shares[class_order(layer.class_shares)])


# -- redundancy ----------------------------------------------------------------------------------------


def _snapshot(model: nn.Module, x: Tensor) -> tuple[dict[str, Tensor], list[tuple[str, type]], Tensor]:
    with torch.no_grad():
        output = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, [(name, type(module)) for name, module in model.named_modules()], output


def test_redundancy_restores_the_model_exactly() -> None:
    model = tiny_classifier()
    x = class_batches(1)[0][0]
    state, types, output = _snapshot(model, x)
    blocks = [model[0], model[2]]
    report = layer_redundancy(model, class_batches(), collection=collect_routing(model, class_batches()))
    after_state, after_types, after_output = _snapshot(model, x)
    assert after_types == types
    assert state.keys() == after_state.keys()
    assert all(torch.equal(state[k], after_state[k]) for k in state)
    assert torch.equal(output, after_output)
    assert model[0] is blocks[0]
    assert model[2] is blocks[1]
    assert not model.training
    assert report.metric_name == "top1"
    assert len(report.layers) == 2


def test_redundancy_ranks_a_layer_that_does_not_matter_first() -> None:
    model = tiny_classifier()
    x = class_batches(1)[0][0]
    with torch.no_grad():
        reference = model(x)

    def closeness(m: nn.Module) -> float:  # higher is better; 0 when the output is unchanged up to rounding
        with torch.no_grad():
            error = float((m(x) - reference).abs().max())
        return 0.0 if error < 1e-5 else -error

    report = layer_redundancy(model, metric=closeness, metric_name="closeness", tolerance=0.0)
    assert [layer.name for layer in report.layers] == ["0", "2"]
    first, second = report.layers
    assert first.change == 0.0
    assert first.recommendation == "fold"
    assert second.change < 0
    assert second.recommendation == "keep"
    assert report.fold_together == ["0"]
    assert "Fold back 0" in report.recommendation()
    assert "Keep 2" in report.recommendation()
    assert "rank" in report.table()


def test_redundancy_checks_the_recommended_layers_together() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    convmoe.patch(model, targets=["0", "2"], config=MoEConfig(num_experts=2, top_k=1))
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        reference = model(x)

    def closeness(m: nn.Module) -> float:
        with torch.no_grad():
            return -round(float((m(x) - reference).abs().max()), 5)

    report = layer_redundancy(model, metric=closeness, tolerance=0.0)
    assert report.fold_together == ["0", "2"]
    assert report.fold_together_metric == 0.0


def test_folded_layer_is_the_dense_fold_inside_and_the_block_after() -> None:
    model = tiny_classifier()
    block = model[2]
    with folded_layer(model, "2") as dense:
        assert isinstance(model[2], nn.Conv2d)
        assert model[2] is dense
        expected = block.experts.weight.mean(dim=0)
        torch.testing.assert_close(dense.weight, expected)
    assert model[2] is block
    relu_model = nn.Sequential(MoEConv2d(3, 3, 1, num_experts=2, expert_act="relu"))
    with pytest.raises(TypeError, match=r"norm/activation"), folded_layer(relu_model, "0"):
        pass
    assert isinstance(relu_model[0], MoEConv2d)


def test_redundancy_needs_a_loader_or_a_metric() -> None:
    with pytest.raises(ValueError, match="validation loader or a metric"):
        layer_redundancy(tiny_classifier())
    with pytest.raises(ValueError, match="tolerance"):
        layer_redundancy(tiny_classifier(), metric=lambda m: 0.0, tolerance=-1)


# -- tracking ------------------------------------------------------------------------------------------


def test_tracker_logs_statistics_per_epoch_and_plots_them(tmp_path, drawn) -> None:
    model = patched_segmenter().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = RoutingTracker(ignore_index=3).attach(model)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for epoch in range(3):
        for _ in range(2):
            images = torch.randn(2, 3, 12, 12, generator=generator)
            masks = torch.randint(0, 4, (2, 12, 12), generator=generator)
            loss = F.cross_entropy(model(images), masks, ignore_index=3) + convmoe.aux_loss(model)
            tracker.update(model, masks)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rows.append(tracker.epoch_end(epoch))
    assert set(rows[0]) == {f"routing/mid/{key}" for key in ("specialization", "mutual_information_bits",
                                                            "utilization_entropy", "imbalance", "dead_experts",
                                                            "dropped_rate", "router_entropy")}
    assert all(0.0 <= row["routing/mid/specialization"] <= 1.0 for row in rows)
    assert [entry["epoch"] for entry in tracker.history] == [0, 1, 2]
    assert tracker.collector.layers["mid"].tokens == 0  # reset after each epoch
    path = tracker.plot(tmp_path / "curves.png")
    _check_png(path)
    panels = drawn[path].axes
    statistics = ["specialization", "utilization_entropy", "imbalance", "dropped_rate"]
    assert [axes.get_title() for axes in panels] == [s.replace("_", " ") for s in statistics]
    for axes, statistic in zip(panels, statistics, strict=True):
        (line,) = axes.get_lines()  # one line per MoE layer
        assert line.get_label() == "mid"
        assert list(line.get_xdata()) == [0, 1, 2]
        assert list(line.get_ydata()) == [row[f"routing/mid/{statistic}"] for row in rows]
    assert load_history(tracker.save(tmp_path / "history.json")) == tracker.history


def test_tracker_needs_attach_for_label_maps() -> None:
    model = patched_segmenter()
    tracker = RoutingTracker()
    model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"attach\(model\)"):
        tracker.update(model, torch.zeros(1, 8, 8, dtype=torch.long))
    tracker.update(model, torch.tensor([1]))  # image labels need no output size
    with pytest.raises(ValueError, match="num_classes"):
        tracker.epoch_end(reduce=lambda t: t)


# -- command line --------------------------------------------------------------------------------------


def test_cli_analyze_a_saved_classifier_on_an_image_folder(tmp_path, capsys, drawn) -> None:
    from convmoe.cli import main

    torch.manual_seed(0)
    model = convmoe.create_model("timm:test_resnet", num_classes=10)
    convmoe.patch(model, targets="layer2.*.conv2", config=MoEConfig(num_experts=4, top_k=1, upcycle_noise_std=0.5))
    folder = convmoe.save_pretrained(model, tmp_path / "model")
    out = tmp_path / "analysis"
    status = main(["analyze", str(folder), f"{FIXTURES}/cifar10_folder", "--split", "test", "--out", str(out),
                   "--images", "2", "--device", "cpu", "--no-progress", "--model-card"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "layer2.0.conv2" in printed
    assert "recommendation" in printed
    payload = json.loads((out / "report.json").read_text())
    assert payload["task"] == "classification"
    assert payload["class_names"][0] == "airplane"
    assert (out / "model_card.md").read_text().startswith("## Routing analysis")
    layers = list(payload["layers"])
    panels = {"heatmap_layer2.0.conv2.png": 1, "routing_map_layer2.0.conv2.png": 4, "heatmaps.png": len(layers),
              "routing_heatmaps.png": len(layers)}  # heatmaps per layer; 2 images x (overlaid, alone)
    for name, count in panels.items():
        _check_png(out / name)
        figure = drawn[out / name]
        assert len(_heatmap_axes(figure) if "heatmap" in name else figure.axes) == count, name


def test_cli_analyze_a_segmenter_on_camvid(tmp_path, capsys) -> None:
    from convmoe.cli import main

    model = patched_segmenter(num_classes=11)
    folder = convmoe.save_pretrained(model, tmp_path / "model")
    out = tmp_path / "analysis"
    # The model's builder is this test module's own function: loading it needs the opt-in.
    status = main(["analyze", str(folder), f"{FIXTURES}/camvid", "--split", "val", "--out", str(out),
                   "--image-size", "32", "48", "--device", "cpu", "--no-progress", "--trust-remote-code"])
    assert status == 0
    payload = json.loads((out / "report.json").read_text())
    assert payload["task"] == "segmentation"
    assert payload["redundancy"]["metric_name"] == "miou"
    layer = payload["layers"]["mid"]
    assert layer["tokens"] == "grid:2x2"
    assert sum(entry["tokens"] for entry in layer["classes"]) <= 2 * 4  # 2 images x 4 tokens, void skipped
    with open(layer["files"]["heatmap_csv"], newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["class", "expert_0", "expert_1", "expert_2", "expert_3"]
    assert all(sum(float(v) for v in row[1:]) == pytest.approx(1.0, abs=1e-5) for row in rows[1:])


def test_cli_analyze_reports_a_folder_with_splits(tmp_path, capsys) -> None:
    from convmoe.cli import main

    folder = convmoe.save_pretrained(patched_segmenter(), tmp_path / "model")
    status = main(["analyze", str(folder), f"{FIXTURES}/cifar10_folder", "--out", str(tmp_path / "a"),
                   "--trust-remote-code"])
    assert status == 2
    assert "pass --split" in capsys.readouterr().err


def test_missing_matplotlib_is_a_clear_import_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'convmoe\[analysis\]'"):
        require_matplotlib()


def test_a_training_config_names_its_dataset_with_loader_settings_and_lists(tmp_path):
    """``convmoe analyze MODEL CONFIG.yaml`` reads ``<split>_dataset`` as the engine does: a node's own
    ``data_loader`` settings are not dataset arguments, and a list of nodes is concatenated."""
    import yaml

    from convmoe.analysis.datasets import load_dataset

    root = str(Path(__file__).parent / "fixtures" / "camvid")
    node = {"_target_": "convmoe.data.CamVidDataset", "root": root, "split": "val", "data_loader": {"batch_size": 2}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"val_dataset": node, "test_dataset": [node, node]}))
    single = load_dataset(path)
    assert single.classes[0] == "sky"
    assert len(load_dataset(path, "test")) == 2 * len(single)
    with pytest.raises(ValueError, match="has no train_dataset section"):
        load_dataset(path, "train")


def test_max_batches_draws_from_the_whole_dataset():
    """With --max-batches, a folder sorted by class still gives every class, not the first class's images."""
    from convmoe.analysis.command import random_sample

    labels = [c for c in range(10) for _ in range(100)]  # class-sorted, as an image folder is
    sample = random_sample(labels, 160)
    assert len(sample) == 160
    assert len(set(sample)) == 10
    assert list(sample) == sorted(sample)  # dataset order kept
    assert list(random_sample(labels, 160)) == list(sample)  # seeded: the same sample every run
    assert random_sample(labels, 5000) is labels
