"""The model card of a zoo variant: YAML front matter (Hub metadata + the ``convmoe:`` block) and prose
rendered from that block alone.

Every number in the prose is formatted from the ``convmoe:`` metadata block, and ``model-index``
is generated from it too, so the card cannot say two different things: ``convmoe zoo check``
re-renders each card from its metadata and reports any difference. The only hand-free text that
does not come from the block is the routing-analysis section (``model_card_section``), kept
verbatim between two markers.

    ---
    library_name: convmoe            Hub metadata: licence, tags, datasets, metrics, base_model
    ...
    convmoe: {...}                   the machine-readable record (see convmoe.zoo.schema)
    model-index: [...]               generated from convmoe.metrics
    ---
    # <model-id>                     prose: usage, results with the dense twin and seeds, cost,
    ...                              commands, routing analysis, limitations, citations
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from convmoe.zoo.datasets import get_dataset_info

ANALYSIS_START = "<!-- convmoe:analysis:start -->"
ANALYSIS_END = "<!-- convmoe:analysis:end -->"
PIPELINE_TAGS = {"classification": "image-classification", "segmentation": "image-segmentation"}
# Hub metric types (evaluate ids) and display names of the engine's metrics.
METRIC_TYPES = {"miou": ("mean_iou", "mIoU"), "pixel_accuracy": ("accuracy", "pixel accuracy"),
                "top1": ("accuracy", "top-1 accuracy (%)"), "top5": ("accuracy", "top-5 accuracy (%)")}
TOP_LEVEL_ORDER = ("library_name", "license", "tags", "datasets", "metrics", "pipeline_tag", "base_model", "convmoe",
                   "model-index")


# -- front matter --------------------------------------------------------------------------------------


def split_front_matter(text: str, where: str = "the card") -> tuple[dict[str, Any], str]:
    """The YAML front matter of a Markdown text (between the leading ``---`` lines) and the body after it.

    Raises:
        ValueError: No front matter, no closing ``---``, or YAML that is not a mapping.

    Example:
        >>> split_front_matter("---\\na: 1\\n---\\n# Title\\n")
        ({'a': 1}, '# Title\\n')
    """
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise ValueError(f"{where} has no YAML front matter; a zoo card starts with '---' (write it with "
                         "`convmoe zoo publish`).")
    end = next((i for i, line in enumerate(lines[1:], start=1) if line.strip() == "---"), None)
    if end is None:
        raise ValueError(f"{where}: the front matter has no closing '---' line.")
    try:
        data = yaml.safe_load("".join(lines[1:end])) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{where}: the front matter is not valid YAML ({error}).") from None
    if not isinstance(data, dict):
        # ValueError, as for the other malformed-card cases: callers handle one kind of bad file.
        raise ValueError(f"{where}: the front matter must be a YAML mapping, got {type(data).__name__}.")  # noqa: TRY004
    return data, "".join(lines[end + 1:])


def model_index(meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Hub ``model-index`` of a card: one result per headline metric of ``meta["metrics"]``.

    Example:
        >>> index = model_index({"model_id": "m", "task": "classification", "dataset": "cifar10",
        ...                      "eval_split": "test", "seeds": [0], "metrics": {"val/top1": 91.0}})
        >>> index[0]["results"][0]["metrics"][0]["value"]
        91.0
    """
    info = get_dataset_info(meta["dataset"])
    seeds = len(meta["seeds"])
    metrics = []
    for name, value in meta["metrics"].items():
        split, _, short = name.partition("/")
        metric_type, label = METRIC_TYPES.get(short, (short, short))
        on = meta["eval_split"] if split == "val" else split
        metrics.append({"type": metric_type, "value": value,
                        "name": f"{label}, {on} split, mean of {seeds} seed{'s' if seeds > 1 else ''}"})
    task = PIPELINE_TAGS[meta["task"]]
    return [{"name": meta["model_id"], "results": [{
        "task": {"type": task, "name": task.replace("-", " ")},
        "dataset": {"type": info.hub_id, "name": info.name.split(" (")[0], "split": meta["eval_split"]},
        "metrics": metrics}]}]


