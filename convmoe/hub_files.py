"""Where a checkpoint's files are: a local folder, or a Hugging Face Hub repo through its cache.

``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and ``HF_HOME`` are read when a file is resolved, not when
huggingface_hub was imported, so a test or a script can set them late.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from convmoe.formatting import did_you_mean

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "on", "yes", "true"}


def resolve_file(path_or_hub_id: str | os.PathLike[str], filename: str, revision: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local path of ``filename`` in a checkpoint folder or a Hub repo (downloaded to the cache).

    An existing folder wins over a Hub id spelled the same; ``"hf-hub:org/name"`` always means the
    Hub. Something that looks like a path (``/``, ``./``, ``~``, more than one ``/``, or ``zoo/x`` where
    ``zoo`` is a local folder of checkpoints) and does not exist is reported as a missing folder, never sent
    to the Hub.

    Raises:
        FileNotFoundError: No such folder or file; a Hub repo or file that cannot be had.
        ValueError: ``revision`` given for a local folder.

    Example:
        >>> resolve_file("/no/such/folder", "config.json")
        Traceback (most recent call last):
        ...
        FileNotFoundError: '/no/such/folder' is neither an existing folder nor a Hub repo id ('org/name'); check the path.
    """
    text = os.fspath(path_or_hub_id)
    hub_id = text.removeprefix("hf-hub:")
    local = Path(text).expanduser()
    if local.exists() and not text.startswith("hf-hub:"):
        if not local.is_dir():
            raise FileNotFoundError(f"{local} is a file; a convmoe checkpoint is the folder holding {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}.")
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos only; {local} is a local folder.")
        file = local / filename
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing; a convmoe checkpoint folder holds {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}. Save the model again with convmoe.save_pretrained.")
        return file
    if not _HUB_ID.match(hub_id):
        raise FileNotFoundError(f"{text!r} is neither an existing folder nor a Hub repo id ('org/name'); check the "
                                "path.")
    owner = Path(hub_id.partition("/")[0])
    checkpoints = [child for child in owner.iterdir() if (child / CONFIG_NAME).is_file()] if owner.is_dir() else []
    if not text.startswith("hf-hub:") and checkpoints:  # "zoo/typo": a path into a local folder of checkpoints
        siblings = sorted(f"{owner.name}/{child.name}" for child in checkpoints)
        hint = did_you_mean(text, siblings)
        raise FileNotFoundError(f"no folder {text!r}: {owner.name!r} is a local folder of checkpoints{hint}; write "
                                f"'hf-hub:{text}' for the Hub repo of that name.")
    try:
        return _hub_file(hub_id, filename, revision, cache_dir)
    except FileNotFoundError as error:
        if text.startswith("hf-hub:"):
            raise
        raise FileNotFoundError(f"{error} (No local folder {text!r} exists either.)") from error.__cause__


def _hub_offline() -> bool:
    """Offline mode, read now: huggingface_hub reads HF_HUB_OFFLINE once, at import."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if value is not None:
        return value.strip().lower() in _TRUE
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The Hub cache folder, from the environment as it is now: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``,
    else huggingface_hub's default.

    Example:
        >>> hub_cache_dir().name
        'hub'
    """
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def _hub_file(repo_id: str, filename: str, revision: str | None, cache_dir: str | os.PathLike[str] | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    offline = _hub_offline()
    where = f"Hub repo {repo_id!r} (revision {revision or 'main'!r})"
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache, local_files_only=offline))
    except LocalEntryNotFoundError as error:
        if offline:
            raise FileNotFoundError(f"{filename} of {where} is not in the Hub cache {cache} and huggingface_hub is "
                                    "offline (HF_HUB_OFFLINE=1); download it once with network access (unset "
                                    "HF_HUB_OFFLINE), set HF_HUB_CACHE to the cache that holds it, or pass a local "
                                    "folder.") from error
        raise FileNotFoundError(f"{filename} of {where} is not in the Hub cache {cache} and the Hub could not be "
                                f"reached ({error}); check the network, or pass a local folder.") from error
    except RevisionNotFoundError as error:
        raise FileNotFoundError(f"{where}: the revision does not exist; check the branch, tag or commit.") from error
    except EntryNotFoundError as error:
        raise FileNotFoundError(f"{where} has no {filename}; it is not a convmoe checkpoint (upload the folder "
                                "written by convmoe.save_pretrained).") from error
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(f"{where} was not found on the Hub (or it is private: log in with `hf auth login`); "
                                "check the id.") from error
