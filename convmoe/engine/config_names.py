"""The names a training config may use: its sections and trainer settings. A near miss is a typo, and a typo is an
error naming the closest name, never a setting silently ignored."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from convmoe.formatting import did_you_mean

# Top-level keys the engine reads; any "<split>_dataset" too. Other keys are free values (``hyperparameters``).
SECTIONS = ("model", "loss", "optimizer", "scheduler", "scheduler_list", "data_loader", "trainer", "pl_trainer",
            "init_encoder_from", "init_from", "freeze_base", "freeze", "patch", "task", "train_dataset",
            "val_dataset", "test_dataset")
# Lightning Trainer keys that mean nothing here (torchrun decides the processes and nodes): passed over.
LAUNCHER_KEYS = ("devices", "num_nodes", "strategy")
SECTION_CUTOFF = 0.85  # this close to a section, a top-level key is a typo ("freeze_bsae" 0.91); "train" (0.83) is free


def check_section_names(config: Mapping[str, Any]) -> None:
    """Raise for a top-level key that is close to a section's name but is none (``scheduler_lst``).

    Raises:
        ValueError: The key and the section it probably meant.

    Example:
        >>> check_section_names({"hyperparameters": {}, "model": {}})
        >>> check_section_names({"freeze_bsae": {}})
        Traceback (most recent call last):
        ...
        ValueError: top-level key 'freeze_bsae' is no section (did you mean 'freeze_base'?); rename it, or give a free value a name unlike the sections (model, loss, optimizer, ...).
    """
    for key in config:
        if key in SECTIONS or str(key).endswith("_dataset"):
            continue
        hint = did_you_mean(key, SECTIONS, cutoff=SECTION_CUTOFF)
        if hint:
            raise ValueError(f"top-level key {key!r} is no section{hint}; rename it, or give a free value a name "
                             "unlike the sections (model, loss, optimizer, ...).")


def check_trainer_keys(section: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """Raise for a key of the ``trainer`` section that is no setting; under ``pl_trainer`` (Lightning's section),
    warn instead unless the key is a near miss of a setting.

    Raises:
        ValueError: The key, the closest setting and the settings there are.

    Example:
        >>> check_trainer_keys({"max_epoch": 3}, ["max_epochs", "seed"], "trainer")
        Traceback (most recent call last):
        ...
        ValueError: trainer has no setting 'max_epoch' (did you mean 'max_epochs'?); it takes max_epochs, seed.
    """
    known = sorted(known)
    unknown = [key for key in section if key not in known and key not in LAUNCHER_KEYS]
    for key in unknown:
        hint = did_you_mean(key, known)
        if hint or where != "pl_trainer":
            raise ValueError(f"{where} has no setting {key!r}{hint}; it takes {', '.join(known)}.")
    if unknown:
        warnings.warn(f"trainer settings {unknown} are not supported and are ignored; supported: {known}.",
                      UserWarning, stacklevel=3)
