"""``convmoe zoo publish``: engine run folders in, a checked zoo variant out.

    runs (main seed, --seeds, --dense-twin)  -> best epoch of each run from metrics.csv (runs.py)
    the run's recipe                         -> exact train and eval commands (recipe_commands.py)
    best.pt of the main run                  -> zoo/<id>/config.json + model.safetensors, its sha256 (weights.py)
    the saved folder                         -> outputs compared with the checkpoint, metrics evaluated again
    one val input                            -> params, active FLOPs, latency against the dense twin (cost.py)
    the val loader                           -> routing analysis section (convmoe.analysis)
    all of the above                         -> README.md from its metadata (card.py), checked (schema.py)

Nothing is typed by hand: a number in the card is a logged metric, a measurement made here, or
derived from them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from convmoe import __version__
from convmoe.atomic_files import file_sha256
from convmoe.engine.evaluate import load_model, split_batch
from convmoe.engine.loaders import build_dataloader
from convmoe.engine.processes import DistributedContext
from convmoe.hub import WEIGHTS_NAME, from_pretrained
from convmoe.zoo.card import build_front_matter, render_card
from convmoe.zoo.card_format import selection_split
from convmoe.zoo.cost import device_description, measure_cost, measure_latency
from convmoe.zoo.datasets import detect_dataset, get_dataset_info
from convmoe.zoo.method_text import (
    describe_initialization,
    describe_moe,
    describe_preprocessing,
    method_references,
)
from convmoe.zoo.published_checks import check_round_trip, reevaluate
from convmoe.zoo.recipe_commands import eval_command, find_recipe, recipe_overrides, train_command
from convmoe.zoo.routing_sections import CURVES_NAME, routing_analysis, training_curves
from convmoe.zoo.runs import (
    RunRecord,
    check_comparable,
    check_same_recipe,
    first_phase,
    read_run,
    summarize_runs,
)
from convmoe.zoo.schema import CARD_NAME, HUB_ID, MODEL_ID, SCHEMA_VERSION, check_variant
from convmoe.zoo.table import write_index
from convmoe.zoo.weights import base_recipe_for, compare_outputs, export_weights

DEFAULT_ORG = "convmoe"
STAGING = ".publishing"  # inside the zoo folder: where a variant is written before it is moved in
_PUBLISHED_FILES = (CARD_NAME, "config.json", "model.safetensors", "routing_heatmaps.png", CURVES_NAME)


@dataclass(frozen=True)
class PublishResult:
    """What :func:`publish` wrote.

    Attributes:
        folder: ``zoo/<model-id>``.
        card: Its ``README.md``.
        front_matter: The card's front matter (Hub metadata and the ``convmoe:`` block).

    Example:
        >>> PublishResult(Path("zoo/a"), Path("zoo/a/README.md"), {}).folder.name
        'a'
    """

    folder: Path
    card: Path
    front_matter: dict[str, Any]


def _commands(runs: Sequence[RunRecord], recipe: str | Path | None, recipes_dir: str | Path,
              ) -> tuple[Path, list[list[str]]]:
    """The recipe of ``runs`` (given, or found among ``recipes_dir/*.yaml``) and each run's overrides."""
    if recipe is None:
        candidates = sorted(Path(recipes_dir).glob("*.yaml"))
        recipe, _ = find_recipe(runs[0].config, candidates)
    recipe = Path(recipe)
    if not recipe.is_file():
        raise FileNotFoundError(f"recipe {recipe} does not exist; pass the YAML the run was trained from.")
    return recipe, [recipe_overrides(recipe, run.config) for run in runs]


def _train_commands(phases: Sequence[RunRecord | None], recipe: Path, overrides: Sequence[list[str]],
                    recipes_dir: str | Path) -> list[str]:
    """Each run's ``convmoe train`` command (``overrides`` of ``recipe``, one list per run); a run that started
    from another run's checkpoint (its :func:`first_phase` in ``phases``) gets that run's command first, joined
    with ``&&`` (its recipe: ``recipe`` or one in ``recipes_dir``)."""
    commands = []
    for phase, run_overrides in zip(phases, overrides, strict=True):
        command = train_command(recipe, run_overrides)
        if phase is not None:
            candidates = [recipe, *sorted(Path(recipes_dir).glob("*.yaml"))]
            phase_recipe, phase_overrides = find_recipe(phase.config, candidates)
            first = _train_commands([first_phase(phase)], phase_recipe, [phase_overrides], recipes_dir)[0]
            command = f"{first} && {command}"
        commands.append(command)
    return commands


def _staging_folder(folder: Path, overwrite: bool) -> Path:
    """An empty ``<zoo>/.publishing/<id>`` to write the variant into (a hidden folder is not a variant), after
    refusing to replace a published variant without ``overwrite``."""
    existing = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    if existing and not overwrite:
        raise ValueError(f"{folder} already holds {sorted(p.name for p in existing)}; pass --overwrite to replace "
                         "the variant (its old files are removed).")
    staging = folder.parent / STAGING / folder.name
    shutil.rmtree(staging, ignore_errors=True)  # left by a publish that was killed
    staging.mkdir(parents=True)
    return staging


def _move_in(staging: Path, folder: Path) -> None:
    """Replace the published files of ``folder`` with the staged ones (other files in it are kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.is_file() and (path.name in _PUBLISHED_FILES or path.name.startswith(".")):
            path.unlink()
    for path in staging.iterdir():
        os.replace(path, folder / path.name)
    _remove_staging(staging)


def _remove_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):  # other publishes may be staging beside it
        staging.parent.rmdir()


def _val_loader(config: dict[str, Any], device: torch.device) -> Any:
    if not config.get("val_dataset"):
        raise ValueError("the run's config has no val_dataset; a zoo variant is measured on it.")
    ctx = DistributedContext(0, 0, 1, device)
    return build_dataloader(config["val_dataset"], config.get("data_loader") or {}, ctx, train=False)


def _twin_summary(twins: Sequence[RunRecord], twin_cost: Any, train_commands: list[str]) -> dict[str, Any]:
    summary = summarize_runs(twins)
    summary.update({"params": twin_cost.params, "active_flops": twin_cost.active_flops,
                    "commands": {"train": train_commands}})
    return summary


def _check_variant_kind(model: nn.Module, model_id: str, twins: Sequence[RunRecord], twin_of: Sequence[str],
                        dense_model_id: str | None) -> None:
    """An MoE run may name its dense twin's variant; a dense run is published as the twin of MoE variants."""
    _, block_names = describe_moe(model)
    ids = [*twin_of, *([dense_model_id] if dense_model_id else [])]
    bad = [i for i in ids if not MODEL_ID.match(i) or i == model_id]
    if bad:
        raise ValueError(f"model ids {bad} must be other variants' ids (lower case letters, digits and . - _).")
    if block_names and twin_of:
        raise ValueError(f"--twin-of is for a dense run, but {model_id} has MoE blocks; name its dense twin's variant "
                         "with --dense-model-id instead.")
    if not block_names and (twins or dense_model_id):
        raise ValueError(f"{model_id} is dense (no MoE block), so it has no dense twin; publish it with --twin-of "
                         "MOE_ID, without --dense-twin or --dense-model-id.")
    if not block_names and not twin_of:
        raise ValueError(f"{model_id} is dense (no MoE block); the zoo publishes dense models as twins of MoE variants: "
                         "pass --twin-of MOE_ID (the MoE variants trained with the same recipe).")


def publish(run_dir: str | Path, model_id: str, *, dense_twin: Sequence[str | Path] = (),
            seeds: Sequence[str | Path] = (), float16: bool = False, zoo_dir: str | Path = "zoo",
            config: str | Path | None = None, dense_config: str | Path | None = None,
            recipes_dir: str | Path = "configs", repo_id: str | None = None, dataset: str | None = None,
            license: str | None = None, base_model: str | None = None, device: str | torch.device | None = None,
            latency_warmup: int = 5, latency_reps: int = 30, analysis: bool = True,
            analysis_batches: int | None = None, metric_tolerance: float | None = None, notes: Sequence[str] = (),
            overwrite: bool = False, update_index: bool = True, twin_of: Sequence[str] = (),
            dense_model_id: str | None = None) -> PublishResult:
    """Publish the best checkpoint of an engine run as ``zoo/<model_id>/`` with its model card.

    Args:
        run_dir: The run whose best checkpoint is published (``convmoe train`` output folder).
        model_id: Folder and Hub repo name (lower case, digits, ``.-_``).
        dense_twin: Runs of the dense recipe (the same recipe without MoE), one per seed.
        seeds: More runs of the same recipe with other ``trainer.seed`` values.
        float16: Store the weights in float16 (checked: predictions and metrics must stay close).
        zoo_dir: The zoo folder.
        config: The recipe the runs were trained from; default: the one in ``recipes_dir`` that
            reproduces the run's config with the fewest overrides.
        dense_config: The dense twin's recipe, found the same way by default.
        recipes_dir: Where recipes are searched.
        repo_id: Hub repo id; default ``convmoe/<model_id>``.
        dataset: Key of :data:`~convmoe.zoo.datasets.DATASETS`; default from the config.
        license: Licence id; default the dataset's.
        base_model: Hub id of the exact starting weights, if they are on the Hub.
        device: Where latency and the routing analysis run (default: CUDA if available).
        latency_warmup: Untimed passes before timing.
        latency_reps: Timed passes; 0 skips the latency measurement.
        analysis: Add the routing-analysis section (MoE models only).
        analysis_batches: Limit the analysis to this many val batches.
        metric_tolerance: Allowed change of a metric when the published files are evaluated again
            (default: 0.001 of its scale for float32, 0.005 for float16).
        notes: Extra sentences for the card's Limitations.
        overwrite: Replace an existing variant folder.
        update_index: Regenerate ``zoo/README.md`` (and re-render the other cards).
        twin_of: For a dense run (no MoE block): the model ids of the MoE variants it is the dense
            twin of. The card has no ``moe_blocks`` and lists them as ``moe_model_ids``.
        dense_model_id: For an MoE run: the model id its dense twin is (or will be) published as.

    Returns:
        The folder, the card and its front matter.

    Raises:
        FileNotFoundError: A run folder or recipe is missing.
        ValueError: Runs that are not seeds of one recipe, an incomparable dense twin, no recipe
            reproducing a run, a variant that exists, a dense run without ``twin_of`` (or an MoE run
            with it), or published files that do not reproduce the checkpoint's outputs and metrics.

    Example:
        >>> publish("runs/camvid_upernet_moe", "upernet-lite0-moe8-camvid",  # doctest: +SKIP
        ...         seeds=["runs/camvid_upernet_moe_seed1"], dense_twin=["runs/camvid_upernet_dense"], float16=True)
    """
    if not MODEL_ID.match(model_id) or "--" in model_id or ".." in model_id:
        raise ValueError(f"model id {model_id!r} must be lower case letters, digits and . - _ (no '--' or '..', at most "
                         "96 characters), e.g. 'upernet-lite0-moe8-camvid'.")
    hub_id = repo_id or f"{DEFAULT_ORG}/{model_id}"
    if not HUB_ID.match(hub_id):
        raise ValueError(f"repo id {hub_id!r} must look like 'org/name'.")
    runs = [read_run(run_dir), *(read_run(path) for path in seeds)]
    check_same_recipe(runs)
    twins = [read_run(path) for path in dense_twin]
    if twins:
        check_same_recipe(twins)
        check_comparable(runs, twins)
    main = runs[0]
    dataset_key = dataset or detect_dataset(main.config)
    if dataset_key is None:
        raise ValueError(f"cannot tell which dataset {main.run_dir} was trained on; pass --dataset (one of the keys of "
                         "convmoe.zoo.datasets.DATASETS).")
    info = get_dataset_info(dataset_key)
    if info.task != main.task:
        raise ValueError(f"dataset {dataset_key!r} is for {info.task}, but {main.run_dir} logged {main.task} metrics.")
    recipe, overrides = _commands(runs, config, recipes_dir)
    phases = [first_phase(run) for run in runs]  # read once: each is a run folder's checkpoint
    train_commands = _train_commands(phases, recipe, overrides, recipes_dir)
    twin_recipe, twin_overrides = _commands(twins, dense_config, recipes_dir) if twins else (None, [])
    twin_commands = (_train_commands([first_phase(twin) for twin in twins], twin_recipe, twin_overrides, recipes_dir)
                     if twins else [])

    model, _ = load_model(main.checkpoint)
    _check_variant_kind(model, model_id, twins, twin_of, dense_model_id)
    published = Path(zoo_dir) / model_id
    folder = _staging_folder(published, overwrite)  # written there, moved in once whole and checked
    try:
        device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = "float16" if float16 else "float32"

        # The weights: best checkpoint -> folder, then the folder must compute what the checkpoint does.
        export_weights(model, folder, base_recipe_for(main.config["model"]), float16=float16)
        loaded = from_pretrained(folder)
        loader = _val_loader(main.config, device)
        batch: Tensor = split_batch(next(iter(loader)))[0][:16]
        check = compare_outputs(model.to(device), loaded.to(device), batch.to(device))
        check_round_trip(check, dtype)
        reevaluated = reevaluate(folder, main, dtype, metric_tolerance)

        # The cost, on one val input; the dense twin on the same input.
        inputs = batch[:1].cpu()
        cost = measure_cost(loaded.cpu(), inputs)
        twin_model = load_model(twins[0].checkpoint)[0] if twins else None
        twin_cost = measure_cost(twin_model, inputs) if twin_model is not None else None
        latency = None
        if latency_reps > 0:
            timed = {"model": loaded, **({"dense_twin": twin_model} if twin_model is not None else {})}
            medians = measure_latency(timed, inputs, device, warmup=latency_warmup, reps=latency_reps)
            latency = {"ms": medians["model"], "dense_twin_ms": medians.get("dense_twin"),
                       "device": device_description(device), "batch": 1, "input": list(inputs.shape), "dtype": "float32",
                       "warmup": latency_warmup, "reps": latency_reps, "torch": str(torch.__version__)}

        patch_text, block_names = describe_moe(loaded)
        split = selection_split(main.config.get("val_dataset"))
        section = (routing_analysis(loaded, loader, main.config, folder, device, analysis_batches, hub_id,
                                     f"{info.name.split(' (')[0]}, {split} split")
                   if analysis and block_names else None)
        curves = training_curves(main, folder) if analysis and block_names else None
        if curves:
            section = f"{section}\n\n{curves}" if section else f"## Routing analysis\n\n{curves}"

        summary = summarize_runs(runs)
        meta: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "model_id": model_id, "hub_id": hub_id, "revision": None,
            "task": main.task, "dataset": dataset_key, "eval_split": split,
            "architecture": base_recipe_for(main.config["model"]).name,
            "initialization": describe_initialization(main.config, first_phase=phases[0] is not None),
            "patch": patch_text,
            **({"moe_blocks": block_names} if block_names else {"moe_model_ids": list(twin_of)}),
            **({"dense_model_id": dense_model_id} if dense_model_id else {}),
            "monitor": main.monitor, "metrics": summary["metrics"], "metrics_std": summary["metrics_std"],
            "seeds": summary["seeds"], "runs": summary["runs"], "published_seed": main.seed,
            "params": cost.params, "dense_params": cost.dense_params, "active_flops": cost.active_flops,
            "dense_flops": cost.dense_flops, "executed_flops": cost.executed_flops,
            "flops": {"input": list(inputs.shape), "method": cost.method, "block_ratio": cost.block_ratio},
            "latency": latency,
            "weights": {"dtype": dtype, "bytes": (folder / WEIGHTS_NAME).stat().st_size,
                        "sha256": file_sha256(folder / WEIGHTS_NAME), "check": asdict(check)},
            "reevaluated": reevaluated,
            "command": train_commands[0],
            "commands": {"train": train_commands,
                         "eval": eval_command(hub_id, recipe, overrides[0]),
                         **({"eval_test": eval_command(hub_id, recipe, overrides[0], split="test")}
                            if main.test_metrics else {})},
            "preprocessing": describe_preprocessing(main.config),
            "dense_twin": _twin_summary(twins, twin_cost, twin_commands) if twins else None,
            "references": method_references(loaded, main.config), "notes": list(notes), "convmoe_version": __version__,
        }
        if "per_class_iou" in summary:
            meta["per_class_iou"] = summary["per_class_iou"]
        meta = json.loads(json.dumps(meta))  # plain types only in the card (and an early error for anything else)
        front = build_front_matter(meta, license=license, base_model=base_model)
        card = folder / CARD_NAME
        card.write_text(render_card(front, section), encoding="utf-8")
        problems = check_variant(folder, load=False)
        if problems:
            raise ValueError(f"the published card of {model_id} fails the zoo schema: " + " ".join(problems))
        _move_in(folder, published)
    except BaseException:
        _remove_staging(folder)
        raise
    if update_index:
        write_index(zoo_dir)
    return PublishResult(folder=published, card=published / CARD_NAME, front_matter=front)
