"""The variants the zoo publishes, and the commands that train and publish them.

Nothing here is a result: a planned variant names its recipe, its dense twin's recipe and their
seeds. Its weight size is estimated from the recipe (the model built on the ``meta`` device), so
the plan can be checked against the zoo's 120 MB budget before any training.

The plan uses the CPU-budget recipes of ``configs/cpu/`` (no GPU has been available to this
project): 64 px CIFAR-10 for one epoch of 20,480 images, and half-resolution CamVid with
``decoder_channels=128`` for 6 epochs. At that size every CamVid routing fits the budget, MEDoE
included. The full recipes of ``configs/`` are listed in :data:`NOT_PUBLISHED` until a GPU session
trains them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from convmoe.zoo.datasets import get_dataset_info


@dataclass(frozen=True)
class PlannedVariant:
    """One variant the zoo means to publish.

    Attributes:
        model_id: The folder name and Hub repo name.
        config: The MoE recipe, relative to the repository root.
        dense_config: The dense twin's recipe (same recipe, dense model), or None.
        dataset: Key in :data:`convmoe.zoo.datasets.DATASETS`.
        seeds: ``trainer.seed`` values to train (the recipes default to seed 0).
        dense_seeds: The dense twin's seeds (default: ``seeds``).
        float16: Publish float16 weights.

    Example:
        >>> PLANNED[0].run_dir(0), PLANNED[0].run_dir(2)
        ('runs/cpu_cifar10_efficientnet_lite0_moe', 'runs/cpu_cifar10_efficientnet_lite0_moe_seed2')
    """

    model_id: str
    config: str
    dense_config: str | None
    dataset: str
    seeds: tuple[int, ...] = (0, 1, 2)
    dense_seeds: tuple[int, ...] | None = None
    float16: bool = True

    def seeds_of(self, config: str | None = None) -> tuple[int, ...]:
        """The seeds trained for ``config`` (the MoE recipe by default, or the dense twin's)."""
        if config is not None and config == self.dense_config and self.dense_seeds is not None:
            return self.dense_seeds
        return self.seeds

    def run_dir(self, seed: int, config: str | None = None) -> str:
        """Where ``convmoe train`` writes seed ``seed`` of ``config`` (default: the MoE recipe): the
        recipe's ``trainer.default_root_dir`` for its own seed, ``<that>_seed<N>`` for the others."""
        root, recipe_seed = _recipe_run_dir(config or self.config)
        return root if seed == recipe_seed else f"{root}_seed{seed}"

    def train_commands(self, config: str | None = None) -> list[str]:
        """One ``convmoe train`` per seed; other seeds than the recipe's write to ``<run dir>_seed<N>``."""
        config = config or self.config
        _, recipe_seed = _recipe_run_dir(config)
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
            parts += ["--dense-config", self.dense_config, "--dense-twin", *[self.run_dir(seed, self.dense_config) for seed in self.seeds_of(self.dense_config)]]
        if self.float16:
            parts.append("--float16")
        return shlex.join(parts)

    def data_command(self) -> str:
        """Unpack the dataset where the recipes look for it (``data.root``)."""
        return f"python shared/data/unpack.py {self.dataset} .data/{self.dataset}"


_REPOSITORY = Path(__file__).resolve().parents[2]


def _recipe_run_dir(config: str | Path) -> tuple[str, int]:
    """A recipe's ``trainer.default_root_dir`` and ``trainer.seed`` (the YAML relative to the working folder
    or to the repository); ``runs/<recipe stem>`` and seed 0 when the recipe does not set them or is absent."""
    from convmoe.engine.config import load_config

    path = Path(config)
    if not path.is_file() and (_REPOSITORY / path).is_file():  # run from another folder than the repository's
        path = _REPOSITORY / path
    trainer = (load_config(path).get("trainer") or {}) if path.is_file() else {}
    return str(trainer.get("default_root_dir") or f"runs/{path.stem}"), int(trainer.get("seed", 0))


_CIFAR_CPU = "configs/cpu/cifar10_efficientnet_lite0_{}.yaml"
_CAMVID_CPU = "configs/cpu/camvid_upernet_{}.yaml"

PLANNED: tuple[PlannedVariant, ...] = (
    PlannedVariant("efficientnet-lite0-moe8-cifar10", _CIFAR_CPU.format("moe"), _CIFAR_CPU.format("dense"), "cifar10"),
    PlannedVariant("upernet-lite0-moe8-camvid", _CAMVID_CPU.format("moe"), _CAMVID_CPU.format("dense"), "camvid"),
    PlannedVariant("upernet-lite0-moe8-expert-choice-camvid", _CAMVID_CPU.format("moe_expert_choice"),
                   _CAMVID_CPU.format("dense"), "camvid", seeds=(0,), dense_seeds=(0, 1, 2)),
    PlannedVariant("upernet-lite0-medoe8-camvid", _CAMVID_CPU.format("medoe"), _CAMVID_CPU.format("dense"), "camvid",
                   seeds=(0,), dense_seeds=(0, 1, 2)),
)

_FULL_RECIPE = ("the full-budget recipe (a GPU's worth of training); its CPU-budget version in configs/cpu/ is "
                "what the zoo publishes, until a GPU session trains this one")

# Recipes in configs/ that are not published, and why.
NOT_PUBLISHED: tuple[tuple[str, str], ...] = (
    (_CIFAR_CPU.format("dense"), "trained as the dense twin of the CIFAR-10 variant; its numbers are in its card"),
    (_CAMVID_CPU.format("dense"), "trained as the dense twin of the CamVid variants; its numbers are in their cards"),
    *((f"configs/{name}.yaml", _FULL_RECIPE) for name in (
        "cifar10_efficientnet_lite0_moe", "cifar10_efficientnet_lite0_dense", "camvid_upernet_moe",
        "camvid_upernet_moe_expert_choice", "camvid_upernet_medoe", "camvid_upernet_dense")),
)


def estimated_weight_bytes(config: str | Path, float16: bool = True) -> int:
    """Bytes of the tensors a recipe's model stores (float16 floats if asked), built on the ``meta``
    device: no memory, no weights loaded. ``model.safetensors`` adds a small header.

    Example:
        >>> estimated_weight_bytes("configs/cpu/cifar10_efficientnet_lite0_moe.yaml") // 10**6  # doctest: +SKIP
        8
    """
    from convmoe.engine.config import instantiate, load_config

    node = dict(load_config(config)["model"])
    for key, off in (("pretrained", False), ("encoder_weights", None)):
        if key in node:
            node[key] = off
    with torch.device("meta"):
        model = instantiate(node)
    return sum(t.numel() * (2 if float16 and t.is_floating_point() else t.element_size())
               for t in model.state_dict().values())


def check_plan(root: str | Path = ".") -> list[str]:
    """Problems of :data:`PLANNED` against a repository root: missing recipes, unknown datasets,
    repeated ids.

    Example:
        >>> check_plan("no/such/repo")[0]
        'planned recipe no/such/repo/configs/cpu/cifar10_efficientnet_lite0_moe.yaml does not exist.'
    """
    root = Path(root)
    problems = []
    for variant in PLANNED:
        for config in (variant.config, variant.dense_config):
            if config and not (root / config).is_file():
                problems.append(f"planned recipe {(root / config).as_posix()} does not exist.")
        try:
            get_dataset_info(variant.dataset)
        except ValueError as error:
            problems.append(str(error))
    ids = [v.model_id for v in PLANNED]
    if len(set(ids)) != len(ids):
        problems.append(f"planned model ids repeat: {ids}.")
    return problems
