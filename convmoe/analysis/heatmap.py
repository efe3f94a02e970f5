"""Expert x class heatmaps: the share of each class's tokens routed to each expert, as CSV and PNG."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from convmoe.analysis.plotting import require_matplotlib, save_figure
from convmoe.formatting import format_count


def class_order(shares: Tensor) -> list[int]:
    """Classes ordered to show structure: grouped by dominant expert, most concentrated first in a group.

    Classes whose dominant expert is expert 0 come first, then expert 1, and so on, so a specialised
    layer shows a staircase; within a group the class with the largest dominant share leads.
    Classes without tokens (all-zero rows) are left out.

    Args:
        shares: Share of each class's tokens per expert, (C, E).

    Example:
        >>> class_order(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.0, 0.0], [0.6, 0.4]]))
        [1, 3, 0]
    """
    present = [c for c in range(shares.shape[0]) if float(shares[c].sum()) > 0]
    dominant = shares.argmax(dim=1)
    peak = shares.max(dim=1).values
    return sorted(present, key=lambda c: (int(dominant[c]), -float(peak[c]), c))


def write_heatmap_csv(path: str | Path, shares: Tensor, class_names: Sequence[str], order: Sequence[int] | None = None
                      ) -> Path:
    """Write the class x expert shares as CSV: header ``class,expert_0,...,expert_{E-1}``, one row per class.

    Each row is one class's distribution over experts and sums to 1 (up to the 6-decimal rounding).

    Args:
        path: The CSV file.
        shares: (C, E) shares, rows summing to 1.
        class_names: A name per class (C of them).
        order: Rows to write, in order (default :func:`class_order`).

    Example:
        >>> import tempfile, os
        >>> path = write_heatmap_csv(os.path.join(tempfile.mkdtemp(), "h.csv"), torch.tensor([[0.25, 0.75]]), ["cat"])
        >>> path.read_text().splitlines()
        ['class,expert_0,expert_1', 'cat,0.250000,0.750000']
    """
    if len(class_names) != shares.shape[0]:
        raise ValueError(f"{len(class_names)} class names for {shares.shape[0]} classes; give one name per row.")
    order = class_order(shares) if order is None else list(order)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", *[f"expert_{e}" for e in range(shares.shape[1])]])
        for c in order:
            writer.writerow([class_names[c], *[f"{float(v):.6f}" for v in shares[c]]])
    return path


def _row_labels(class_names: Sequence[str], order: Sequence[int], class_tokens: Tensor | None) -> list[str]:
    if class_tokens is None:
        return [str(class_names[c]) for c in order]
    return [f"{class_names[c]} ({format_count(float(class_tokens[c]))})" for c in order]


def draw_heatmap(axes: object, shares: Tensor, class_names: Sequence[str], order: Sequence[int], title: str,
                 annotate: bool | None = None, class_tokens: Tensor | None = None) -> object:
    """Draw ordered shares on matplotlib ``axes`` (rows: classes, columns: experts); returns the image.

    Rows are labelled with the class name, and its token count in brackets when ``class_tokens`` is given.

    Example:
        >>> plt = require_matplotlib()
        >>> figure, axes = plt.subplots()
        >>> _ = draw_heatmap(axes, torch.eye(2), ["a", "b"], [0, 1], "t", class_tokens=torch.tensor([5.0, 7.0]))
        >>> [label.get_text() for label in axes.get_yticklabels()]
        ['a (5)', 'b (7)']
        >>> plt.close(figure)
    """
    rows = shares[list(order)].float().numpy() if order else torch.zeros(0, shares.shape[1]).numpy()
    image = axes.imshow(rows, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    E = shares.shape[1]
    axes.set_xticks(range(E))
    axes.set_xticklabels([str(e) for e in range(E)], fontsize=7 if E > 16 else 9)
    axes.set_yticks(range(len(order)))
    axes.set_yticklabels(_row_labels(class_names, order, class_tokens), fontsize=7 if len(order) > 20 else 9)
    axes.set_xlabel("expert")
    axes.set_title(title, fontsize=10)
    if annotate is None:
        annotate = len(order) * E <= 160
    if annotate:
        for i in range(rows.shape[0]):
            for e in range(E):
                value = rows[i, e]
                axes.text(e, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color="black" if value > 0.6 else "white")
    return image


def plot_heatmap(path: str | Path, shares: Tensor, class_names: Sequence[str], order: Sequence[int] | None = None,
                 title: str = "", class_tokens: Tensor | None = None) -> Path:
    """Save the class x expert heatmap of one layer as a PNG (classes ordered by :func:`class_order`).

    Args:
        path: The PNG file.
        shares: (C, E) shares, rows summing to 1.
        class_names: A name per class.
        order: Rows to draw, in order (default :func:`class_order`).
        title: Figure title (e.g. the layer name and its specialisation score).
        class_tokens: Tokens per class, (C,), shown next to the class names.

    Example:
        >>> import tempfile, os
        >>> path = plot_heatmap(os.path.join(tempfile.mkdtemp(), "h.png"), torch.eye(3), ["a", "b", "c"])
        >>> path.stat().st_size > 0
        True
    """
    plt = require_matplotlib()
    order = class_order(shares) if order is None else list(order)
    E = shares.shape[1]
    figure, axes = plt.subplots(figsize=(2.0 + 0.45 * E, 1.2 + 0.3 * max(len(order), 2)), layout="constrained")
    image = draw_heatmap(axes, shares, class_names, order, title, class_tokens=class_tokens)
    figure.colorbar(image, ax=axes, label="share of the class's tokens")
    return save_figure(figure, path)


def plot_heatmap_grid(path: str | Path, panels: Sequence[tuple[str, Tensor] | tuple[str, Tensor, Tensor]],
                      class_names: Sequence[str]) -> Path:
    """Save the heatmaps of several layers side by side in one PNG (e.g. for a model card).

    Args:
        path: The PNG file.
        panels: (title, (C, E) shares) or (title, shares, (C,) tokens per class) per layer.
        class_names: A name per class.

    Example:
        >>> import tempfile, os
        >>> path = plot_heatmap_grid(os.path.join(tempfile.mkdtemp(), "g.png"),
        ...                          [("a", torch.eye(2)), ("b", torch.full((2, 2), 0.5))], ["x", "y"])
        >>> path.exists()
        True
    """
    if not panels:
        raise ValueError("plot_heatmap_grid needs at least one (title, shares) panel.")
    plt = require_matplotlib()
    rows = max(len(class_order(panel[1])) for panel in panels)
    widths = [max(panel[1].shape[1], 2) for panel in panels]
    longest = max((len(str(n)) for n in class_names), default=1) + (7 if any(len(p) > 2 for p in panels) else 0)
    label = 0.075 * longest + 0.3  # inches of y tick labels
    figure, axes_list = plt.subplots(1, len(panels), squeeze=False, layout="constrained",
                                     gridspec_kw={"width_ratios": widths},
                                     figsize=(len(panels) * label + 0.45 * sum(widths) + 1.2, 1.4 + 0.3 * max(rows, 2)))
    image = None
    for axes, panel in zip(axes_list[0], panels, strict=True):
        title, shares = panel[0], panel[1]
        tokens = panel[2] if len(panel) > 2 else None
        image = draw_heatmap(axes, shares, class_names, class_order(shares), title, class_tokens=tokens)
    figure.colorbar(image, ax=list(axes_list[0]), label="share of the class's tokens")
    return save_figure(figure, path)
