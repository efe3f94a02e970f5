"""Publishing runs that start from other runs (sparse upcycling of a trained dense model): their cards give the
first phase's command before each seed's own, and those commands rebuild both runs' configs."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest
from test_engine import classification_config
from test_zoo import front, write_recipe

from convmoe.engine import load_checkpoint, load_config, train
from convmoe.zoo import publish, read_run
from convmoe.zoo.runs import check_same_recipe, first_phase
from convmoe.zoo.schema import check_variant

PATCH = "+patch={targets: layer4.*.conv2, config: {num_experts: 4, top_k: 1, tokens: image}}"


@pytest.fixture(scope="module")
def phases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two seeds of a dense recipe, and each continued as an upcycled MoE from its own best checkpoint."""
    work = tmp_path_factory.mktemp("phases")
    recipe = write_recipe(work / "dense.yaml", classification_config(work / "dense"))
    runs = {"work": work, "recipe": recipe}
    for seed in (0, 1):
        base, moe = work / f"base{seed}", work / f"moe{seed}"
        train(recipe, [f"+trainer.seed={seed}", f"trainer.default_root_dir={base}"])
        train(recipe, [f"+trainer.seed={seed}", f"trainer.default_root_dir={moe}",
                       f"+init_from={base / 'checkpoints' / 'best.pt'}", "optimizer.lr=0.01", PATCH])
        runs[f"base{seed}"], runs[f"moe{seed}"] = base, moe
    return runs


def test_a_continued_run_names_its_first_phase(phases):
    run = read_run(phases["moe1"])
    assert first_phase(run).run_dir == phases["base1"]
    assert first_phase(read_run(phases["base1"])) is None  # started from the model section's weights


def test_the_card_gives_each_seeds_first_phase_before_its_own_command(phases):
    zoo_dir = phases["work"] / "zoo"
    publish(phases["moe0"], "tiny-upcycled", seeds=[phases["moe1"]], config=phases["recipe"],
            recipes_dir=phases["work"], zoo_dir=zoo_dir, latency_reps=0, analysis=False)
    assert check_variant(zoo_dir / "tiny-upcycled") == []
    meta = front(zoo_dir, "tiny-upcycled")["convmoe"]
    for line, seed in zip(meta["commands"]["train"], (0, 1), strict=True):
        first, second = line.split(" && ")
        for command, run in ((first, f"base{seed}"), (second, f"moe{seed}")):
            program, subcommand, recipe, *overrides = shlex.split(command)
            assert (program, subcommand, Path(recipe)) == ("convmoe", "train", phases["recipe"])
            assert load_config(recipe, overrides) == load_checkpoint(phases[run] / "checkpoints" / "best.pt")["config"]
    assert meta["command"] == meta["commands"]["train"][0]
    assert "the first phase" in meta["initialization"]
    # what the weights were trained from is no input of their evaluation (and no reader has those checkpoints)
    assert "init_from" not in meta["commands"]["eval"]
    assert "patch" not in meta["commands"]["eval"]
    assert meta["commands"]["eval"] == f"convmoe eval convmoe/tiny-upcycled optimizer.lr=0.01 --config {phases['recipe']}"


def test_seeds_whose_first_phases_differ_in_recipe_are_refused(phases, tmp_path):
    # seed 1's first phase as another recipe would have made it: a different learning rate
    other = tmp_path / "base1"
    train(phases["recipe"], ["+trainer.seed=1", f"trainer.default_root_dir={other}", "optimizer.lr=0.02"])
    moe1 = read_run(phases["moe1"])
    moved = dataclasses.replace(moe1, config={**moe1.config, "init_from": str(other / "checkpoints" / "best.pt")})
    with pytest.raises(ValueError, match=r"first phases of .* are not seeds of one recipe: .*differ in \['optimizer.lr'\]"):
        check_same_recipe([read_run(phases["moe0"]), moved])


def test_a_start_that_names_no_run_folder_is_named(phases):
    moe1 = read_run(phases["moe1"])
    elsewhere = dataclasses.replace(moe1, config={**moe1.config, "init_from": "gone/checkpoints/best.pt"})
    with pytest.raises(ValueError, match=r"differ in \['init_from'\].*init_from names no run folder here"):
        check_same_recipe([read_run(phases["moe0"]), elsewhere])
