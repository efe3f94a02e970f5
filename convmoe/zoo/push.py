"""``convmoe zoo push``: upload a checked zoo variant to the Hugging Face Hub, then record the commit.

The variant must pass :func:`~convmoe.zoo.schema.check_variant` first, and the repo id must be the
card's ``convmoe.hub_id`` (its usage snippet and metadata name it). After the upload the local
card records the Hub commit in ``convmoe.revision`` (the copy on the Hub cannot name its own
commit), and ``zoo/README.md`` shows it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from convmoe.zoo.card import analysis_section, render_card, split_front_matter
from convmoe.zoo.schema import CARD_NAME, HUB_ID, check_variant
from convmoe.zoo.table import write_index


def resolve_variant(model_id_or_folder: str | Path, zoo_dir: str | Path = "zoo") -> Path:
    """The variant folder: ``zoo_dir/<model_id>``, or the folder itself when given a path.

    Raises:
        FileNotFoundError: Neither exists.

    Example:
        >>> resolve_variant("absent", "no/zoo")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no zoo variant 'absent': neither no/zoo/absent nor absent is a folder; publish it with `convmoe zoo publish`.
    """
    candidate = Path(zoo_dir) / str(model_id_or_folder)
    if candidate.is_dir():
        return candidate
    if Path(model_id_or_folder).is_dir():
        return Path(model_id_or_folder)
    raise FileNotFoundError(f"no zoo variant {str(model_id_or_folder)!r}: neither {candidate.as_posix()} nor "
                            f"{model_id_or_folder} is a folder; publish it with `convmoe zoo publish`.")


def record_revision(folder: str | Path, revision: str) -> Path:
    """Write ``revision`` into the card's ``convmoe.revision`` and re-render the card.

    Example:
        >>> import tempfile
        >>> from convmoe.zoo.card import EXAMPLE_META, build_front_matter
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "README.md").write_text(render_card(build_front_matter(EXAMPLE_META)))
        >>> 'revision="abc123"' in record_revision(folder, "abc123").read_text()
        True
    """
    card = Path(folder) / CARD_NAME
    front, body = split_front_matter(card.read_text(encoding="utf-8"), str(card))
    front["convmoe"]["revision"] = revision
    card.write_text(render_card(front, analysis_section(body)), encoding="utf-8")
    return card


def push_variant(model_id_or_folder: str | Path, repo_id: str | None = None, zoo_dir: str | Path = "zoo",
                 private: bool = False, token: str | None = None, commit_message: str | None = None,
                 update_index: bool = True) -> Any:
    """Upload a zoo variant folder to the Hub with huggingface_hub, after checking it.

    Args:
        model_id_or_folder: The variant's id in ``zoo_dir``, or its folder.
        repo_id: The Hub repo; default (and the only accepted value) the card's ``convmoe.hub_id``.
        zoo_dir: The zoo folder.
        private: Create the repo private.
        token: A Hub token (default: huggingface_hub's login).
        commit_message: The Hub commit message.
        update_index: Regenerate ``zoo_dir/README.md`` after recording the revision.

    Returns:
        huggingface_hub's ``CommitInfo`` of the upload.

    Raises:
        ValueError: The variant fails the zoo checks, or ``repo_id`` differs from the card's.

    Example:
        >>> push_variant("upernet-lite0-moe8-camvid")  # doctest: +SKIP
    """
    from huggingface_hub import HfApi  # slow to import; only an upload needs it (as in convmoe.hub_files)

    folder = resolve_variant(model_id_or_folder, zoo_dir)
    problems = check_variant(folder)
    if problems:
        raise ValueError(f"{folder} is not ready to push: " + " ".join(problems))
    front, _ = split_front_matter((folder / CARD_NAME).read_text(encoding="utf-8"), str(folder / CARD_NAME))
    card_repo = front["convmoe"]["hub_id"]
    repo_id = repo_id or card_repo
    if not HUB_ID.match(repo_id):
        raise ValueError(f"repo id {repo_id!r} must look like 'org/name'.")
    if repo_id != card_repo:
        raise ValueError(f"the card of {folder} names the Hub repo {card_repo!r} (in its usage and metadata), not "
                         f"{repo_id!r}; push to {card_repo!r}, or publish again with --repo-id {repo_id}.")
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                             commit_message=commit_message or f"convmoe zoo: {front['convmoe']['model_id']}",
                             ignore_patterns=[".*"])
    revision = getattr(info, "oid", None)
    if revision:
        record_revision(folder, revision)
        if update_index and folder.parent.resolve() == Path(zoo_dir).resolve():
            write_index(zoo_dir)
    return info
