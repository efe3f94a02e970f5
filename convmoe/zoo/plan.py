"""The zoo's release plan, read from ``<zoo dir>/plan.yaml``: the variants, their recipes, seeds and budget.

The plan is data beside the zoo, not constants in the library, so an installed convmoe reads the
plan of whichever zoo folder it is given (``--zoo-dir``, default ``./zoo``)::

    root: ..                       # the recipes' paths are relative to this, relative to the zoo folder
    budget_bytes: 120000000        # the whole zoo folder, weights and cards
    data_command: convmoe data prepare {dataset} SOURCE .data/{dataset}   # optional; default: each dataset's own
    summary: The variants, their recipes and seeds ...
    variants:
      - {model_id: upernet-lite0-moe8-camvid, config: configs/cpu/camvid_upernet_moe.yaml,
         dense_config: configs/cpu/camvid_upernet_dense.yaml, dataset: camvid, seeds: [0, 1, 2],
         dense_model_id: upernet-lite0-dense-camvid}   # the dense twin is published too, as its own variant
    not_published:
      - {config: configs/camvid_upernet_moe.yaml, reason: the full-budget recipe}

Nothing in a plan is a result: a planned variant names its recipe, its dense twin's recipe and
their seeds; ``dense_model_id`` publishes the dense twin as a variant of its own (several MoE
variants of one dense recipe share it). Its weight size is estimated from the recipe (the model built on the ``meta``
device), so the plan can be checked against the budget before any training.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from convmoe.engine.config import instantiate, load_config
from convmoe.zoo.datasets import get_dataset_info

PLAN_NAME = "plan.yaml"


@dataclass(frozen=True)
class PlannedVariant:
    """One variant the zoo means to publish.

    Attributes:
        model_id: The folder name and Hub repo name.
        config: The MoE recipe, relative to the plan's root (the repository root).
        dense_config: The dense twin's recipe (same recipe, dense model), or None.
        dataset: Key in :data:`convmoe.zoo.datasets.DATASETS`.
        seeds: ``trainer.seed`` values to train (the recipes default to seed 0).
        dense_seeds: The dense twin's seeds (default: ``seeds``).
        float16: Publish float16 weights.
        root: The folder the recipes' paths are relative to (default: the working folder).
        data_template: The command that prepares ``{dataset}`` where the recipes look for it (default:
            the dataset's own, :attr:`~convmoe.zoo.datasets.DatasetInfo.prepare`).
        dense_model_id: Publish the dense twin as this variant too (None: only in this card).
        twin_of: For a dense variant (see :meth:`ZooPlan.dense_variants`), the MoE variants it is the twin of.

    Example:
        >>> variant = PlannedVariant("m", "configs/none.yaml", None, "camvid")
        >>> variant.run_dir(0), variant.run_dir(2)
        ('runs/none', 'runs/none_seed2')
    """

    model_id: str
    config: str
    dense_config: str | None
    dataset: str
    seeds: tuple[int, ...] = (0, 1, 2)
    dense_seeds: tuple[int, ...] | None = None
    float16: bool = True
    dense_model_id: str | None = None
    twin_of: tuple[str, ...] = ()
    root: Path = field(default=Path("."), compare=False, repr=False)
    data_template: str = field(default="", compare=False, repr=False)

    def seeds_of(self, config: str | None = None) -> tuple[int, ...]:
        """The seeds trained for ``config`` (the MoE recipe by default, or the dense twin's)."""
        if config is not None and config == self.dense_config and self.dense_seeds is not None:
            return self.dense_seeds
        return self.seeds

    def run_dir(self, seed: int, config: str | None = None) -> str:
        """Where ``convmoe train`` writes seed ``seed`` of ``config`` (default: the MoE recipe): the
        recipe's ``trainer.default_root_dir`` for its own seed, ``<that>_seed<N>`` for the others."""
        root, recipe_seed = _recipe_run_dir(self.root / (config or self.config))
        return root if seed == recipe_seed else f"{root}_seed{seed}"

    def train_commands(self, config: str | None = None) -> list[str]:
        """One ``convmoe train`` per seed; other seeds than the recipe's write to ``<run dir>_seed<N>``."""
        config = config or self.config
        _, recipe_seed = _recipe_run_dir(self.root / config)
        commands = []
        for seed in self.seeds_of(config):
            extra = [] if seed == recipe_seed else [f"trainer.seed={seed}",
                                                    f"trainer.default_root_dir={self.run_dir(seed, config)}"]
            commands.append(shlex.join(["convmoe", "train", config, *extra]))
        return commands

    def publish_command(self) -> str:
        """The ``convmoe zoo publish`` of this variant, from the runs :meth:`train_commands` write."""
        parts = ["convmoe", "zoo", "publish", self.run_dir(self.seeds[0]), "--model-id", self.model_id,
                 "--config", self.config]
        if len(self.seeds) > 1:
            parts += ["--seeds", *[self.run_dir(seed) for seed in self.seeds[1:]]]
        if self.dense_config:
            parts += ["--dense-config", self.dense_config, "--dense-twin",
                      *[self.run_dir(seed, self.dense_config) for seed in self.seeds_of(self.dense_config)]]
        if self.dense_model_id:
            parts += ["--dense-model-id", self.dense_model_id]
        if self.twin_of:
            parts += ["--twin-of", *self.twin_of]
        if self.float16:
            parts.append("--float16")
        return shlex.join(parts)

    def data_command(self) -> str:
        """Prepare the dataset where the recipes look for it: the plan's ``data_command``, or the dataset's own
        ``convmoe data prepare`` command."""
        if self.data_template:
            return self.data_template.format(dataset=self.dataset)
        return get_dataset_info(self.dataset).prepare


@dataclass(frozen=True)
class ZooPlan:
    """A zoo's ``plan.yaml``.

    Attributes:
        variants: The variants to publish.
        root: The folder the recipes' paths are relative to (the repository root).
        budget_bytes: Bytes the whole zoo folder may hold (None: no budget).
        summary: The paragraph that opens the plan section of ``zoo/README.md``.
        not_published: (recipe, reason) for recipes deliberately left out.
        path: The plan file.

    Example:
        >>> ZooPlan(variants=()).budget_bytes is None
        True
    """

    variants: tuple[PlannedVariant, ...]
    root: Path = Path(".")
    budget_bytes: int | None = None
    summary: str = ""
    not_published: tuple[tuple[str, str], ...] = ()
    path: Path | None = None

    def dense_variants(self) -> tuple[PlannedVariant, ...]:
        """The dense twins published as variants: one per ``dense_model_id``, trained from the dense
        recipe with the dense seeds, ``twin_of`` the MoE variants that name it.

        Example:
            >>> moe = PlannedVariant("a-moe", "moe.yaml", "dense.yaml", "camvid", dense_model_id="a-dense")
            >>> [(v.model_id, v.config, v.twin_of) for v in ZooPlan((moe,)).dense_variants()]
            [('a-dense', 'dense.yaml', ('a-moe',))]
        """
        twins: dict[str, PlannedVariant] = {}
        for variant in self.variants:
            if not variant.dense_model_id or not variant.dense_config:
                continue
            known = twins.get(variant.dense_model_id)
            twin_of = (*known.twin_of, variant.model_id) if known else (variant.model_id,)
            twins[variant.dense_model_id] = replace(
                variant, model_id=variant.dense_model_id, config=variant.dense_config, dense_config=None,
                seeds=variant.seeds_of(variant.dense_config), dense_seeds=None, dense_model_id=None, twin_of=twin_of)
        return tuple(twins.values())


_PLAN_KEYS = {"root", "budget_bytes", "data_command", "summary", "variants", "not_published"}
_VARIANT_KEYS = {f.name for f in fields(PlannedVariant)} - {"root", "data_template", "twin_of"}


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in value):
        raise ValueError(f"{where} must be a non-empty list of integers, got {value!r}.")
    return tuple(value)


def _variant(entry: Any, index: int, path: Path, root: Path, data_template: str) -> PlannedVariant:
    where = f"{path} variants[{index}]"
    if not isinstance(entry, Mapping):
        # a malformed file is a wrong value to its reader: ValueError, which check_zoo reports
        raise ValueError(f"{where} must be a mapping with model_id, config, dense_config, dataset, seeds; "  # noqa: TRY004
                         f"got {entry!r}.")
    unknown = sorted(set(entry) - _VARIANT_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; allowed: {sorted(_VARIANT_KEYS)}.")
    missing = [key for key in ("model_id", "config", "dataset") if not isinstance(entry.get(key), str)]
    if missing:
        raise ValueError(f"{where} needs {', '.join(missing)} (text).")
    values = dict(entry)
    values.setdefault("dense_config", None)
    if "seeds" in values:
        values["seeds"] = _seeds(values["seeds"], f"{where}.seeds")
    if values.get("dense_model_id") is not None and not isinstance(values["dense_model_id"], str):
        raise ValueError(f"{where}.dense_model_id must be a model id (text), got {values['dense_model_id']!r}.")
    if values.get("dense_seeds") is not None:
        values["dense_seeds"] = _seeds(values["dense_seeds"], f"{where}.dense_seeds")
    return PlannedVariant(**values, root=root, data_template=data_template)


def load_plan(zoo_dir: str | Path) -> ZooPlan | None:
    """The plan of ``zoo_dir`` (its ``plan.yaml``), or None when the zoo has none.

    Raises:
        ValueError: A plan that is not a mapping, unknown keys, or a malformed variant (named).

    Example:
        >>> load_plan("no/such/zoo") is None
        True
    """
    path = Path(zoo_dir) / PLAN_NAME
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} must hold a mapping (root, budget_bytes, variants, ...), "  # noqa: TRY004 (as above)
                         f"got {type(data).__name__}.")
    unknown = sorted(set(data) - _PLAN_KEYS)
    if unknown:
        raise ValueError(f"{path} has unknown keys {unknown}; allowed: {sorted(_PLAN_KEYS)}.")
    budget = data.get("budget_bytes")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0):
        raise ValueError(f"{path} budget_bytes={budget!r} must be a positive integer (bytes).")
    root = (path.parent / str(data.get("root", "."))).resolve()
    template = str(data.get("data_command") or "")
    variants = tuple(_variant(entry, i, path, root, template) for i, entry in enumerate(data.get("variants") or []))
    not_published = []
    for i, entry in enumerate(data.get("not_published") or []):
        if not isinstance(entry, Mapping) or set(entry) != {"config", "reason"}:
            raise ValueError(f"{path} not_published[{i}] must be a mapping with config and reason, got {entry!r}.")
        not_published.append((str(entry["config"]), str(entry["reason"])))
    return ZooPlan(variants, root, budget, str(data.get("summary") or ""), tuple(not_published), path)


