"""Files that are either the old version or the new one: atomic writes, their leftovers, and hashes.

Both checkpoint kinds (``save_pretrained`` folders and training checkpoints) are written the same
way: a temporary file beside the target (``.<name>.<random>.tmp``), flushed to disk, renamed over
the target, then the folder entry synced. A process killed mid-write leaves the target as it was
and a stale temporary, which the next write of the same target removes.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; when the block succeeds, fsync it and rename it over
    ``target``. On any error (or a kill) ``target`` is untouched; the temporary is removed on errors.

    The new file keeps the permissions of the file it replaces (0644 for a new one).

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "config.json"
        >>> with atomic_write(target) as temporary:
        ...     _ = temporary.write_text("{}")
        >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
        ('{}', ['config.json'])
    """
    target = Path(target)
    remove_stale_temporaries(target)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, target.stat().st_mode & 0o777 if target.exists() else 0o644)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    fsync_folder(target.parent)


def remove_stale_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries that killed writes of ``target`` left beside it.

    Returns:
        The removed files: ``.<name>.*.tmp``, and ``<name>.*.tmp`` / ``<name>.tmp`` from older convmoe.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / ".last.pt.x1y2.tmp").write_bytes(b"half")
        >>> _ = (folder / "notes.tmp").write_text("the user's")
        >>> [p.name for p in remove_stale_temporaries(folder / "last.pt")]
        ['.last.pt.x1y2.tmp']
    """
    target = Path(target)
    folder, name = glob.escape(str(target.parent)), glob.escape(target.name)
    patterns = (f".{name}.*.tmp", f"{name}.*.tmp", f"{name}.tmp")
    stale = sorted({Path(p) for pattern in patterns for p in glob.glob(os.path.join(folder, pattern))})
    for file in stale:
        with contextlib.suppress(FileNotFoundError):
            file.unlink()
    return stale


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows).

    Example:
        >>> import tempfile
        >>> fsync_folder(tempfile.mkdtemp())
    """
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file, in lower-case hex (what ``sha256sum`` prints), read in 1 MiB chunks.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "w.bin"
        >>> _ = path.write_bytes(b"abc")
        >>> file_sha256(path)
        'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
