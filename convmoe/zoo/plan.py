"""The variants the zoo plans to publish, and the commands a GPU session runs to publish them.

Nothing here is a result: a planned variant names its recipe, its dense twin's recipe and its
seeds. Its weight size is estimated from the recipe (the model built on the ``meta`` device), so
the plan can be checked against the zoo's 120 MB budget before any training.

Budget arithmetic (float16): the CIFAR-10 EfficientNet-Lite0 MoE is about 8.5 MB and each CamVid
UPerNet MoE about 54 MB (its 8-expert fusion block alone holds 19M parameters), so the zoo holds
the CIFAR-10 variant and two CamVid variants. The two CamVid variants are the two routings that
differ at inference (token choice, expert choice); MEDoE changes training only (at inference it
is the token-choice model), and the dense baselines are measured as dense twins in the cards.
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
        float16: Publish float16 weights.

    Example:
        >>> PLANNED[0].run_dir(0), PLANNED[0].run_dir(2)
        ('runs/cifar10_efficientnet_lite0_moe', 'runs/cifar10_efficientnet_lite0_moe_seed2')
    """

    model_id: str
    config: str
    dense_config: str | None
    dataset: str
    seeds: tuple[int, ...] = (0, 1, 2)
    float16: bool = True

    def run_dir(self, seed: int, config: str | None = None) -> str:
        """Where ``convmoe train`` writes seed ``seed`` of ``config`` (default: the MoE recipe)."""
        stem = Path(config or self.config).stem
        return f"runs/{stem}" if seed == self.seeds[0] else f"runs/{stem}_seed{seed}"

    def train_commands(self, config: str | None = None) -> list[str]:
        """One ``convmoe train`` per seed; seeds after the first write to ``runs/<recipe>_seed<N>``."""
        config = config or self.config
        commands = []
        for seed in self.seeds:
            extra = [] if seed == self.seeds[0] else [f"trainer.seed={seed}",
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
            parts += ["--dense-twin", *[self.run_dir(seed, self.dense_config) for seed in self.seeds]]
        if self.float16:
            parts.append("--float16")
        return shlex.join(parts)

    def data_command(self) -> str:
        """Unpack the dataset where the recipes look for it (``data.root``)."""
        return f"python shared/data/unpack.py {self.dataset} .data/{self.dataset}"


PLANNED: tuple[PlannedVariant, ...] = (
    PlannedVariant("efficientnet-lite0-moe8-cifar10", "configs/cifar10_efficientnet_lite0_moe.yaml",
                   "configs/cifar10_efficientnet_lite0_dense.yaml", "cifar10"),
    PlannedVariant("upernet-lite0-moe8-camvid", "configs/camvid_upernet_moe.yaml",
                   "configs/camvid_upernet_dense.yaml", "camvid"),
    PlannedVariant("upernet-lite0-moe8-expert-choice-camvid", "configs/camvid_upernet_moe_expert_choice.yaml",
                   "configs/camvid_upernet_dense.yaml", "camvid"),
)

# Recipes in configs/ that are not published, and why.
NOT_PUBLISHED: tuple[tuple[str, str], ...] = (
    ("configs/camvid_upernet_medoe.yaml",
     ("a third CamVid MoE (about 54 MB in float16) does not fit the 120 MB budget; MEDoE changes training only, "
      "so at inference it is the token-choice model")),
    ("configs/camvid_upernet_dense.yaml",
     "trained as the dense twin of the CamVid variants; its numbers are in their cards"),
    ("configs/cifar10_efficientnet_lite0_dense.yaml",
     "trained as the dense twin of the CIFAR-10 variant; its numbers are in its card"),
)


def estimated_weight_bytes(config: str | Path, float16: bool = True) -> int:
    """Bytes of the tensors a recipe's model stores (float16 floats if asked), built on the ``meta``
    device: no memory, no weights loaded. ``model.safetensors`` adds a small header.

    Example:
        >>> estimated_weight_bytes("configs/cifar10_efficientnet_lite0_moe.yaml") // 10**6  # doctest: +SKIP
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
        'planned recipe no/such/repo/configs/cifar10_efficientnet_lite0_moe.yaml does not exist.'
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
