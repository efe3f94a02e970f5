"""A recipe's names are checked, so that nothing is silently lost or ignored: a second run into a folder that
holds one is refused (not overwritten), a misspelt trainer setting or section is an error naming the
closest name, and a bad value of a built target names the section."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from test_engine import classification_config

from convmoe.engine import Trainer
from convmoe.engine.config import apply_override, load_config
from convmoe.engine.config_check import check_training_config
from convmoe.engine.settings import TrainerSettings


def test_a_second_run_into_a_folder_that_holds_one_is_refused(tmp_path):
    Trainer(classification_config(tmp_path / "run")).fit()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds a run \(checkpoints/last\.pt\); continue it with "
                                              r"trainer\.resume=auto, or train into another trainer\.default_root_dir"):
        Trainer(classification_config(tmp_path / "run"))
    assert last.read_bytes() == before
    config = classification_config(tmp_path / "run")
    config["trainer"]["resume"] = "auto"
    Trainer(config).fit()  # continuing is what the message offers: it works


@pytest.mark.parametrize(("key", "closest"), [("epochz", "max_epochs"), ("max_epoch", "max_epochs"),
                                              ("resum", "resume")])
def test_a_misspelt_trainer_setting_is_an_error_with_the_closest_name(tmp_path, key, closest):
    config = classification_config(tmp_path / "run")
    config["trainer"][key] = 3
    with pytest.raises(ValueError, match=rf"trainer has no setting '{key}' \(did you mean '{closest}'\?\)"):
        Trainer(config)


def test_an_unknown_trainer_setting_is_an_error_but_lightnings_own_keys_warn_under_pl_trainer(tmp_path):
    config = classification_config(tmp_path / "run")
    config["trainer"]["callbacks"] = []
    with pytest.raises(ValueError, match=r"trainer has no setting 'callbacks'; it takes .*max_epochs"):
        Trainer(config)
    config = classification_config(tmp_path / "run")
    config["pl_trainer"] = {**config.pop("trainer"), "callbacks": []}
    with pytest.warns(UserWarning, match=r"\['callbacks'\] are not supported"):
        Trainer(config)


def test_an_override_of_a_misspelt_trainer_key_names_the_closest_setting():
    config = {"trainer": {"max_epochs": 10}}
    with pytest.raises(ValueError, match=r"no key 'trainer\.epochz' in the config \(did you mean "
                                         r"'trainer\.max_epochs'\?\)"):
        apply_override(config, "trainer.epochz=3")


@pytest.mark.parametrize(("section", "closest"), [("scheduler_lst", "scheduler_list"), ("freeze_bsae", "freeze_base"),
                                                  ("optimiser", "optimizer"), ("init_form", "init_from")])
def test_a_misspelt_section_is_an_error_with_the_closest_name(tmp_path, section, closest):
    config = classification_config(tmp_path / "run")
    config[section] = {}
    with pytest.raises(ValueError, match=rf"top-level key '{section}' is no section \(did you mean '{closest}'\?\)"):
        load_config(config)


def test_free_values_unlike_any_section_stay_free(tmp_path):
    config = classification_config(tmp_path / "run")
    config.update(hyperparameters={"lr": 0.1}, data={"root": "x"}, notes="anything")
    assert load_config(config)["notes"] == "anything"


def test_a_bad_value_of_a_built_target_names_it(tmp_path):
    config = classification_config(tmp_path / "run")
    config["optimizer"]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"building torch\.optim\.SGD: Invalid learning rate: -1\.0; fix the values "
                                         r"of that _target_"):
        Trainer(config)


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")))
def test_every_shipped_recipe_passes_the_name_checks_without_a_warning(recipe):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load_config(REPO / recipe)
        check_training_config(config, TrainerSettings, required=("model", "loss", "optimizer", "train_dataset"))
        TrainerSettings.from_config(config)