def build_front_matter(meta: Mapping[str, Any], license: str | None = None, base_model: str | None = None,
                       ) -> dict[str, Any]:
    """The card's front matter for the ``convmoe:`` block ``meta``: Hub metadata, the block, model-index.

    Args:
        meta: The ``convmoe:`` block.
        license: Licence id; default the dataset's (``cc-by-nc-4.0`` for CamVid).
        base_model: Hub id of the exact weights the model started from; left out when None (the
            Hub rejects an id that does not exist).

    Example:
        >>> meta = {"model_id": "m", "task": "classification", "dataset": "cifar10", "eval_split": "test",
        ...         "seeds": [0], "metrics": {"val/top1": 91.0}}
        >>> front = build_front_matter(meta)
        >>> front["library_name"], front["license"], front["pipeline_tag"]
        ('convmoe', 'apache-2.0', 'image-classification')
    """
    info = get_dataset_info(meta["dataset"])
    task = PIPELINE_TAGS[meta["task"]]
    types = list(dict.fromkeys(METRIC_TYPES.get(name.partition("/")[2], (name,))[0] for name in meta["metrics"]))
    front: dict[str, Any] = {
        "library_name": "convmoe",
        "license": license or info.license,
        "tags": ["convmoe", "mixture-of-experts", task, "pytorch", "safetensors"],
        "datasets": [info.hub_id],
        "metrics": types,
        "pipeline_tag": task,
    }
    if base_model:
        front["base_model"] = base_model
    front["convmoe"] = dict(meta)
    front["model-index"] = model_index(meta)
    return front


def dump_front_matter(front: Mapping[str, Any]) -> str:
    """The front matter as YAML between ``---`` lines, keys in the card's order, model-index regenerated.

    Example:
        >>> dump_front_matter({"library_name": "convmoe"}).splitlines()
        ['---', 'library_name: convmoe', '---']
    """
    front = dict(front)
    if isinstance(front.get("convmoe"), Mapping) and "model-index" in front:
        front["model-index"] = model_index(front["convmoe"])
    ordered = {key: front[key] for key in TOP_LEVEL_ORDER if key in front}
    ordered.update({key: value for key, value in front.items() if key not in ordered})
    text = yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True, width=1000, default_flow_style=False)
    return f"---\n{text}---"


# -- number formatting ---------------------------------------------------------------------------------


def format_count(value: float | None) -> str:
    """``27.14M``, ``1.23G``: a count with a metric prefix (``n/a`` for None).

    Example:
        >>> format_count(27_135_823), format_count(950), format_count(None)
        ('27.14M', '950', 'n/a')
    """
    if value is None:
        return "n/a"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


