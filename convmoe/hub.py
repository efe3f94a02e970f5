"""Save and load patched models: ``config.json`` (base recipe + patch spec) and ``model.safetensors``.

A checkpoint folder, local or a Hugging Face Hub repo::

    config.json        {"format": "convmoe", "format_version": 1, "convmoe_version": ...,
                        "base": {"library": "timm", "name": "resnet18", "kwargs": {...}},
                        "patch": <convmoe.patch_spec(model)>, "save_id": ...}
    model.safetensors  the state dict (tensors that share memory stored once)

Loading rebuilds the base model without downloading its weights, re-applies the patch spec, and
loads the state dict strictly. Both files are written to temporary files in the target folder,
fsynced and renamed, so an interrupted save never leaves a half-written file; ``save_id`` ties the
two files of one save together so a mixed pair is detected.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from convmoe.factory import RECIPE_ERROR_ATTRIBUTE, BaseRecipe, infer_recipe, record_recipe

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "convmoe"
FORMAT_VERSION = 1
_ALIASES_KEY = "convmoe_aliases"
_SAVE_ID_KEY = "convmoe_save_id"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "on", "yes", "true"}


def save_pretrained(model: nn.Module, path: str | os.PathLike[str],
                    base: str | Mapping[str, Any] | BaseRecipe | Callable[..., nn.Module] | None = None) -> Path:
    """Write ``model`` (patched or not) to the folder ``path`` as ``config.json`` + ``model.safetensors``.

    Args:
        model: The model to save.
        path: The folder; created if needed. Its other files are kept; the two checkpoint files are
            replaced atomically.
        base: How to rebuild the unpatched model: ``"timm:NAME"``, ``"smp:ARCH"``, ``"module:function"``,
            a dict ``{"library", "name", "kwargs"}``, a :class:`~convmoe.factory.BaseRecipe` or an
            importable function. None takes it from the model (``convmoe.create_model``,
            ``from_pretrained``, smp's init config, timm's ``pretrained_cfg``).

    Returns:
        The folder.

    Raises:
        ValueError: No ``base`` and none can be inferred; a recipe that does not rebuild the model's
            tensors; keyword arguments that are not JSON-ready.

    Example:
        >>> import convmoe, tempfile
        >>> model = convmoe.create_model("timm:test_resnet", num_classes=10)
        >>> folder = save_pretrained(model, tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.iterdir())
        ['config.json', 'model.safetensors']
    """
    from convmoe import __version__
    from convmoe.patch import patch_spec

    recipe = _resolve_base(model, base)
    state = model.state_dict()
    spec = patch_spec(model)
    _check_recipe_rebuilds(recipe, spec, state)
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "convmoe_version": __version__,
        "base": recipe.to_dict(),
        "patch": spec,
        "save_id": uuid.uuid4().hex,
    }
    tensors, aliases = _dedupe_shared(state)
    metadata = {"format": "pt", _SAVE_ID_KEY: config["save_id"], _ALIASES_KEY: json.dumps(aliases, sort_keys=True)}
    config_text = json.dumps(config, indent=2, sort_keys=False) + "\n"

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    # Weights first: a crash before the config is renamed leaves either the old pair or a pair whose
    # save_id differ, which from_pretrained reports instead of loading mixed files.
    with _atomic_file(folder / WEIGHTS_NAME) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    with _atomic_file(folder / CONFIG_NAME) as temporary:
        temporary.write_text(config_text, encoding="utf-8")
    _fsync_directory(folder)
    return folder


def from_pretrained(path_or_hub_id: str | os.PathLike[str], revision: str | None = None,
                    map_location: str | torch.device = "cpu", strict: bool = True,
                    cache_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """Load a model saved by :func:`save_pretrained`, from a folder or a Hugging Face Hub repo.

    The base model is rebuilt from the recipe without downloading its weights, the patch spec is
    applied, and ``model.safetensors`` is loaded; tensors stored in another floating dtype (the
    float16 zoo variants) are cast to the rebuilt model's dtype, float32. Hub files go through
    huggingface_hub's cache, so ``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE`` and ``HF_HOME`` work (read
    when this function is called).

    Args:
        path_or_hub_id: A local folder, or a Hub repo id ``"org/name"`` (``"hf-hub:org/name"`` too); an
            existing folder wins over a Hub id spelled the same.
        revision: Hub branch, tag or commit (default ``"main"``); not allowed for a local folder.
        map_location: Device the loaded model is moved to.
        strict: Require the checkpoint's tensors to match the rebuilt model's exactly; with False,
            missing and unexpected tensors are skipped (shape mismatches are always an error).
        cache_dir: Hub cache folder; default ``HF_HUB_CACHE``, else ``$HF_HOME/hub``.

    Returns:
        The model in eval mode, with its base recipe recorded (so it can be saved again as is).

    Raises:
        FileNotFoundError: No such folder, a missing file, or a Hub repo that is not in the cache
            while offline.
        ValueError: A config from a newer format version or not a convmoe config; corrupt or truncated
            weights; weights that do not match the config (missing, unexpected, shape mismatch).

    Example:
        >>> import convmoe, tempfile
        >>> model = convmoe.create_model("timm:test_resnet", num_classes=10)
        >>> folder = save_pretrained(model, tempfile.mkdtemp())
        >>> from_pretrained(folder).num_classes
        10
    """
    from convmoe.patch import apply_spec

    config_path, weights_path = _resolve_files(path_or_hub_id, revision, cache_dir)
    config = read_config(config_path)
    state, metadata = _read_weights(weights_path)
    saved_id, config_id = metadata.get(_SAVE_ID_KEY), config.get("save_id")
    if saved_id and config_id and saved_id != config_id:
        raise ValueError(f"{config_path} and {weights_path} come from different saves (an interrupted save or files "
                         "copied from two checkpoints); save the model again with convmoe.save_pretrained.")
    recipe = BaseRecipe.from_dict(config["base"])
    model = recipe.build()
    apply_spec(model, config["patch"], upcycle=False)
    _load_state(model, state, strict, where=str(weights_path))
    record_recipe(model, recipe)
    return model.to(map_location).eval()


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a checkpoint's ``config.json`` (a folder or the file itself).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Not JSON, not a convmoe config, or written by a newer format version.

    Example:
        >>> import convmoe, tempfile
        >>> folder = save_pretrained(convmoe.create_model("timm:test_resnet"), tempfile.mkdtemp())
        >>> read_config(folder)["base"]["name"]
        'test_resnet'
    """
    from convmoe import __version__

    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint config {path} does not exist; a convmoe checkpoint folder holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME}, written by convmoe.save_pretrained.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the file is corrupt, save the model again.") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT_NAME \
            or not isinstance(config.get("format_version"), int):
        raise ValueError(f"{path} is not a convmoe checkpoint config (it needs \"format\": \"{FORMAT_NAME}\" and an "
                         "integer \"format_version\"); point to a folder written by convmoe.save_pretrained.")
    version = config["format_version"]
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version}, written by convmoe {config.get('convmoe_version', '?')}; "
                         f"this convmoe {__version__} reads format_version <= {FORMAT_VERSION}. Upgrade: "
                         "pip install -U convmoe.")
    for key in ("base", "patch"):
        if key not in config:
            raise ValueError(f"{path} lacks {key!r}; the file is corrupt or hand-edited, save the model again.")
    return config


