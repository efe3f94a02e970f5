"""Save and load patched models: ``config.json`` (base recipe + patch spec) and ``model.safetensors``.

A checkpoint folder, local or a Hugging Face Hub repo::

    config.json        {"format": "convmoe", "format_version": 1, "convmoe_version": ...,
                        "base": {"library": "timm", "name": "resnet18", "kwargs": {...}},
                        "patch": <convmoe.patch_spec(model)>, "save_id": ..., "weights_sha256": ...}
    model.safetensors  the state dict (tensors that share memory stored once)

Saving proves the recipe first (:mod:`convmoe.recipe_check`: same tensors, same structure, same
outputs on a probe input). Loading is data, never code: the base model is rebuilt only from an
allow-listed builder (:mod:`convmoe.trust`; ``trust_remote_code=True`` opts out), without
downloading its weights; the patch spec is re-applied; the weights file is checked against its
pinned sha256 and loaded strictly. Both files are written to temporary files in the target folder,
fsynced and renamed, so an interrupted save never leaves a half-written file (the next save removes
the temporaries of a killed one); ``save_id`` ties the two files of one save together so a mixed
pair is detected.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from convmoe.atomic_files import atomic_write, file_sha256
from convmoe.factory import RECIPE_ERROR_ATTRIBUTE, BaseRecipe, record_recipe
from convmoe.formatting import listing
from convmoe.hub_files import CONFIG_NAME, WEIGHTS_NAME, resolve_file
from convmoe.state_dicts import compare_states

FORMAT_NAME = "convmoe"
FORMAT_VERSION = 1
_ALIASES_KEY = "convmoe_aliases"
_SAVE_ID_KEY = "convmoe_save_id"
CACHE_REMOVAL = "hf cache rm model/ORG/NAME"  # huggingface_hub's CLI: drops a repo from the Hub cache


def save_pretrained(model: nn.Module, path: str | os.PathLike[str],
                    base: str | Mapping[str, Any] | BaseRecipe | Callable[..., nn.Module] | None = None,
                    check_outputs: bool = True) -> Path:
    """Write ``model`` (patched or not) to the folder ``path`` as ``config.json`` + ``model.safetensors``.

    The recipe is proven before anything is written: it is rebuilt (on the ``meta`` device, or the
    CPU for encoders that cannot be built there), patched, and compared with ``model`` by tensor
    names and shapes, module structure, and a probe forward pass in eval mode.

    Args:
        model: The model to save.
        path: The folder; created if needed. Its other files are kept; the two checkpoint files are
            replaced atomically.
        base: How to rebuild the unpatched model: ``"timm:NAME"``, ``"smp:ARCH"``, ``"torchvision:NAME"``,
            ``"module:function"``, a dict ``{"library", "name", "kwargs"}``, a
            :class:`~convmoe.factory.BaseRecipe` or an importable function. None takes it from the
            model (``convmoe.create_model`` and ``from_pretrained`` record every keyword; smp's init
            config; otherwise timm's ``pretrained_cfg`` or the torchvision builder, with keywords read
            from the modules and kept only if the rebuild matches).
        check_outputs: Run the probe forward (on by default; the tensor and structure checks always run).

    Returns:
        The folder.

    Raises:
        ValueError: No ``base`` and none can be inferred; a recipe that does not rebuild the model's
            tensors, structure or outputs; keyword arguments that are not JSON-ready. The message
            shows how to pass ``base=`` for the model's library.

    Example:
        >>> import convmoe, tempfile
        >>> model = convmoe.create_model("timm:test_resnet", num_classes=10)
        >>> folder = save_pretrained(model, tempfile.mkdtemp())
        >>> sorted(p.name for p in folder.iterdir())
        ['config.json', 'model.safetensors']
    """
    from convmoe import __version__
    from convmoe.patch import patch_spec
    from convmoe.recipe_check import choose_recipe

    state = model.state_dict()
    spec = patch_spec(model)
    recipe = choose_recipe(model, _base_candidates(model, base), spec, state, probe=check_outputs)
    config: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "convmoe_version": __version__,
        "base": recipe.to_dict(),
        "patch": spec,
        "save_id": uuid.uuid4().hex,
    }
    tensors, aliases = _dedupe_shared(state)
    metadata = {"format": "pt", _SAVE_ID_KEY: config["save_id"], _ALIASES_KEY: json.dumps(aliases, sort_keys=True)}

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    # Weights first: a crash before the config is renamed leaves either the old pair or a pair whose
    # save_id differ, which from_pretrained reports instead of loading mixed files.
    with atomic_write(folder / WEIGHTS_NAME) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
        config["weights_sha256"] = file_sha256(temporary)
    config_text = json.dumps(config, indent=2, sort_keys=False) + "\n"
    with atomic_write(folder / CONFIG_NAME) as temporary:
        temporary.write_text(config_text, encoding="utf-8")
    return folder


def from_pretrained(path_or_hub_id: str | os.PathLike[str], revision: str | None = None,
                    map_location: str | torch.device = "cpu", strict: bool = True,
                    cache_dir: str | os.PathLike[str] | None = None, trust_remote_code: bool = False) -> nn.Module:
    """Load a model saved by :func:`save_pretrained`, from a folder or a Hugging Face Hub repo.

    The base model is rebuilt from the recipe without downloading its weights, the patch spec is
    applied, and ``model.safetensors`` is loaded; tensors stored in another floating dtype (the
    float16 zoo variants) are cast to the rebuilt model's dtype, float32. Hub files go through
    huggingface_hub's cache, so ``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE`` and ``HF_HOME`` work (read
    when this function is called).

    Nothing in the folder runs: the recipe must name timm, smp, torchvision, :mod:`convmoe.models`
    or a factory registered with :func:`convmoe.register_factory`, unless ``trust_remote_code=True``;
    the weights are safetensors, checked against the sha256 that ``config.json`` pins.

    Args:
        path_or_hub_id: A local folder, or a Hub repo id ``"org/name"`` (``"hf-hub:org/name"`` too); an
            existing folder wins over a Hub id spelled the same.
        revision: Hub branch, tag or commit (default ``"main"``); not allowed for a local folder.
        map_location: Device the loaded model is moved to.
        strict: Require the checkpoint's tensors to match the rebuilt model's exactly; with False,
            missing and unexpected tensors are skipped (shape mismatches are always an error).
        cache_dir: Hub cache folder; default ``HF_HUB_CACHE``, else ``$HF_HOME/hub``.
        trust_remote_code: Build a base factory outside the allow-list. Only for sources you trust:
            the factory named in ``config.json`` is imported and called.

    Returns:
        The model in eval mode, with its base recipe recorded (so it can be saved again as is).

    Raises:
        FileNotFoundError: No such folder, a missing file, or a Hub repo that is not in the cache
            while offline.
        convmoe.trust.UntrustedCodeError: The recipe names a factory outside the allow-list (a
            ``ValueError``); nothing was run.
        ValueError: A config from a newer format version or not a convmoe config; weights whose
            sha256 differs from the pinned one; corrupt or truncated weights; weights that do not
            match the config (missing, unexpected, shape mismatch).

    Example:
        >>> import convmoe, tempfile
        >>> model = convmoe.create_model("timm:test_resnet", num_classes=10)
        >>> folder = save_pretrained(model, tempfile.mkdtemp())
        >>> from_pretrained(folder).num_classes
        10
    """
    from convmoe.patch import apply_spec

    config_path = resolve_file(path_or_hub_id, CONFIG_NAME, revision, cache_dir)
    weights_path = resolve_file(path_or_hub_id, WEIGHTS_NAME, revision, cache_dir)
    config = read_config(config_path)
    recipe = BaseRecipe.from_dict(config["base"])
    state, metadata = _read_weights(weights_path)  # safetensors: parsing cannot run code
    saved_id, config_id = metadata.get(_SAVE_ID_KEY), config.get("save_id")
    if saved_id and config_id and saved_id != config_id:
        raise ValueError(f"{config_path} and {weights_path} come from different saves (an interrupted save or files "
                         "copied from two checkpoints); save the model again with convmoe.save_pretrained.")
    check_weights_hash(weights_path, config.get("weights_sha256"), config_path)
    model = recipe.build(trust_remote_code=trust_remote_code, where=str(config_path))
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
                         "it is corrupt or truncated. Save the model again, or for a Hub repo remove it from the "
                         f"cache ({CACHE_REMOVAL}) and download it again.") from None
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
    check_state_matches(model, state, strict, where)
    expected = model.state_dict()
    model.load_state_dict({name: tensor for name, tensor in state.items() if name in expected}, strict=strict)


def check_state_matches(model: nn.Module, state: Mapping[str, Tensor], strict: bool, where: str,
                        fix: str | None = None) -> None:
    """Raise a one-line ValueError when ``state`` does not fit ``model`` (before ``load_state_dict``).

    Args:
        model: The model the weights are for.
        state: The weights.
        strict: Missing and unexpected names are errors too (shape mismatches always are).
        where: The file, for the message.
        fix: What the user should do; default: save the model again, or pass strict=False.

    Raises:
        ValueError: Shape mismatches, or missing/unexpected tensors under ``strict``.

    Example:
        >>> check_state_matches(nn.Linear(2, 3), {"weight": torch.zeros(3, 2)}, True, "w.pt", "retrain")
        Traceback (most recent call last):
        ...
        ValueError: weights in w.pt do not match config: missing 'bias'. Cause: retrain.
    """
    difference = compare_states(model.state_dict(), state)
    missing, unexpected = difference.missing, difference.unexpected
    mismatched = [f"{name!r}: checkpoint {given} vs model {wanted}" for name, given, wanted in difference.mismatched]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch {listing(mismatched, quote=False)}")
    if strict and missing:
        problems.append(f"missing {listing(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected {listing(unexpected)}")
    if problems:
        if fix is None:
            fix = ("the weights were saved from a different model than config.json describes; save the model again "
                   "with convmoe.save_pretrained")
            if not mismatched:
                fix += ", or pass strict=False to load only the tensors that match"
        raise ValueError(f"weights in {where} do not match config: {'; '.join(problems)}. Cause: {fix}.")


# -- recipes -------------------------------------------------------------------------------------------


def _base_candidates(model: nn.Module, base: Any) -> list[BaseRecipe]:
    from convmoe.recipe_check import RecipeMismatch, how_to_pass_base
    from convmoe.recipe_inference import recipe_candidates

    if base is not None:
        return [BaseRecipe.parse(base)]
    candidates = recipe_candidates(model)
    if not candidates:
        reason = getattr(model, RECIPE_ERROR_ATTRIBUTE, None)
        because = f" (its recipe was not recorded: {reason})" if reason else ""
        raise RecipeMismatch(f"save_pretrained cannot tell how to rebuild this {type(model).__name__}{because}: "
                             f"{how_to_pass_base(model)}")
    return candidates


# -- integrity -----------------------------------------------------------------------------------------


def check_weights_hash(weights_path: Path, expected: Any, config_path: Path | str) -> None:
    """Raise unless ``weights_path`` has the sha256 that ``config_path`` pins (None: nothing pinned).

    Raises:
        ValueError: The hashes differ (a corrupt, truncated or replaced file), or a pinned value
            that is not a sha256.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "w"
        >>> _ = path.write_bytes(b"x")
        >>> check_weights_hash(path, "0" * 64, "config.json")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: .../w has sha256 2d711642b726b044..., but config.json pins 0000000000000000...; ...
    """
    if expected is None:
        return
    if not isinstance(expected, str) or not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ValueError(f"{config_path} pins weights_sha256={expected!r}, which is not a sha256 hex digest; the "
                         "config is corrupt or hand-edited, save the model again.")
    actual = file_sha256(weights_path)
    if actual != expected:
        raise ValueError(f"{weights_path} has sha256 {actual[:16]}..., but {config_path} pins {expected[:16]}...; the "
                         "weights are corrupt or were modified after saving. Download them again (for a Hub repo, "
                         f"remove it from the cache: {CACHE_REMOVAL}) or save the model again.")