def format_metric(name: str, value: float | None, spread: float | None = None) -> str:
    """A metric as the card shows it: percentages with 2 decimals, fractions with 4; ``± spread`` if given.

    Example:
        >>> format_metric("val/top1", 91.234, 0.5), format_metric("val/miou", 0.61234)
        ('91.23 ± 0.50', '0.6123')
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    digits = 2 if name.rsplit("/", 1)[-1] in ("top1", "top5") else 4
    text = f"{value:.{digits}f}"
    return text if spread is None else f"{text} ± {spread:.{digits}f}"


def format_ms(value: float | None) -> str:
    """Milliseconds with 3 significant digits (``n/a`` for None).

    Example:
        >>> format_ms(8.1234), format_ms(None)
        ('8.12 ms', 'n/a')
    """
    return "n/a" if value is None else f"{value:.3g} ms"


def metric_label(name: str, eval_split: str) -> str:
    """A metric's column title: what it is and on which split (``val/*`` are on the config's val_dataset split).

    Example:
        >>> metric_label("val/top1", "test"), metric_label("val/miou", "val")
        ('top-1 accuracy (%), test', 'mIoU, val')
    """
    split, _, short = name.partition("/")
    return f"{METRIC_TYPES.get(short, (short, short))[1]}, {eval_split if split == 'val' else split}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _seeds(seeds: Sequence[int]) -> str:
    return f"{len(seeds)} ({', '.join(map(str, seeds))})"


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


# -- the body ------------------------------------------------------------------------------------------


def _results(meta: Mapping[str, Any]) -> list[str]:
    twin = meta.get("dense_twin")
    names = list(meta["metrics"])
    latency = meta.get("latency") or {}
    labels = [metric_label(n, meta["eval_split"]) for n in names]
    header = ["model", "seeds", *labels, "params", "active FLOPs", "latency"]
    rows = [["**this variant**", _seeds(meta["seeds"]),
             *[format_metric(n, meta["metrics"][n], meta["metrics_std"].get(n)) for n in names],
             format_count(meta["params"]), format_count(meta["active_flops"]), format_ms(latency.get("ms"))]]
    if twin:
        rows.append(["dense twin", _seeds(twin["seeds"]),
                     *[format_metric(n, twin["metrics"].get(n), twin["metrics_std"].get(n)) for n in names],
                     format_count(twin["params"]), format_count(twin["active_flops"]),
                     format_ms(latency.get("dense_twin_ms"))])
    lines = [
        "## Results",
        "",
        (f"Measured on the **{meta['eval_split']}** split of {get_dataset_info(meta['dataset']).name}; each run's best "
         f"epoch was chosen on {metric_label(meta['monitor'], meta['eval_split'])}. Cells show the mean ± sample standard deviation "
         "(n - 1) over seeds; one seed has no spread. FLOPs and latency are per image (see Cost)."),
        "",
        *_table(header, rows),
        "",
        "Per seed (best epoch of each run):",
        "",
    ]
    seed_rows = [["this variant", str(run["seed"]), str(run["epoch"]),
                  *[format_metric(n, run["metrics"].get(n)) for n in names]] for run in meta["runs"]]
    seed_rows += [["dense twin", str(run["seed"]), str(run["epoch"]),
                   *[format_metric(n, run["metrics"].get(n)) for n in names]] for run in (twin or {}).get("runs", [])]
    lines += _table(["model", "seed", "epoch", *labels], seed_rows)
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
        lines += ["", f"Per-class IoU on the {meta['eval_split']} split (mean over seeds):", "", *_table(header, rows)]
    return lines


def _cost(meta: Mapping[str, Any]) -> list[str]:
    twin = meta.get("dense_twin")
    flops = meta["flops"]
    shape = "x".join(map(str, flops["input"]))
    lines = ["## Cost", ""]
    params = f"- Parameters: {format_count(meta['params'])} (dense equivalent: {format_count(meta['dense_params'])}"
    lines.append(params + (f"; dense twin: {format_count(twin['params'])})." if twin else ")."))
    flop_line = (f"- Active FLOPs per image at input {shape}: {format_count(meta['active_flops'])} (dense "
                 f"equivalent: {format_count(meta['dense_flops'])}")
    if twin:
        flop_line += f"; dense twin: {format_count(twin['active_flops'])}"
    flop_line += ")"
    if flops.get("block_ratio") is not None:
        flop_line += f"; the MoE blocks cost {flops['block_ratio']:.2f}x the convs they replace"
    lines += [flop_line + ".", f"  Counted with {flops['method']}."]
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
    lines.append(f"- Weights: `model.safetensors`, {weights['dtype']}, {_mb(weights['bytes'])}, sha256 "
                 f"`{weights['sha256']}`.")
    return lines


def _reproduce(meta: Mapping[str, Any]) -> list[str]:
    commands = meta["commands"]
    lines = ["## Reproduce", "", "Train (one command per seed; `convmoe` is this library's command line):", "", "```bash",
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


def _limitations(meta: Mapping[str, Any]) -> list[str]:
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
    items.append("Latency comes from one machine at batch 1 in eager PyTorch: it compares the variant with its dense "
                 "twin, it is not a deployment benchmark. MoE blocks dispatch tokens with gathers that FLOPs do not "
                 "count.")
    check = meta["weights"].get("check") or {}
    if meta["weights"]["dtype"] == "float16":
        items.append(f"Stored in float16 and cast to float32 on load: on one {meta['eval_split']} batch the round "
                     f"trip changed the logits by at most {check.get('max_abs_diff', float('nan')):.3g} (largest logit "
                     f"{check.get('max_abs_reference', float('nan')):.3g}); "
                     f"{100 * check.get('agreement', float('nan')):.2f}% of the predictions agree.")
    items += list(meta.get("notes") or [])
    return ["## Limitations", "", *[f"- {item}" for item in items]]


def _citation(meta: Mapping[str, Any]) -> list[str]:
    info = get_dataset_info(meta["dataset"])
    lines = ["## Citation", "", f"{info.use}", "", "```bibtex", "\n\n".join(info.citations), "```"]
    references = meta.get("references") or []
    if references:
        lines += ["", "Methods:", "", *[f"- {reference}" for reference in references]]
    return lines


def render_body(meta: Mapping[str, Any], analysis: str | None = None) -> str:
    """The card's Markdown after the front matter, from the ``convmoe:`` block and the analysis section.

    Example:
        >>> "## Limitations" in render_body(EXAMPLE_META)
        True
    """
    info = get_dataset_info(meta["dataset"])
    revision = f', revision="{meta["revision"]}"' if meta.get("revision") else ""
    weights = meta["weights"]
    load_note = ("The weights are stored in float16 to halve the download; `from_pretrained` casts them to float32 "
                 "on load, so the model runs as any float32 model (its routers stay in float32)."
                 if weights["dtype"] == "float16" else "The weights are stored in float32.")
    lines = [
        f"# {meta['model_id']}",
        "",
        (f"{meta['task'].capitalize()} on {info.name}: `{meta['architecture']}` with Mixture-of-Experts blocks from "
         f"convmoe. MoE: {meta['patch']}. Initialisation: "
         f"{meta['initialization']}."),
        "",
        f"**Use:** {info.use}",
        "",
        "## Usage",
        "",
        "```python",
        "import convmoe",
        "",
        f'model = convmoe.from_pretrained("{meta["hub_id"]}"{revision})  # eval mode, float32',
        "```",
        "",
        load_note + " `convmoe.describe(model)` lists the MoE blocks.",
        "",
        *_results(meta),
        "",
        *_cost(meta),
        "",
        *_reproduce(meta),
        "",
    ]
    if analysis:
        lines += [ANALYSIS_START, analysis.strip("\n"), ANALYSIS_END, ""]
    lines += [*_limitations(meta), "", *_citation(meta), ""]
    return "\n".join(lines)


def render_card(front: Mapping[str, Any], analysis: str | None = None) -> str:
    """The whole ``README.md``: front matter (model-index regenerated from the metadata) and body.

    Example:
        >>> card = render_card(build_front_matter(EXAMPLE_META))
        >>> card.startswith("---\\nlibrary_name: convmoe\\n"), "# tiny-moe" in card
        (True, True)
    """
    return f"{dump_front_matter(front)}\n{render_body(front['convmoe'], analysis)}"


def analysis_section(body: str) -> str | None:
    """The routing-analysis Markdown kept between the card's analysis markers, or None.

    Example:
        >>> analysis_section(f"x\\n{ANALYSIS_START}\\n## Routing\\n{ANALYSIS_END}\\n")
        '## Routing'
    """
    if ANALYSIS_START not in body or ANALYSIS_END not in body:
        return None
    return body.split(ANALYSIS_START, 1)[1].split(ANALYSIS_END, 1)[0].strip("\n")


def rerender(text: str, where: str = "the card") -> str:
    """``text`` (a card) rendered again from its own front matter: what the card should read.

    Example:
        >>> card = render_card(build_front_matter(EXAMPLE_META))
        >>> rerender(card) == card
        True
    """
    front, body = split_front_matter(text, where)
    return render_card(front, analysis_section(body))


# A complete metadata block, used by the examples and as the template's reference.
EXAMPLE_META: dict[str, Any] = {
    "schema_version": 1, "model_id": "tiny-moe", "hub_id": "convmoe/tiny-moe", "revision": None,
    "task": "classification", "dataset": "cifar10", "eval_split": "test",
    "architecture": "convmoe.models.classification:create_classifier", "initialization": "random",
    "patch": "layer4.0.conv2: 4 experts, top-2, pixel tokens, token_choice router", "moe_blocks": ["layer4.0.conv2"],
    "monitor": "val/top1", "metrics": {"val/top1": 50.0}, "metrics_std": {"val/top1": None}, "seeds": [0],
    "runs": [{"seed": 0, "epoch": 0, "step": 2, "run": "a", "metrics": {"val/top1": 50.0}}], "published_seed": 0,
    "params": 1000, "dense_params": 900, "active_flops": 5000, "dense_flops": 4500,
    "flops": {"input": [1, 3, 32, 32], "method": "example", "block_ratio": 1.1}, "latency": None,
    "weights": {"dtype": "float32", "bytes": 4000, "sha256": "0" * 64,
                "check": {"max_abs_diff": 0.0, "max_abs_reference": 1.0, "agreement": 1.0}},
    "reevaluated": {"val/top1": 50.0}, "command": "convmoe train r.yaml",
    "commands": {"train": ["convmoe train r.yaml"], "eval": "convmoe eval convmoe/tiny-moe --config r.yaml"},
    "preprocessing": [], "dense_twin": None, "references": [], "notes": [], "convmoe_version": "0.1.0",
}