# -- resolving a folder or a Hub id -------------------------------------------------------------------


def _resolve_files(path_or_hub_id: str | os.PathLike[str], revision: str | None,
                   cache_dir: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    text = os.fspath(path_or_hub_id)
    hub_id = text.removeprefix("hf-hub:")
    local = Path(text).expanduser()
    if local.exists() and not text.startswith("hf-hub:"):
        if not local.is_dir():
            raise FileNotFoundError(f"{local} is a file; from_pretrained needs the checkpoint folder holding "
                                    f"{CONFIG_NAME} and {WEIGHTS_NAME}.")
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos only; {local} is a local folder.")
        files = (local / CONFIG_NAME, local / WEIGHTS_NAME)
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{file} is missing; a convmoe checkpoint folder holds {CONFIG_NAME} and "
                                        f"{WEIGHTS_NAME}. Save the model again with convmoe.save_pretrained.")
        return files
    if not _HUB_ID.match(hub_id):
        raise FileNotFoundError(f"{text!r} is neither an existing folder nor a Hub repo id ('org/name'); check the "
                                "path.")
    try:
        return (_hub_file(hub_id, CONFIG_NAME, revision, cache_dir),
                _hub_file(hub_id, WEIGHTS_NAME, revision, cache_dir))
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


# -- weights -------------------------------------------------------------------------------------------


