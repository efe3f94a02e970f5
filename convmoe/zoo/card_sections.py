"""The sections of a model card's body, each rendered from the ``convmoe:`` metadata block alone:
results (with the dense twin and every seed), cost, the commands that reproduce it, limitations, citation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from convmoe.formatting import format_count
from convmoe.zoo.card_format import (
    comparison_sentence,
    format_metric,
    format_ms,
    markdown_table,
    mb,
    metric_label,
    seeds_text,
)
from convmoe.zoo.datasets import get_dataset_info

HELD_OUT_NOTE = " (training images set aside before training: the model never learned from them)"


def results_section(meta: Mapping[str, Any]) -> list[str]:
    """``## Results``: the variant against its dense twin, per seed, re-evaluated, per class."""
    twin = meta.get("dense_twin")
    names = list(meta["metrics"])
    latency = meta.get("latency") or {}
    labels = [metric_label(n, meta["eval_split"]) for n in names]
    header = ["model", "seeds", *labels, "params", "active FLOPs", "latency"]
    rows = [["**this variant**", seeds_text(meta["seeds"]),
             *[format_metric(n, meta["metrics"][n], meta["metrics_std"].get(n)) for n in names],
             format_count(meta["params"]), format_count(meta["active_flops"]), format_ms(latency.get("ms"))]]
    if twin:
        rows.append(["dense twin", seeds_text(twin["seeds"]),
                     *[format_metric(n, twin["metrics"].get(n), twin["metrics_std"].get(n)) for n in names],
                     format_count(twin["params"]), format_count(twin["active_flops"]),
                     format_ms(latency.get("dense_twin_ms"))])
    lines = [
        "## Results",
        "",
        (f"Measured on the **{meta['eval_split']}** split of {get_dataset_info(meta['dataset']).name}"
         f"{HELD_OUT_NOTE if meta['eval_split'] == 'held-out' else ''}; each run's best "
         f"epoch was chosen on {metric_label(meta['monitor'], meta['eval_split'])}. Cells show the mean ± sample standard deviation "
         "(n - 1) over seeds; one seed has no spread. FLOPs and latency are per image (see Cost)."),
        "",
        *markdown_table(header, rows),
        "",
        *([verdict, ""] if (verdict := comparison_sentence(meta)) else []),
        "Per seed (best epoch of each run):",
        "",
    ]
    seed_rows = [["this variant", str(run["seed"]), str(run["epoch"]),
                  *[format_metric(n, run["metrics"].get(n)) for n in names]] for run in meta["runs"]]
    seed_rows += [["dense twin", str(run["seed"]), str(run["epoch"]),
                   *[format_metric(n, run["metrics"].get(n)) for n in names]] for run in (twin or {}).get("runs", [])]
    lines += markdown_table(["model", "seed", "epoch", *labels], seed_rows)
    published = next(run for run in meta["runs"] if run["seed"] == meta["published_seed"])
    weights = meta["weights"]
    reevaluated = ", ".join(f"{metric_label(n, meta['eval_split'])} {format_metric(n, v)}"
                            for n, v in meta["reevaluated"].items())
    lines += ["", (f"The published weights are the best checkpoint of seed {meta['published_seed']} "
              f"({metric_label(meta['monitor'], meta['eval_split'])} {format_metric(meta['monitor'], published['metrics'].get(meta['monitor']))}). Evaluated again from "
              f"the published {weights['dtype']} files with the eval command below: {reevaluated}.")]
    classes = meta.get("per_class_iou")
    if classes:
        twin_classes = (twin or {}).get("per_class_iou") or {}
        header = ["class", "this variant", *(["dense twin"] if twin_classes else [])]
        rows = [[name, format_metric("iou", value), *([format_metric("iou", twin_classes.get(name))]
                                                     if twin_classes else [])] for name, value in classes.items()]
        lines += ["", f"Per-class IoU on the {meta['eval_split']} split (mean over seeds):", "", *markdown_table(header, rows)]
    return lines


def cost_section(meta: Mapping[str, Any]) -> list[str]:
    """``## Cost``: parameters, active FLOPs, latency, weights."""
    twin = meta.get("dense_twin")
    flops = meta["flops"]
    shape = "x".join(map(str, flops["input"]))
    lines = ["## Cost", ""]
    if "moe_blocks" not in meta:  # a dense variant: it is its own dense equivalent
        lines += [f"- Parameters: {format_count(meta['params'])}.",
                  f"- FLOPs per image at input {shape}: {format_count(meta['active_flops'])}.",
                  f"  Counted with {flops['method']}.",
                  *cost_latency_and_weights(meta)]
        return lines
    params = f"- Parameters: {format_count(meta['params'])} (dense equivalent: {format_count(meta['dense_params'])}"
    lines.append(params + (f"; dense twin: {format_count(twin['params'])})." if twin else ")."))
    flop_line = (f"- Active FLOPs per image at input {shape}: {format_count(meta['active_flops'])} (dense "
                 f"equivalent: {format_count(meta['dense_flops'])}")
    if twin:
        flop_line += f"; dense twin: {format_count(twin['active_flops'])}"
    flop_line += ")"
    executed = meta.get("executed_flops")
    if executed is not None and executed != meta["active_flops"]:
        flop_line += f"; executed as the dispatch paths ran: {format_count(executed)}"
    if flops.get("block_ratio") is not None:
        flop_line += f"; the MoE blocks cost {flops['block_ratio']:.2f}x the convs they replace"
    lines += [flop_line + ".", f"  Counted with {flops['method']}.", *cost_latency_and_weights(meta)]
    return lines


