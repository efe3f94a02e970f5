"""The zoo's schema, and the checks ``convmoe zoo check`` runs on every variant (torchvision's
``test_schema_meta_validation``, for a folder zoo).

A variant is ``zoo/<model-id>/`` in Hub layout: ``config.json`` + ``model.safetensors``
(:func:`convmoe.save_pretrained`) and ``README.md``, whose front matter holds the Hub metadata and
the ``convmoe:`` block below. Every check returns problems as sentences naming the fix; none
raises, so one run lists everything wrong.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from convmoe.atomic_files import file_sha256
from convmoe.hub import CONFIG_NAME, WEIGHTS_NAME, from_pretrained, read_config
from convmoe.zoo.card import PIPELINE_TAGS, model_index, rerender, split_front_matter
from convmoe.zoo.datasets import DATASETS
from convmoe.zoo.weights import weights_dtype

SCHEMA_VERSION = 1
CARD_NAME = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
MODEL_ID = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,94}[a-z0-9])?$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_metrics(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(k, str) and _is_number(v)
                                                              for k, v in value.items())


def _is_spreads(value: Any) -> bool:
    return isinstance(value, Mapping) and all(v is None or (_is_number(v) and v >= 0) for v in value.values())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_optional_count(value: Any) -> bool:
    return value is None or _is_count(value)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_seeds(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(v) for v in value) and len(set(value)) == len(value)


def _is_runs(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(r, Mapping) and _is_int(r.get("seed")) and _is_int(r.get("epoch")) and _is_metrics(r.get("metrics"))
        for r in value)


def _is_train_commands(value: Any) -> bool:
    return (isinstance(value, Mapping) and isinstance(value.get("train"), list) and bool(value["train"])
            and all(isinstance(c, str) and c.startswith("convmoe train ") for c in value["train"]))


def _is_commands(value: Any) -> bool:
    return _is_train_commands(value) and isinstance(value.get("eval"), str) and value["eval"].startswith("convmoe eval ")


def _is_flops(value: Any) -> bool:
    return (isinstance(value, Mapping) and isinstance(value.get("input"), list) and len(value["input"]) == 4
            and all(_is_count(v) for v in value["input"]) and _is_text(value.get("method")))


def _is_weights(value: Any) -> bool:
    return (isinstance(value, Mapping) and value.get("dtype") in ("float16", "float32") and _is_count(value.get("bytes"))
            and isinstance(value.get("sha256"), str) and bool(SHA256.match(value["sha256"]))
            and (value.get("check") is None or isinstance(value.get("check"), Mapping)))


def _is_latency(value: Any) -> bool:
    return value is None or (isinstance(value, Mapping) and _is_number(value.get("ms")) and _is_text(value.get("device"))
                             and _is_count(value.get("reps")) and isinstance(value.get("input"), list))


def _is_twin(value: Any) -> bool:
    return value is None or (isinstance(value, Mapping) and _is_seeds(value.get("seeds"))
                             and _is_metrics(value.get("metrics")) and _is_spreads(value.get("metrics_std"))
                             and _is_runs(value.get("runs")) and _is_count(value.get("params"))
                             and _is_optional_count(value.get("active_flops")) and _is_train_commands(value.get("commands")))


# The ``convmoe:`` block: key -> (check, what it holds). Docs read task, patch, metrics, command too.
METADATA_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "schema_version": (lambda v: v == SCHEMA_VERSION, f"the schema version, {SCHEMA_VERSION}"),
    "model_id": (lambda v: isinstance(v, str) and bool(MODEL_ID.match(v)), "the folder name, lower case"),
    "hub_id": (lambda v: isinstance(v, str) and bool(HUB_ID.match(v)), "the Hub repo id 'org/name'"),
    "revision": (lambda v: v is None or _is_text(v), "the Hub commit of the weights (set by `convmoe zoo push`)"),
    "task": (lambda v: v in PIPELINE_TAGS, f"one of {sorted(PIPELINE_TAGS)}"),
    "dataset": (lambda v: v in DATASETS, f"one of {sorted(DATASETS)} (convmoe.zoo.datasets)"),
    "eval_split": (_is_text, "the split the val metrics were measured on"),
    "architecture": (_is_text, "the builder of the base model ('module:function')"),
    "initialization": (_is_text, "where the training started from"),
    "patch": (_is_text, "the MoE blocks in words"),
    "monitor": (lambda v: isinstance(v, str) and v.startswith("val/"), "the metric that chose the best epoch"),
    "metrics": (_is_metrics, "headline metrics, mean over seeds: finite numbers"),
    "metrics_std": (_is_spreads, "sample standard deviation per metric (null for one seed)"),
    "seeds": (_is_seeds, "the distinct trainer.seed values of the runs"),
    "runs": (_is_runs, "per seed: seed, epoch, step, run, metrics"),
    "published_seed": (_is_int, "the seed whose best checkpoint is published"),
    "params": (_is_count, "parameters"),
    "dense_params": (_is_count, "parameters of the dense equivalent"),
    "active_flops": (_is_optional_count, "FLOPs per image with the MoE blocks at their active cost"),
    "dense_flops": (_is_optional_count, "FLOPs per image of the dense equivalent"),
    "flops": (_is_flops, "input size and counting method of the FLOPs"),
    "latency": (_is_latency, "median ms, device, reps, warm-up, input (null when not measured)"),
    "weights": (_is_weights, ("dtype, bytes and sha256 (64 lower-case hex digits) of model.safetensors as published, "
                              "and the round-trip check")),
    "reevaluated": (_is_metrics, "metrics of the published files, evaluated again at publish time"),
    "command": (lambda v: isinstance(v, str) and v.startswith("convmoe train "), "train command of the published seed"),
    "commands": (_is_commands, "train (one per seed) and eval commands"),
    "dense_twin": (_is_twin, "the dense twin's seeds, metrics, cost and commands (null without one)"),
    "convmoe_version": (_is_text, "the convmoe version that published it"),
}
# Optional keys with a checked value (cards published before they existed lack them).
OPTIONAL_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "executed_flops": (_is_optional_count, "FLOPs per image as the MoE blocks' dispatch paths ran"),
}
OPTIONAL_METADATA = ("preprocessing", "per_class_iou", "references", "notes", *OPTIONAL_SCHEMA)


def _is_model_id(value: Any) -> bool:
    return isinstance(value, str) and bool(MODEL_ID.match(value))


# Keys that tell an MoE variant from a dense one and link the two: an MoE card has ``moe_blocks`` (and,
# when its dense twin is published too, ``dense_model_id``); a dense card has neither, but ``moe_model_ids``.
VARIANT_KIND_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "moe_blocks": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v),
                   "MoE block names (left out by a dense variant)"),
    "dense_model_id": (_is_model_id, "the model id of the dense twin, published as its own variant"),
    "moe_model_ids": (lambda v: isinstance(v, list) and bool(v) and all(_is_model_id(n) for n in v)
                      and len(set(v)) == len(v), "the model ids of the MoE variants a dense variant is the twin of"),
}


def is_dense_variant(meta: Mapping[str, Any]) -> bool:
    """Whether a ``convmoe:`` block describes a dense variant (a dense twin published on its own): no ``moe_blocks``.

    Example:
        >>> from convmoe.zoo.card import EXAMPLE_META
        >>> is_dense_variant(EXAMPLE_META), is_dense_variant({k: v for k, v in EXAMPLE_META.items() if k != "moe_blocks"})
        (False, True)
    """
    return "moe_blocks" not in meta


def _kind_problems(meta: Mapping[str, Any]) -> list[str]:
    problems = [f"convmoe.{key} is {meta[key]!r}; it must be {what}."
                for key, (check, what) in VARIANT_KIND_SCHEMA.items() if key in meta and not check(meta[key])]
    if problems:
        return problems
    if not is_dense_variant(meta):
        if "moe_model_ids" in meta:
            problems.append("convmoe.moe_model_ids belongs to a dense variant, but the card lists moe_blocks; "
                            "point an MoE variant to its twin with dense_model_id.")
        if meta.get("dense_model_id") == meta.get("model_id"):
            problems.append("convmoe.dense_model_id names the variant itself; it must be its dense twin's model id.")
        return problems
    if "moe_model_ids" not in meta:
        problems.append("convmoe.moe_blocks is missing; an MoE variant lists its blocks, a dense variant gives "
                        "moe_model_ids (publish it with --twin-of MOE_ID).")
    if "dense_model_id" in meta or meta.get("dense_twin") is not None:
        problems.append("a dense variant (no moe_blocks) has no dense twin; leave out dense_model_id and set "
                        "dense_twin to null.")
    if meta.get("model_id") in (meta.get("moe_model_ids") or []):
        problems.append("convmoe.moe_model_ids names the variant itself; it must name the MoE variants.")
    return problems


def validate_metadata(meta: Any, folder_name: str | None = None) -> list[str]:
    """Problems of a ``convmoe:`` block against :data:`METADATA_SCHEMA` and its internal consistency.

    Example:
        >>> from convmoe.zoo.card import EXAMPLE_META
        >>> validate_metadata(EXAMPLE_META, "tiny-moe")
        []
        >>> validate_metadata({**EXAMPLE_META, "metrics": {"val/top1": "high"}}, "tiny-moe")[0]
        "convmoe.metrics is {'val/top1': 'high'}; it must be headline metrics, mean over seeds: finite numbers."
    """
    if not isinstance(meta, Mapping):
        return ["the front matter has no 'convmoe:' mapping; publish the variant with `convmoe zoo publish`."]
    problems = []
    for key, (check, what) in METADATA_SCHEMA.items():
        if key not in meta:
            problems.append(f"convmoe.{key} is missing; it must be {what}.")
        elif not check(meta[key]):
            problems.append(f"convmoe.{key} is {meta[key]!r}; it must be {what}.")
    for key, (check, what) in OPTIONAL_SCHEMA.items():
        if key in meta and not check(meta[key]):
            problems.append(f"convmoe.{key} is {meta[key]!r}; it must be {what}.")
    known = [*METADATA_SCHEMA, *VARIANT_KIND_SCHEMA, *OPTIONAL_METADATA]
    unknown = sorted(set(meta) - set(known))
    if unknown:
        problems.append(f"convmoe has unknown keys {unknown}; known: {sorted(known)}.")
    problems += _kind_problems(meta)
    if problems:
        return problems
    if folder_name is not None and meta["model_id"] != folder_name:
        problems.append(f"convmoe.model_id is {meta['model_id']!r} but the folder is {folder_name!r}; they must match.")
    if [run["seed"] for run in meta["runs"]] != meta["seeds"]:
        problems.append(f"convmoe.runs are seeds {[run['seed'] for run in meta['runs']]}, convmoe.seeds says "
                        f"{meta['seeds']}.")
    if meta["published_seed"] not in meta["seeds"]:
        problems.append(f"convmoe.published_seed {meta['published_seed']} is not one of the seeds {meta['seeds']}.")
    if len(meta["commands"]["train"]) != len(meta["seeds"]) or meta["command"] not in meta["commands"]["train"]:
        problems.append("convmoe.commands.train must hold one command per seed, convmoe.command among them.")
    if meta["monitor"] not in meta["metrics"]:
        problems.append(f"convmoe.metrics lacks the monitor {meta['monitor']!r}.")
    for name, value in meta["metrics"].items():
        per_seed = [run["metrics"].get(name) for run in meta["runs"]]
        if None in per_seed or not math.isclose(sum(per_seed) / len(per_seed), value, rel_tol=1e-9, abs_tol=1e-12):
            problems.append(f"convmoe.metrics[{name!r}]={value} is not the mean of the per-seed values {per_seed}.")
    return problems


def validate_front_matter(front: Mapping[str, Any], folder_name: str | None = None) -> list[str]:
    """Problems of a card's whole front matter: Hub keys, the ``convmoe:`` block, and ``model-index``.

    Example:
        >>> from convmoe.zoo.card import EXAMPLE_META, build_front_matter
        >>> validate_front_matter(build_front_matter(EXAMPLE_META), "tiny-moe")
        []
    """
    problems = []
    if front.get("library_name") != "convmoe":
        problems.append(f"library_name is {front.get('library_name')!r}; it must be 'convmoe'.")
    for key in ("license", "pipeline_tag"):
        if not _is_text(front.get(key)):
            problems.append(f"{key} is missing; a Hub card needs it.")
    tags = front.get("tags")
    if not isinstance(tags, list) or "convmoe" not in tags:
        problems.append(f"tags is {tags!r}; it must be a list including 'convmoe'.")
    for key in ("datasets", "metrics"):
        if not isinstance(front.get(key), list) or not front[key]:
            problems.append(f"{key} must be a non-empty list (Hub metadata).")
    if "base_model" in front and not (isinstance(front["base_model"], str) and HUB_ID.match(front["base_model"])):
        problems.append(f"base_model is {front['base_model']!r}; it must be the Hub id 'org/name' of the exact "
                        "starting weights, or left out.")
    meta = front.get("convmoe")
    problems += validate_metadata(meta, folder_name)
    if problems:
        return problems
    if front.get("pipeline_tag") != PIPELINE_TAGS[meta["task"]]:
        problems.append(f"pipeline_tag is {front.get('pipeline_tag')!r}; task {meta['task']!r} needs "
                        f"{PIPELINE_TAGS[meta['task']]!r}.")
    if front.get("model-index") != model_index(meta):
        problems.append("model-index does not match convmoe.metrics; regenerate the card with `convmoe zoo table`.")
    else:
        problems += _hub_parse_problems(front)
    return problems


def _hub_parse_problems(front: Mapping[str, Any]) -> list[str]:
    """What huggingface_hub itself makes of the metadata (the Hub parses model-index the same way)."""
    try:
        from huggingface_hub import ModelCardData
    except ImportError:
        return []
    try:
        data = ModelCardData(**dict(front))
    except Exception as error:  # noqa: BLE001 (huggingface_hub raises several types for bad metadata)
        return [f"huggingface_hub cannot read the front matter ({type(error).__name__}: {error})."]
    values = [result.metric_value for result in data.eval_results or []]
    if values != list(front["convmoe"]["metrics"].values()):
        return [(f"huggingface_hub reads model-index values {values}, convmoe.metrics holds "
                 f"{list(front['convmoe']['metrics'].values())}.")]
    return []


def folder_bytes(folder: str | Path) -> int:
    """Bytes of every file under ``folder`` (hidden files included: they would be uploaded too).

    Example:
        >>> folder_bytes("no/such/folder")
        0
    """
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def check_variant(folder: str | Path, load: bool = True) -> list[str]:
    """Every problem of one zoo variant folder; empty when it is publishable.

    Checks: the card's front matter (Hub keys, the ``convmoe:`` block, model-index), the card's
    prose against its metadata, ``config.json`` and ``model.safetensors`` present, the stored dtype,
    size and sha256 as recorded (and ``config.json``'s ``weights_sha256``, when it has one), and
    (``load``) that :func:`convmoe.from_pretrained` loads the folder.

    Example:
        >>> check_variant("no/such/variant")
        ['no/such/variant/README.md does not exist; publish the variant with `convmoe zoo publish`.']
    """
    folder = Path(folder)
    card = folder / CARD_NAME
    if not card.is_file():
        return [f"{card} does not exist; publish the variant with `convmoe zoo publish`."]
    text = card.read_text(encoding="utf-8")
    try:
        front, _ = split_front_matter(text, str(card))
    except ValueError as error:
        return [str(error)]
    problems = [f"{card}: {problem}" for problem in validate_front_matter(front, folder.name)]
    if problems:
        return problems
    meta = front["convmoe"]
    if rerender(text, str(card)) != text:
        problems.append(f"{card}: the prose differs from its convmoe metadata (edited by hand, or an older template); "
                        "put notes in the metadata (`--note` at publish) and run `convmoe zoo table` to re-render.")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            problems.append(f"{folder / name} is missing; publish the variant again.")
    if problems:
        return problems
    weights = folder / WEIGHTS_NAME
    stored = weights_dtype(weights)
    if stored != meta["weights"]["dtype"]:
        problems.append(f"{weights} stores {stored} tensors, the card says {meta['weights']['dtype']}.")
    if weights.stat().st_size != meta["weights"]["bytes"]:
        problems.append(f"{weights} has {weights.stat().st_size} bytes, the card records {meta['weights']['bytes']}: "
                        "the weights changed after publishing. Publish the variant again.")
    digest = file_sha256(weights)
    if digest != meta["weights"]["sha256"]:
        problems.append(f"{weights} has sha256 {digest}, the card records {meta['weights']['sha256']}: the file changed "
                        "after publishing (a corrupted copy or download, or an edit). Restore the published file "
                        "(download it again, or check it out from version control), or publish the variant again.")
    try:
        config = read_config(folder)
        recorded = config.get("weights_sha256")
        if recorded is not None and recorded != meta["weights"]["sha256"]:
            problems.append(f"{folder / CONFIG_NAME} records weights_sha256 {recorded}, the card "
                            f"{meta['weights']['sha256']}: the two files come from different publishes. Publish the "
                            "variant again.")
        if load:
            from_pretrained(folder)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as error:
        problems.append(f"{folder} does not load with convmoe.from_pretrained: {error}")
    return problems


def variant_folders(zoo_dir: str | Path) -> list[Path]:
    """The variant folders of a zoo (sub-folders not starting with ``.`` or ``_``), sorted.

    Example:
        >>> variant_folders("no/such/zoo")
        []
    """
    zoo_dir = Path(zoo_dir)
    if not zoo_dir.is_dir():
        return []
    return sorted(p for p in zoo_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def require_zoo_dir(zoo_dir: str | Path) -> Path:
    """``zoo_dir`` as a Path, after checking that the folder exists (a mistyped ``--zoo-dir`` is an
    error, not an empty zoo).

    Raises:
        FileNotFoundError: No such folder.

    Example:
        >>> require_zoo_dir("no/such/zoo")
        Traceback (most recent call last):
        ...
        FileNotFoundError: zoo folder no/such/zoo does not exist; pass --zoo-dir with the folder holding the variants (default: zoo, run from the repository root).
    """
    zoo_dir = Path(zoo_dir)
    if not zoo_dir.is_dir():
        raise FileNotFoundError(f"zoo folder {zoo_dir} does not exist; pass --zoo-dir with the folder holding the "
                                "variants (default: zoo, run from the repository root).")
    return zoo_dir