def _dedupe_shared(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors to write, with names that alias an identical view stored once (tied weights).

    safetensors refuses tensors that share memory. An exact alias (same storage, offset, shape,
    stride, dtype) is written once and restored by name; any other overlap is copied.
    """
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen_views: dict[tuple[Any, ...], str] = {}
    seen_storages: set[tuple[str, int]] = set()
    for name, tensor in state.items():
        tensor = tensor.detach()
        storage = tensor.untyped_storage()
        storage_key = (str(tensor.device), storage.data_ptr())
        view_key = (*storage_key, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() > 0 and view_key in seen_views:
            aliases[name] = seen_views[view_key]
            continue
        shares_memory = tensor.numel() > 0 and storage_key in seen_storages
        if tensor.numel() > 0:
            seen_views[view_key] = name
            seen_storages.add(storage_key)
        contiguous = tensor.contiguous()
        is_whole = contiguous.untyped_storage().nbytes() == contiguous.numel() * contiguous.element_size()
        tensors[name] = contiguous.clone() if shares_memory or not is_whole else contiguous
    return {name: t.cpu() for name, t in tensors.items()}, aliases


def _read_weights(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        size = path.stat().st_size if path.exists() else 0
        raise ValueError(f"{path} is not a readable safetensors file ({size} bytes; {type(error).__name__}: {error}); "
                         "it is corrupt or truncated. Save the model again, or for a Hub repo delete the cached "
                         "file (huggingface-cli delete-cache) and download it again.") from None
    try:
        aliases = json.loads(metadata.get(_ALIASES_KEY, "{}"))
    except json.JSONDecodeError:
        raise ValueError(f"{path} has corrupt convmoe metadata ({_ALIASES_KEY}); save the model again.") from None
    for name, source in aliases.items():
        if source not in state:
            raise ValueError(f"{path}: tensor {name!r} aliases {source!r}, which the file lacks; it is corrupt, save "
                             "the model again.")
        state[name] = state[source]
    return state, metadata


def _load_state(model: nn.Module, state: dict[str, Tensor], strict: bool, where: str) -> None:
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    mismatched = [f"{name!r}: checkpoint {tuple(state[name].shape)} vs model {tuple(tensor.shape)}"
                  for name, tensor in expected.items() if name in state and state[name].shape != tensor.shape]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch {_listing(mismatched, quote=False)}")
    if strict and missing:
        problems.append(f"missing {_listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    if problems:
        fix = ("the weights were saved from a different model than config.json describes; save the model again "
               "with convmoe.save_pretrained")
        if not mismatched:
            fix += ", or pass strict=False to load only the tensors that match"
        raise ValueError(f"weights in {where} do not match config: {'; '.join(problems)}. Cause: {fix}.")
    model.load_state_dict({name: tensor for name, tensor in state.items() if name in expected}, strict=strict)


def _listing(items: list[str], quote: bool = True, limit: int = 8) -> str:
    shown = [repr(item) if quote else item for item in items[:limit]]
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(shown) + more


# -- recipes -------------------------------------------------------------------------------------------


def _resolve_base(model: nn.Module, base: Any) -> BaseRecipe:
    if base is not None:
        return BaseRecipe.parse(base)
    recipe = infer_recipe(model)
    if recipe is None:
        reason = getattr(model, RECIPE_ERROR_ATTRIBUTE, None)
        because = f" (its recipe was not recorded: {reason})" if reason else ""
        raise ValueError(f"save_pretrained cannot tell how to rebuild this {type(model).__name__}{because}: pass base=, "
                         "e.g. base='timm:resnet18', base={'library': 'smp', 'name': 'Unet', 'kwargs': {...}} or "
                         "base='my_pkg.nets:build' (or build it with convmoe.create_model, which records it).")
    return recipe


def _check_recipe_rebuilds(recipe: BaseRecipe, spec: dict[str, Any], state: Mapping[str, Tensor]) -> None:
    """Rebuild the base on the meta device, re-apply the patch spec, and compare tensor names and shapes.

    Catches a wrong or inferred recipe at save time rather than at load time. A user factory that
    cannot build on the meta device is not checked here (from_pretrained still checks when loading).
    """
    from convmoe.patch import apply_spec

    try:
        with torch.device("meta"):
            rebuilt = recipe.build()
    except Exception as error:
        if recipe.library == "factory":  # a user builder may not run on meta; from_pretrained still checks
            return
        raise ValueError(f"the base recipe {recipe.to_dict()} cannot be built ({type(error).__name__}: {error}); "
                         "pass the right base= to save_pretrained.") from error
    try:
        with torch.device("meta"):
            apply_spec(rebuilt, spec, upcycle=False)
    except (ValueError, TypeError) as error:
        raise ValueError(f"the base recipe {recipe.to_dict()} does not rebuild this model: {error} Pass the right "
                         "base= to save_pretrained.") from error
    expected = rebuilt.state_dict()
    missing = [name for name in state if name not in expected]
    extra = [name for name in expected if name not in state]
    mismatched = [f"{name!r}: model {tuple(state[name].shape)} vs recipe {tuple(t.shape)}"
                  for name, t in expected.items() if name in state and state[name].shape != t.shape]
    if missing or extra or mismatched:
        details = "; ".join(part for part in (
            f"not in the rebuilt model {_listing(missing)}" if missing else "",
            f"only in the rebuilt model {_listing(extra)}" if extra else "",
            f"shape mismatch {_listing(mismatched, quote=False)}" if mismatched else "") if part)
        raise ValueError(f"the base recipe {recipe.to_dict()} does not rebuild this model's tensors ({details}); pass "
                         "the right base= to save_pretrained (e.g. with num_classes or in_chans).")


# -- atomic files --------------------------------------------------------------------------------------


@contextmanager
def _atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success fsync it and rename it over ``target``."""
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        # mkstemp makes the file private (0600); a checkpoint keeps the mode of the file it replaces.
        os.chmod(temporary, target.stat().st_mode & 0o777 if target.exists() else 0o644)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            temporary.unlink()


def _fsync_directory(folder: Path) -> None:
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