def _recipe_run_dir(config: Path) -> tuple[str, int]:
    """A recipe's ``trainer.default_root_dir`` and ``trainer.seed``; ``runs/<recipe stem>`` and seed 0
    when the recipe does not set them or is absent."""
    trainer = (load_config(config).get("trainer") or {}) if config.is_file() else {}
    return str(trainer.get("default_root_dir") or f"runs/{config.stem}"), int(trainer.get("seed", 0))


def estimated_weight_bytes(config: str | Path, float16: bool = True) -> int:
    """Bytes of the tensors a recipe's model stores (float16 floats if asked), built on the ``meta``
    device: no memory, no weights loaded. ``model.safetensors`` adds a small header.

    Example:
        >>> estimated_weight_bytes("configs/cpu/cifar10_efficientnet_lite0_moe.yaml") // 10**6  # doctest: +SKIP
        8
    """
    node = dict(load_config(config)["model"])
    for key, off in (("pretrained", False), ("encoder_weights", None)):
        if key in node:
            node[key] = off
    with torch.device("meta"):
        model = instantiate(node)
    return sum(t.numel() * (2 if float16 and t.is_floating_point() else t.element_size())
               for t in model.state_dict().values())


def check_plan(plan: ZooPlan) -> list[str]:
    """Problems of a plan: missing recipes, unknown datasets, repeated ids.

    Example:
        >>> check_plan(ZooPlan((PlannedVariant("m", "no/such.yaml", None, "camvid"),), root=Path("repo")))
        ['planned recipe repo/no/such.yaml does not exist.']
    """
    problems = []
    for variant in plan.variants:
        for config in (variant.config, variant.dense_config):
            if config and not (plan.root / config).is_file():
                problems.append(f"planned recipe {(plan.root / config).as_posix()} does not exist.")
        try:
            get_dataset_info(variant.dataset)
        except ValueError as error:
            problems.append(str(error))
    for variant in plan.variants:
        if variant.dense_model_id and not variant.dense_config:
            problems.append(f"planned variant {variant.model_id} has dense_model_id {variant.dense_model_id!r} but no "
                            "dense_config; name the dense twin's recipe.")
    for twin in plan.dense_variants():
        sources = [v for v in plan.variants if v.dense_model_id == twin.model_id]
        if len({(v.dense_config, v.seeds_of(v.dense_config), v.dataset) for v in sources}) > 1:
            problems.append(f"the planned variants {[v.model_id for v in sources]} share dense_model_id "
                            f"{twin.model_id!r} but not its dense_config, dense seeds and dataset; give each twin its "
                            "own id.")
    ids = [v.model_id for v in (*plan.variants, *plan.dense_variants())]
    if len(set(ids)) != len(ids):
        problems.append(f"planned model ids repeat: {ids}.")
    return problems