def cost_latency_and_weights(meta: Mapping[str, Any]) -> list[str]:
    """The latency and weights lines of ``## Cost``."""
    lines = []
    latency = meta.get("latency")
    if latency:
        text = (f"- Latency: median of {latency['reps']} forward passes (batch {latency['input'][0]}, input "
                f"{'x'.join(map(str, latency['input']))}, float32, eager PyTorch {latency['torch']}) after "
                f"{latency['warmup']} warm-up passes on {latency['device']}: {format_ms(latency['ms'])}")
        if latency.get("dense_twin_ms"):
            text += (f"; dense twin {format_ms(latency['dense_twin_ms'])} "
                     f"({latency['ms'] / latency['dense_twin_ms']:.2f}x), timed round-robin in the same process")
        lines.append(text + ".")
    else:
        lines.append("- Latency: not measured.")
    weights = meta["weights"]
    lines.append(f"- Weights: `model.safetensors`, {weights['dtype']}, {mb(weights['bytes'])}, sha256 "
                 f"`{weights['sha256']}`.")
    return lines


def reproduce_section(meta: Mapping[str, Any]) -> list[str]:
    """``## Reproduce``: the train and eval commands."""
    commands = meta["commands"]
    info = get_dataset_info(meta["dataset"])
    lines = ["## Reproduce", "", f"Data: {info.download}", "", "```bash", info.prepare, "```", "",
             "Train (one command per seed; `convmoe` is this library's command line):", "", "```bash",
             *commands["train"], "```"]
    twin = meta.get("dense_twin")
    if twin:
        lines += ["", "The dense twin:", "", "```bash", *twin["commands"]["train"], "```"]
    lines += ["", f"Evaluate the published weights on the {meta['eval_split']} split:", "", "```bash", commands["eval"],
              "```"]
    if commands.get("eval_test"):
        lines += ["", "and on the test split:", "", "```bash", commands["eval_test"], "```"]
    if meta.get("preprocessing"):
        lines += ["", "Inputs are prepared as the recipe's `val_dataset` does: "
                  + " -> ".join(f"`{step}`" for step in meta["preprocessing"]) + "."]
    return lines


def limitations_section(meta: Mapping[str, Any]) -> list[str]:
    """``## Limitations``: the dataset's, the selection split's, the seeds', latency's, float16's, the notes."""
    info = get_dataset_info(meta["dataset"])
    seeds = len(meta["seeds"])
    items = list(info.limitations)
    if any(n.startswith("test/") for n in meta["metrics"]):
        items.append(f"The best epoch of every run was chosen on the {meta['eval_split']} split; the test columns "
                     "were measured once, with those weights, on the test split, which played no part in training.")
    else:
        items.append(f"The best epoch of every run was chosen on the {meta['eval_split']} split that the results are "
                     "measured on, so they are slightly optimistic.")
    items.append(f"{seeds} seed{'s' if seeds > 1 else ''}: " + ("the spread is a rough indication, not a confidence "
                                                              "interval." if seeds > 1 else "no spread is known."))
    if "moe_blocks" in meta:
        items.append("Latency comes from one machine at batch 1 in eager PyTorch: it compares the variant with its "
                     "dense twin, it is not a deployment benchmark. MoE blocks dispatch tokens with gathers that FLOPs "
                     "do not count.")
    else:
        items.append("Latency comes from one machine at batch 1 in eager PyTorch: it is not a deployment benchmark.")
    check = meta["weights"].get("check") or {}
    if meta["weights"]["dtype"] == "float16":
        items.append(f"Stored in float16 and cast to float32 on load: on one {meta['eval_split']} batch the round "
                     f"trip changed the logits by at most {check.get('max_abs_diff', float('nan')):.3g} (largest logit "
                     f"{check.get('max_abs_reference', float('nan')):.3g}); "
                     f"{100 * check.get('agreement', float('nan')):.2f}% of the predictions agree.")
    items += list(meta.get("notes") or [])
    return ["## Limitations", "", *[f"- {item}" for item in items]]


def citation_section(meta: Mapping[str, Any]) -> list[str]:
    """``## Citation``: the dataset's terms and BibTeX, and the methods' references."""
    info = get_dataset_info(meta["dataset"])
    lines = ["## Citation", "", f"{info.use}", "", "```bibtex", "\n\n".join(info.citations), "```"]
    references = meta.get("references") or []
    if references:
        lines += ["", "Methods:", "", *[f"- {reference}" for reference in references]]
    return lines
