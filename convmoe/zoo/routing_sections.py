"""The routing sections of an MoE variant's card: the routing analysis of the published model on the val
loader, and the routing statistics over training from the run's ``routing_history.json``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convmoe.analysis import analyze, model_card_section
from convmoe.analysis.tracking import load_history, plot_tracking
from convmoe.engine.config import instantiate
from convmoe.engine.evaluate import loss_ignore_index
from convmoe.zoo.runs import RunRecord

CURVES_NAME = "routing_curves.png"


def _ignore_index(config: dict[str, Any]) -> int | None:
    if "ignore_index" in config:
        return config["ignore_index"]
    return loss_ignore_index(instantiate(config["loss"])) if config.get("loss") else None


def routing_analysis(model: nn.Module, loader: Any, config: dict[str, Any], folder: Path, device: torch.device,
                     max_batches: int | None, model_name: str, data_name: str) -> str | None:
    """The card's routing-analysis section (its heatmap written to ``folder``); None without matplotlib."""
    try:
        report = analyze(model.to(device), loader, None, class_names=getattr(loader.dataset, "classes", None),
                         ignore_index=_ignore_index(config), redundancy=False, device=device, max_batches=max_batches,
                         model_name=model_name, data_name=data_name)
        return model_card_section(report, folder)
    except ImportError as error:  # the heatmap needs matplotlib
        warnings.warn(f"routing analysis left out of the card: {error}", UserWarning, stacklevel=3)
        return None


def training_curves(run: RunRecord, folder: Path) -> str | None:
    """The card's "over training" paragraph and its image, from the run's routing history (the engine's
    ``routing_history.json``); None when the run has none or matplotlib is missing."""
    path = run.run_dir / "routing_history.json"
    if not path.is_file():
        return None
    history = [row for row in load_history(path) if row["epoch"] <= run.best_epoch]
    if not history or not any(row["layers"] for row in history):
        return None
    try:
        plot_tracking(history, folder / CURVES_NAME)
    except ImportError:
        return None
    last = history[-1]
    rows = [f"| `{name}` | {stats['specialization']:.3f} | {stats['utilization_entropy']:.3f} | "
            f"{stats['imbalance']:.2f} | {int(stats['dead_experts'])} | {100 * stats['dropped_rate']:.1f}% |"
            for name, stats in last["layers"].items()]
    return "\n".join([
        "### Over training", "",
        (f"The same statistics on the training batches of seed {run.seed}, epoch by epoch up to the published epoch "
         f"{run.best_epoch} (the engine's `routing_history.json`; sampled batches, with router noise and expert "
         "dropout as the model trained):"), "",
        f"![Routing statistics over training]({CURVES_NAME})", "",
        f"At epoch {last['epoch']}:", "",
        "| layer | specialisation | util. entropy | imbalance | dead experts | dropped |",
        "|---|---|---|---|---|---|", *rows])
