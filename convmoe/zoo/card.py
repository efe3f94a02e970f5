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

from collections.abc import Mapping
from typing import Any

import yaml

from convmoe.zoo.card_format import METRIC_TYPES
from convmoe.zoo.card_sections import (
    citation_section,
    cost_section,
    limitations_section,
    reproduce_section,
    results_section,
)
from convmoe.zoo.datasets import get_dataset_info

ANALYSIS_START = "<!-- convmoe:analysis:start -->"
ANALYSIS_END = "<!-- convmoe:analysis:end -->"
PIPELINE_TAGS = {"classification": "image-classification", "segmentation": "image-segmentation"}
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
        "tags": ["convmoe", "dense-baseline" if "moe_blocks" not in meta else "mixture-of-experts", task, "pytorch",
                 "safetensors"],
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
    dense = "moe_blocks" not in meta  # a dense twin published as its own variant (schema.is_dense_variant)
    if dense:
        twins = ", ".join(f"`{model_id}`" for model_id in meta.get("moe_model_ids") or [])
        intro = (f"{meta['task'].capitalize()} on {info.name}: `{meta['architecture']}`, dense (no Mixture-of-Experts "
                 f"block): the dense twin of {twins}, trained with the same recipe without MoE, published so the two "
                 f"can be loaded and compared. Initialisation: {meta['initialization']}.")
    else:
        intro = (f"{meta['task'].capitalize()} on {info.name}: `{meta['architecture']}` with Mixture-of-Experts blocks "
                 f"from convmoe. MoE: {meta['patch']}. Initialisation: {meta['initialization']}.")
        if meta.get("dense_model_id"):
            intro += f" Its dense twin is published as `{meta['dense_model_id']}`."
    lines = [
        f"# {meta['model_id']}",
        "",
        intro,
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
        load_note + (" `convmoe.describe(model)` lists the MoE blocks." if not dense else ""),
        "",
        *results_section(meta),
        "",
        *cost_section(meta),
        "",
        *reproduce_section(meta),
        "",
    ]
    if analysis:
        lines += [ANALYSIS_START, analysis.strip("\n"), ANALYSIS_END, ""]
    lines += [*limitations_section(meta), "", *citation_section(meta), ""]
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
