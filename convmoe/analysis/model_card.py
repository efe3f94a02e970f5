"""The routing section of a model card: the specialisation and balance table and the expert x class heatmaps."""

from __future__ import annotations

from pathlib import Path

from convmoe.analysis.heatmap import plot_heatmap_grid
from convmoe.analysis.report import AnalysisReport, fill_class_names
from convmoe.formatting import format_count

CARD_IMAGE_NAME = "routing_heatmaps.png"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def model_card_section(report: AnalysisReport, folder: str | Path | None = None, image_name: str = CARD_IMAGE_NAME,
                       title: str = "Routing analysis", heading_level: int = 2) -> str:
    """Markdown for a model card: what was measured, a table per MoE layer, the heatmaps image, the redundancy.

    With ``folder`` (the model card's folder, e.g. the Hub repo being uploaded), the heatmaps of all
    layers are drawn into ``folder/image_name`` and the markdown links to it by that relative name.

    Args:
        report: An :class:`~convmoe.analysis.report.AnalysisReport` (from ``analyze``).
        folder: Where to write the image; None links ``image_name`` without writing it.
        image_name: File name of the image, relative to the card.
        title: The section heading.
        heading_level: Markdown heading level of the section.

    Returns:
        The markdown section.

    Example:
        >>> import torch
        >>> from convmoe.analysis.balance import balance_figures
        >>> from convmoe.analysis.report import LayerAnalysis
        >>> from convmoe.analysis.specialization import specialization_score
        >>> layer = LayerAnalysis("layer4.0.conv2", 2, 1, "pixel", specialization_score(torch.eye(2)),
        ...                       balance_figures(torch.ones(2), 0, 2), None, torch.eye(2), torch.ones(2))
        >>> card = model_card_section(AnalysisReport("classification", 2, ["cat", "dog"], {"a": layer}))
        >>> card.splitlines()[0], "![" in card
        ('## Routing analysis', True)
    """
    hashes = "#" * heading_level
    data = f" on {report.data}" if report.data else ""
    parts = [
        f"{hashes} {title}",
        "",
        (f"Measured{data}: {report.images} images ({report.task}, {len(report.class_names)} classes). "
         "*Specialisation* is the normalised mutual information between a token's class and its expert, "
         "2 I(C; E) / (H(C) + H(E)): 1 when class and expert determine each other, 0 when routing ignores the "
         "class or collapses onto one expert. *Util. entropy* is the entropy of the experts' load over log E "
         "(1 = balanced); *imbalance* is the busiest expert's load over the mean (1 = balanced, E = collapse)."),
        "",
    ]
    rows = []
    for name, layer in report.layers.items():
        s, b = layer.specialization, layer.balance
        rows.append([f"`{name}`", f"{layer.num_experts} (top-{layer.top_k}, {layer.tokens})", f"{s.score:.2f}",
                     f"{s.mutual_information_bits:.3f}", f"{b.utilization_entropy:.3f}", f"{b.imbalance:.2f}",
                     str(len(b.dead_experts)), f"{b.dropped_rate:.1%}"])
    parts.append(_markdown_table(["layer", "experts", "specialisation", "MI (bits)", "util. entropy", "imbalance",
                                  "dead experts", "dropped"], rows))
    panels = [(f"{name}\nspecialisation {layer.specialization.score:.2f}", layer.class_shares, layer.class_tokens)
              for name, layer in report.layers.items() if float(layer.class_tokens.sum()) > 0]
    if folder is not None and panels:
        rows_needed = max(panel[1].shape[0] for panel in panels)
        plot_heatmap_grid(Path(folder) / image_name, panels, fill_class_names(report.class_names, rows_needed))
    if panels:
        legend = ("Share of each class's tokens routed to each expert (rows: classes grouped by their dominant expert; "
                  "tokens per class in brackets):")
        parts += ["", legend, "", f"![Expert x class routing heatmaps]({image_name})"]
    redundancy = report.redundancy
    if redundancy is not None and redundancy.layers:
        intro = (f"Folding one layer back into a dense conv (`convmoe.unpatch`, experts by {redundancy.how}); "
                 f"baseline {redundancy.metric_name} {redundancy.baseline:.4g}:")
        parts += ["", intro, ""]
        rows = []
        for layer in redundancy.layers:
            change = f"{layer.change:+.4g}" if layer.change is not None else "n/a"
            saved = format_count(layer.macs_saved)
            rows.append([f"`{layer.name}`", change, saved, layer.recommendation])
        parts.append(_markdown_table(["layer", f"{redundancy.metric_name} change", "MACs saved / image",
                                      "recommendation"], rows))
        parts += ["", redundancy.recommendation()]
    return "\n".join(parts) + "\n"
