"""Spatial routing maps: the expert chosen for every token, on the layer's output grid and over the image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from convmoe.analysis.collect import routing_assignment
from convmoe.analysis.layers import OutputSizeRecorder, layer_tokens, moe_layers
from convmoe.analysis.plotting import (
    display_image,
    expert_colors,
    require_matplotlib,
    safe_filename,
    save_figure,
)

DROPPED = -1


@torch.no_grad()
def routing_maps(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    """The top expert of every output position, per MoE layer, (B, H_out, W_out) int64; ``DROPPED`` (-1) where
    the token reached no expert.

    The top expert is the one with the largest combine weight. The model runs once in eval mode
    (its mode is restored afterwards).

    Args:
        model: A model with MoE blocks.
        images: Inputs (B, C, H, W) as the model takes them.

    Example:
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(3, 4, 3, stride=2, num_experts=2, tokens="grid:2x2"))
        >>> maps = routing_maps(model, torch.randn(1, 3, 9, 9))
        >>> maps["0"].shape, maps["0"].unique().numel() <= 4
        (torch.Size([1, 4, 4]), True)
    """
    was_training = model.training
    device = next((p.device for p in model.parameters()), images.device)
    model.eval()
    try:
        with OutputSizeRecorder(model) as recorder:
            model(images.to(device))
    finally:
        model.train(was_training)
    maps = {}
    for name, block in moe_layers(model):
        routing = block.last_routing
        if routing is None or name not in recorder.sizes:
            continue
        tokens = layer_tokens(block, recorder.sizes[name])
        assignment = routing_assignment(routing)
        top = torch.where(assignment.sum(dim=-1) > 0, assignment.argmax(dim=-1), DROPPED)  # (B, N)
        height, width = recorder.sizes[name]
        positions = top[:, tokens.token_map.to(top.device)]  # (B, H_out * W_out)
        maps[name] = positions.reshape(-1, height, width).cpu()
    return maps


def _edges_to_pixels(edges: Sequence[int], out_size: int, image_size: int) -> list[float]:
    return [e * image_size / out_size for e in edges]


def plot_routing_map(path: str | Path, images: Tensor, expert_map: Tensor, num_experts: int, title: str = "",
                     row_edges: Sequence[int] | None = None, col_edges: Sequence[int] | None = None,
                     alpha: float = 0.55, captions: Sequence[str] | None = None) -> Path:
    """Save one layer's routing of a few images as a PNG: one column per image, the experts overlaid on it
    (top row) and alone (bottom row).

    The expert map is stretched over the image (nearest), each expert in its own colour (legend on the
    right), dropped tokens in grey; token boundaries are drawn when tokens are regions.

    Args:
        path: The PNG file.
        images: Inputs (B, C, H, W) (normalised inputs are min-max scaled for display).
        expert_map: Top expert per output position, (B, H_out, W_out), -1 for dropped.
        num_experts: E (fixes the colours).
        title: Figure title.
        row_edges: Token row boundaries on the output grid (drawn as lines), or None.
        col_edges: Token column boundaries, or None.
        alpha: Opacity of the expert colours over the image.
        captions: A caption per image (e.g. its label).

    Example:
        >>> import tempfile, os
        >>> path = plot_routing_map(os.path.join(tempfile.mkdtemp(), "m.png"), torch.rand(2, 3, 8, 8),
        ...                         torch.randint(0, 3, (2, 4, 4)), num_experts=3)
        >>> path.exists()
        True
    """
    plt = require_matplotlib()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    B = images.shape[0]
    if expert_map.shape[0] != B:
        raise ValueError(f"{B} images but expert maps for {expert_map.shape[0]}; pass the maps of these images.")
    colors = expert_colors(num_experts)
    grey = (0.55, 0.55, 0.55, 1.0)
    cmap = ListedColormap([grey, *colors])  # index 0: dropped
    H, W = images.shape[-2:]
    H_out, W_out = expert_map.shape[-2:]
    panel = 2.6
    figure, axes_grid = plt.subplots(2, B, squeeze=False, layout="constrained",
                                     figsize=(panel * B * max(W / H, 0.5) + 1.3, 2 * panel + 0.5))
    for b in range(B):
        codes = (expert_map[b] + 1).numpy()
        overlay, alone = axes_grid[0][b], axes_grid[1][b]
        overlay.imshow(display_image(images[b]).numpy(), extent=(0, W, H, 0), interpolation="bilinear")
        overlay.imshow(codes, cmap=cmap, vmin=0, vmax=num_experts, alpha=alpha, extent=(0, W, H, 0),
                       interpolation="nearest")
        alone.imshow(codes, cmap=cmap, vmin=0, vmax=num_experts, extent=(0, W, H, 0), interpolation="nearest")
        for axes in (overlay, alone):
            if row_edges is not None and 2 < len(row_edges) <= H_out:
                for y in _edges_to_pixels(row_edges[1:-1], H_out, H):
                    axes.axhline(y, color="white", linewidth=0.8)
            if col_edges is not None and 2 < len(col_edges) <= W_out:
                for x in _edges_to_pixels(col_edges[1:-1], W_out, W):
                    axes.axvline(x, color="white", linewidth=0.8)
            axes.set_xticks([])
            axes.set_yticks([])
        if captions is not None:
            overlay.set_title(str(captions[b]), fontsize=9)
    axes_grid[0][0].set_ylabel("image + experts", fontsize=9)
    axes_grid[1][0].set_ylabel("experts", fontsize=9)
    shown = sorted({int(e) for e in expert_map.unique()})
    handles = [Patch(color=colors[e], label=f"expert {e}") for e in shown if e >= 0]
    if DROPPED in shown:
        handles.append(Patch(color=grey, label="dropped"))
    figure.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)


def plot_routing_maps(model: nn.Module, images: Tensor, folder: str | Path, captions: Sequence[str] | None = None,
                      prefix: str = "routing_map_") -> dict[str, Path]:
    """Routing maps of ``images`` for every MoE layer: one PNG per layer, ``<prefix><layer>.png``.

    Args:
        model: A model with MoE blocks.
        images: Inputs (B, C, H, W); keep B small (each image is a panel), e.g. 4.
        folder: Where to write.
        captions: A caption per image.
        prefix: File name prefix.

    Returns:
        Layer name -> PNG path.

    Example:
        >>> import tempfile
        >>> from convmoe import MoEConv2d
        >>> model = nn.Sequential(MoEConv2d(3, 4, 3, padding=1, num_experts=2, tokens="grid:2x2"))
        >>> files = plot_routing_maps(model, torch.rand(2, 3, 8, 8), tempfile.mkdtemp())
        >>> [path.name for path in files.values()]
        ['routing_map_0.png']
    """
    maps = routing_maps(model, images)
    files = {}
    blocks = dict(moe_layers(model))
    for name, expert_map in maps.items():
        block = blocks[name]
        tokens = layer_tokens(block, tuple(expert_map.shape[-2:]))
        title = f"{name}: top expert per token ({block.tokens}, {block.config.num_experts} experts, top-{block.config.top_k})"
        files[name] = plot_routing_map(Path(folder) / f"{prefix}{safe_filename(name)}.png", images.cpu(), expert_map,
                                       block.config.num_experts, title, tokens.row_edges, tokens.col_edges,
                                       captions=captions)
    return files
