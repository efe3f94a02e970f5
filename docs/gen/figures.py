"""Write the documentation's figures (PNG) into docs/assets/, with the library's own plotting.

Run by hand from the repository root when the library, the zoo cards or the benchmark results
change, then commit the PNGs (each is kept under 150 kB)::

    python docs/gen/figures.py               # every figure
    python docs/gen/figures.py benchmarks    # only some: tokens, routing, zoo, benchmarks

It needs the ``demo`` and ``docs`` extras (matplotlib, the packaged EfficientNet-Lite0 weights),
runs on a CPU in about a minute and reads nothing from the network:

- ``tokens.png`` (concepts/tokens.md): the routing of one upcycled block of the ImageNet-pretrained
  EfficientNet-Lite0 on the bundled sample image, for pixel, grid:3x3, patch:8 and image tokens.
- ``routing_camvid.png`` and ``routing_camvid_heatmap.png`` (concepts/statistics.md): expert
  utilisation and the class x expert heatmap of the zoo's ``upernet-lite0-moe8-camvid`` on the
  CamVid images of the test fixtures (``tests/fixtures/camvid``, 6 images).
- ``zoo.png`` (zoo.md): each zoo variant's headline metric (test when measured) against its active FLOPs, next to its
  dense twin, mean ± std over seeds, from the model cards' front matter (``zoo/*/README.md``).
- ``benchmarks.png`` (benchmarks.md): MoE block / dense conv time ratios from
  ``benchmarks/results/layer_cpu*.jsonl`` (see ``docs/gen/benchmark_chart.py``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "docs" / "assets"
SAMPLE_IMAGE = ROOT / "convmoe" / "assets" / "chelsea.jpg"
CAMVID = ROOT / "tests" / "fixtures" / "camvid"
CAMVID_VARIANT = ROOT / "zoo" / "upernet-lite0-moe8-camvid"
MAX_BYTES = 150_000
DPI = 80


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(
        f"convmoe_docs_{name}", Path(__file__).with_name(f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _normalised(image) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) ImageNet-normalised float."""
    from convmoe.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    x = torch.as_tensor(image).permute(2, 0, 1).float().div(255).unsqueeze(0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def tokens_figure(path: Path) -> Path:
    """One upcycled block, four granularities: which expert each output position's token went to."""
    import convmoe
    from convmoe.analysis.layers import layer_tokens
    from convmoe.analysis.plotting import display_image, expert_colors, require_matplotlib, save_figure
    from convmoe.analysis.spatial import routing_maps
    from convmoe.data.io import read_image
    from convmoe.pretrained import load_efficientnet_lite0

    plt = require_matplotlib()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    image = _normalised(read_image(SAMPLE_IMAGE))
    target, num_experts = "blocks.2.1.conv_pwl", 4  # stride 8: a 28 x 28 map for a 224 x 224 image
    panels = []
    for spec in ("pixel", "grid:3x3", "patch:8", "image"):
        model = load_efficientnet_lite0()
        torch.manual_seed(0)  # the same router weights for every granularity
        config = convmoe.MoEConfig(num_experts=num_experts, top_k=1, tokens=spec)
        convmoe.patch(model, targets=target, config=config)
        expert_map = routing_maps(model, image)[target][0]
        block = dict(model.named_modules())[target]
        tokens = layer_tokens(block, tuple(expert_map.shape))
        panels.append((spec, expert_map, tokens))
    colors = expert_colors(num_experts)
    cmap = ListedColormap(colors)
    H, W = image.shape[-2:]
    figure, axes_row = plt.subplots(
        1, len(panels), figsize=(2.3 * len(panels) + 1.0, 2.7), layout="constrained"
    )
    shown = display_image(image[0]).numpy()
    for axes, (spec, expert_map, tokens) in zip(axes_row, panels, strict=True):
        h, w = expert_map.shape
        axes.imshow(shown, extent=(0, W, H, 0))
        axes.imshow(
            expert_map.numpy(),
            cmap=cmap,
            vmin=-0.5,
            vmax=num_experts - 0.5,
            alpha=0.5,
            extent=(0, W, H, 0),
            interpolation="nearest",
        )
        if len(tokens.row_edges) - 1 < h:  # region tokens: draw their boundaries
            for edge in tokens.row_edges[1:-1]:
                axes.axhline(edge * H / h, color="white", linewidth=1.0)
            for edge in tokens.col_edges[1:-1]:
                axes.axvline(edge * W / w, color="white", linewidth=1.0)
        count = tokens.num_tokens
        axes.set_title(f'"{spec}": {count} token{"s" if count != 1 else ""}', fontsize=9)
        axes.set_xticks([])
        axes.set_yticks([])
    handles = [Patch(color=colors[e], label=f"expert {e}") for e in range(num_experts)]
    figure.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    figure.suptitle(
        f"Top expert per token: {target} of EfficientNet-Lite0 (28 x 28 map), upcycled, "
        f"{num_experts} experts, top-1, untrained router",
        fontsize=9,
    )
    return save_figure(figure, path, dpi=DPI)


def routing_figures(bars: Path, heatmap: Path) -> list[Path]:
    """Utilisation and class x expert shares of the zoo's CamVid variant on the fixture images."""
    import convmoe
    from convmoe.analysis.collect import collect_routing
    from convmoe.analysis.heatmap import plot_heatmap
    from convmoe.analysis.plotting import expert_colors, require_matplotlib, save_figure
    from convmoe.data import CAMVID_CLASSES, CAMVID_IGNORE_INDEX, CamVidDataset
    from convmoe.data.transforms import Normalize, PadIfNeeded, Resize

    plt = require_matplotlib()
    model = convmoe.from_pretrained(str(CAMVID_VARIANT)).float().eval()
    # The card's preprocessing: Resize(180, 240), PadIfNeeded(192, 256, fill_mask=11), Normalize.
    augment = [Resize(180, 240), PadIfNeeded(192, 256, fill_mask=CAMVID_IGNORE_INDEX), Normalize()]
    samples = [CamVidDataset(CAMVID, split=split, augmentation_list=augment) for split in ("train", "val")]
    batches = [
        {
            "image": torch.stack([d[i]["image"] for i in range(len(d))]),
            "mask": torch.stack([d[i]["mask"] for i in range(len(d))]),
        }
        for d in samples
    ]
    images = sum(len(d) for d in samples)
    collection = collect_routing(
        model,
        batches,
        ignore_index=CAMVID_IGNORE_INDEX,
        num_classes=len(CAMVID_CLASSES),
        class_names=list(CAMVID_CLASSES),
    )
    name, layer = next(iter(collection.layers.items()))
    usage = (layer.load / layer.load.sum()).tolist()
    E = layer.num_experts
    figure, axes = plt.subplots(figsize=(5.2, 2.6), layout="constrained")
    axes.bar(range(E), usage, color=expert_colors(E))
    axes.axhline(1 / E, color="black", linestyle="--", linewidth=1, label=f"balanced (1/E = {1 / E:.3f})")
    axes.set_xticks(range(E), [f"{e}" for e in range(E)])
    axes.set_xlabel("expert")
    axes.set_ylabel("share of dispatched slots")
    axes.set_title(
        f"{CAMVID_VARIANT.name}: {name}\nutilisation on {images} CamVid images "
        f"(top-{layer.top_k} of {E}, {layer.tokens_spec} tokens)",
        fontsize=9,
    )
    axes.legend(fontsize=8, frameon=False)
    written = [save_figure(figure, bars, dpi=DPI)]
    title = f"{name}: share of each class's pixels per expert ({images} CamVid images)"
    written.append(
        plot_heatmap(
            heatmap,
            layer.class_shares().float(),
            list(CAMVID_CLASSES),
            title=title,
            class_tokens=layer.class_tokens(),
        )
    )
    return written


def zoo_figure(path: Path) -> Path:
    """Headline metric against active FLOPs, per zoo variant and its dense twin (mean ± std over seeds)."""
    import yaml

    from convmoe.analysis.plotting import require_matplotlib, save_figure
    from convmoe.zoo.card_format import headline_metric

    plt = require_matplotlib()
    cards = []
    for readme in sorted((ROOT / "zoo").glob("*/README.md")):
        front = readme.read_text(encoding="utf-8").split("---")[1]
        meta = yaml.safe_load(front)["convmoe"]
        if "moe_blocks" in meta:  # a dense variant's numbers are drawn as its MoE variants' dense twin
            cards.append((readme.parent.name, meta))
    datasets = sorted({card["dataset"] for _, card in cards})
    figure, axes_row = plt.subplots(
        1, len(datasets), figsize=(4.6 * len(datasets), 3.6), squeeze=False, layout="constrained"
    )
    markers = iter("osD^v<>")
    for axes, dataset in zip(axes_row[0], datasets, strict=True):
        twin_markers = iter("sPX*")
        group = [(name, card) for name, card in cards if card["dataset"] == dataset]
        flops = [c["active_flops"] for _, c in group] + [c["dense_twin"]["active_flops"] for _, c in group]
        unit, divisor = ("GFLOPs", 1e9) if max(flops) >= 1e9 else ("MFLOPs", 1e6)
        twins_drawn: set[str] = set()
        metrics = set()
        for name, card in group:
            metric = headline_metric(card)
            metrics.add(metric)
            scale = 100.0 if card["metrics"][metric] <= 1.0 else 1.0  # mIoU 0..1 -> percent
            twin = card["dense_twin"]
            twin_recipe = Path(twin["commands"]["train"][0].split()[2]).stem  # "convmoe train RECIPE ..."
            twin_name = card.get("dense_model_id") or f"dense twin: {twin_recipe}"
            if twin_name not in twins_drawn:  # MoE variants of one dense recipe share their twin's point
                twin_std = (twin.get("metrics_std") or {}).get(metric)
                axes.errorbar(
                    twin["active_flops"] / divisor,
                    twin["metrics"][metric] * scale,
                    yerr=None if twin_std is None else twin_std * scale,
                    fmt=next(twin_markers),
                    color="black",
                    capsize=4,
                    label=f"{twin_name} ({len(twin['seeds'])} seeds)",
                )
                twins_drawn.add(twin_name)
            std = (card.get("metrics_std") or {}).get(metric)  # None for a single seed: no error bar
            seeds = len(card["seeds"])
            axes.errorbar(
                card["active_flops"] / divisor,
                card["metrics"][metric] * scale,
                yerr=None if std is None else std * scale,
                fmt=next(markers),
                capsize=4,
                label=f"{name} ({seeds} seed{'s' if seeds > 1 else ''})",
            )
        shape = "x".join(str(s) for s in group[0][1]["flops"]["input"][1:])
        axes.set_xlabel(f"active {unit} per image ({shape})")
        axes.set_ylabel(f"{' / '.join(sorted(metrics))} (%)")
        axes.set_title(dataset, fontsize=10)
        axes.legend(fontsize=6.5, frameon=False, loc="best")
        axes.margins(x=0.3, y=0.35)
    figure.suptitle(
        "Model zoo: metric vs active FLOPs (1 multiply-add = 1 FLOP), MoE variants and dense twins, "
        "mean ± std over seeds where a card has several",
        fontsize=9,
    )
    return save_figure(figure, path, dpi=DPI)


FIGURES = {
    "tokens": lambda: [tokens_figure(ASSETS / "tokens.png")],
    "routing": lambda: routing_figures(ASSETS / "routing_camvid.png", ASSETS / "routing_camvid_heatmap.png"),
    "zoo": lambda: [zoo_figure(ASSETS / "zoo.png")],
    "benchmarks": lambda: [_sibling("benchmark_chart").write_chart(ASSETS / "benchmarks.png")],
}


def shrink(path: Path) -> Path:
    """Re-save a PNG over the size limit with a 256-colour palette (a photograph makes it large)."""
    from PIL import Image

    if path.stat().st_size <= MAX_BYTES:
        return path
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    small.save(path, optimize=True)
    return path


def main(names: list[str]) -> None:
    unknown = sorted(set(names) - set(FIGURES))
    if unknown:
        raise SystemExit(f"unknown figure(s) {unknown}; choose from {sorted(FIGURES)}")
    for name in names or list(FIGURES):
        for path in FIGURES[name]():
            size = shrink(path).stat().st_size
            print(f"{path.relative_to(ROOT)}: {size / 1000:.0f} kB")
            if size > MAX_BYTES:
                raise SystemExit(f"{path} is {size} bytes, over the {MAX_BYTES} bytes a docs figure may take")


if __name__ == "__main__":
    main(sys.argv[1:])
