"""Resuming a run: restore a checkpoint's model, optimizer and RNG states, or say in one sentence why not."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convmoe.engine.checkpoint import restore_rng_state
from convmoe.formatting import listing
from convmoe.state_dicts import compare_states

_FIX = "resume with the config the run was trained with, or start a new run (a new trainer.default_root_dir)."


def resume_path(resume: str | None, checkpoint_dir: Path) -> Path | None:
    """The checkpoint ``trainer.resume`` names: None, a path, or ``"auto"`` (``last.pt`` if it exists).

    Raises:
        FileExistsError: ``resume`` is None and ``checkpoint_dir`` already holds a run: a new run would
            overwrite it.
    """
    if resume is None:
        if (checkpoint_dir / "last.pt").is_file():
            raise FileExistsError(f"{checkpoint_dir.parent} already holds a run (checkpoints/last.pt); continue it "
                                  "with trainer.resume=auto, or train into another trainer.default_root_dir (or delete "
                                  "the folder to start again).")
        return None
    if resume == "auto":
        path = checkpoint_dir / "last.pt"
        return path if path.is_file() else None
    return Path(resume)


def trainer_section(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A config's ``trainer`` (or ``pl_trainer``) section; empty without one."""
    config = config or {}
    return config.get("trainer") or config.get("pl_trainer") or {}


def _config_differences(saved: Any, current: Any, prefix: str) -> list[str]:
    """Dotted keys where two config sections differ, with both values (``a.b (4 -> 2)``)."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        return [difference for key in sorted(set(saved) | set(current), key=str)
                for difference in _config_differences(saved.get(key), current.get(key), f"{prefix}.{key}")]
    return [] if saved == current else [f"{prefix} ({saved!r} -> {current!r})"]


def load_model_state(model: nn.Module, saved: Mapping[str, Any], where: str, saved_config: Mapping[str, Any],
                     config: Mapping[str, Any]) -> None:
    """Load ``saved`` into ``model``; a mismatch names the keys and where the configs differ."""
    difference = compare_states(model.state_dict(), saved)
    problems = []
    shapes = [f"{name!r} (checkpoint {given}, model {wanted})" for name, given, wanted in difference.mismatched]
    missing = [repr(name) for name in difference.missing]
    unexpected = [repr(name) for name in difference.unexpected]
    for label, names in (("shapes differ at", shapes), ("missing", missing), ("unexpected", unexpected)):
        if names:
            problems.append(f"{label} {listing(names, quote=False, limit=3)}")
    if not problems:
        model.load_state_dict(saved)
        return
    changed = (_config_differences(saved_config["model"], config.get("model"), "model")
               if "model" in saved_config else [])
    hint = f"; the config differs from the checkpoint's at {listing(changed, quote=False, limit=3)}" if changed else ""
    raise ValueError(f"{where} does not match the model: {'; '.join(problems)}{hint}; {_FIX}")


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], where: str,
                         saved_config: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Load ``saved`` into ``optimizer``; another optimizer class or parameter layout is a one-line error."""
    saved_target = (saved_config.get("optimizer") or {}).get("_target_")
    target = (config.get("optimizer") or {}).get("_target_")
    if saved_target and target and saved_target != target:
        raise ValueError(f"{where} was trained with optimizer {saved_target}, the config builds {target}; {_FIX}")
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError) as error:
        reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ValueError(f"{where}'s optimizer state does not fit the optimizer ({reason}); {_FIX}") from error


def restore_rng(state: Mapping[str, Any], where: str, rank: int, world_size: int,
                generator: torch.Generator | None) -> None:
    """Restore this process's RNG states and the loader's ``generator`` (a no-op for old checkpoints)."""
    rng = state.get("rng")
    if not rng:
        warnings.warn(f"{where} has no RNG states (written by an older convmoe); training resumes, but the data "
                      "order and random streams differ from the uninterrupted run's, so the continuation is not "
                      "exact.", UserWarning, stacklevel=3)
        return
    if len(rng) != world_size:
        warnings.warn(f"{where} holds the RNG states of {len(rng)} processes, this run has "
                      f"{world_size}; the random streams restart, so the continuation is not exact.",
                      UserWarning, stacklevel=3)
        return
    restore_rng_state(rng[rank])
    saved = rng[rank].get("loader_generator")
    if generator is not None and saved is not None:
        generator.set_state(saved.cpu())
