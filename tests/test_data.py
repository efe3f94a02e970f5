"""Datasets from standard layouts (tests/fixtures) and joint image/mask augmentations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from convmoe.data import (
    CAMVID_CLASSES,
    CamVidDataset,
    CIFAR10Dataset,
    ImageFolderDataset,
    RandomCropSegmentationDataset,
    read_image,
    write_pairs_csv,
)
from convmoe.data import transforms as T

FIXTURES = Path(__file__).parent / "fixtures"
CAMVID = FIXTURES / "camvid"


def coordinate_sample(h: int = 6, w: int = 8) -> dict[str, np.ndarray]:
    """An image whose pixels encode their own position, and a mask that encodes the same."""
    position = np.arange(h * w).reshape(h, w)
    image = np.stack([position % 256, position // 256, np.zeros_like(position)], axis=-1).astype(np.uint8)
    return {"image": image, "mask": position.astype(np.int64)}


def image_positions(image: np.ndarray) -> np.ndarray:
    return image[..., 0].astype(np.int64) + 256 * image[..., 1].astype(np.int64)


def test_image_folder_and_cifar_batches_hold_the_same_images():
    folder = ImageFolderDataset(FIXTURES / "cifar10_folder", split="train")
    batches = CIFAR10Dataset(FIXTURES / "cifar-10-batches-py", split="train")
    assert len(folder) == len(batches) == 20
    assert folder.classes == list(CIFAR10Dataset.classes)
    for i in (0, 7, 19):
        assert folder[i]["label"] == batches[i]["label"]
        torch.testing.assert_close(folder[i]["image"], batches[i]["image"])
    assert folder[0]["image"].shape == (3, 32, 32)
    assert float(folder[0]["image"].min()) >= 0.0
    assert float(folder[0]["image"].max()) <= 1.0


def test_cifar_finds_the_batches_folder_under_root_and_reads_test_batch():
    test = CIFAR10Dataset(FIXTURES, split="test")
    assert len(test) == 10
    assert sorted(int(label) for label in test.labels) == list(range(10))


def test_cifar_errors_name_the_expected_files(tmp_path):
    with pytest.raises(ValueError, match="data_batch_1"):
        CIFAR10Dataset(tmp_path, split="train")
    with pytest.raises(ValueError, match="split='val'"):
        CIFAR10Dataset(tmp_path, split="val")


def test_camvid_pairs_images_with_labels_in_the_segnet_layout():
    dataset = CamVidDataset(CAMVID, split="train")
    assert len(dataset) == 4
    sample = dataset[1]
    assert sample["image"].shape == (3, 90, 120)
    assert sample["mask"].shape == (90, 120)
    assert sample["mask"].dtype == torch.int64
    assert int(sample["mask"].max()) <= 11
    assert dataset.classes == CAMVID_CLASSES
    assert {a.stem for a, _ in dataset.pairs} == {b.stem for _, b in dataset.pairs}


def test_camvid_reports_images_without_labels(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "valannot").mkdir()
    image = next((CAMVID / "val").iterdir())
    (tmp_path / "val" / image.name).write_bytes(image.read_bytes())
    with pytest.raises(ValueError, match="have no label"):
        CamVidDataset(tmp_path, split="val")
    with pytest.raises(ValueError, match="SegNet layout"):
        CamVidDataset(tmp_path, split="test")


def test_random_crop_dataset_has_fixed_length_and_crop_size():
    dataset = RandomCropSegmentationDataset(CAMVID / "train.csv", crop_size=[32, 48], samples_per_epoch=7)
    assert len(dataset) == 7
    sample = dataset[6]
    assert sample["image"].shape == (3, 32, 48)
    assert sample["mask"].shape == (32, 48)
    with pytest.raises(IndexError):
        dataset[7]


def test_random_crop_windows_match_between_image_and_mask(tmp_path):
    sample = coordinate_sample(40, 50)
    from PIL import Image

    Image.fromarray(sample["image"]).save(tmp_path / "a.png")
    Image.fromarray((sample["mask"] % 256).astype(np.uint8)).save(tmp_path / "a_mask.png")
    write_pairs_csv(tmp_path / "pairs.csv", [("a.png", "a_mask.png")])
    dataset = RandomCropSegmentationDataset(tmp_path / "pairs.csv", crop_size=16, samples_per_epoch=5)
    torch.manual_seed(0)
    for i in range(5):
        item = dataset[i]
        positions = image_positions((item["image"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
        assert np.array_equal(positions % 256, item["mask"].numpy())


def test_random_crop_dataset_errors(tmp_path):
    write_pairs_csv(tmp_path / "bad.csv", [("a.png", "b.png")], image_key="img")
    with pytest.raises(ValueError, match="no column"):
        RandomCropSegmentationDataset(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="at least 512x512"):
        RandomCropSegmentationDataset(CAMVID / "train.csv", crop_size=512)


def test_flips_and_crops_move_image_and_mask_together():
    sample = coordinate_sample()
    for transform in (T.HorizontalFlip(p=1.0), T.VerticalFlip(p=1.0), T.RandomCrop(3, 5), T.CenterCrop(4, 4)):
        out = transform(**sample)
        assert np.array_equal(image_positions(out["image"]), out["mask"])
    flipped = T.HorizontalFlip(p=1.0)(**sample)
    assert np.array_equal(flipped["mask"][:, 0], sample["mask"][:, -1])
    assert T.HorizontalFlip(p=0.0)(**sample)["mask"] is sample["mask"]


def test_resize_keeps_mask_values_and_pad_fills_the_mask_with_ignore():
    sample = coordinate_sample()
    resized = T.Resize(12, 16)(**sample)
    assert resized["image"].shape == (12, 16, 3)
    assert set(np.unique(resized["mask"])) <= set(np.unique(sample["mask"]))
    padded = T.PadIfNeeded(10, 8, fill=0, fill_mask=255)(**sample)
    assert padded["mask"].shape == (10, 8)
    assert (padded["mask"] == 255).sum() == 4 * 8
    assert np.array_equal(padded["mask"][2:8], sample["mask"])
    with pytest.raises(ValueError, match="pad_if_needed=True"):
        T.RandomCrop(20, 20)(**sample)
    assert T.RandomCrop(20, 20, pad_if_needed=True)(**sample)["image"].shape == (20, 20, 3)


def test_normalize_and_to_tensor():
    image = np.array([[[255, 0, 51]]], dtype=np.uint8)
    out = T.Compose([T.Normalize(mean=(0.5, 0.5, 0.0), std=(0.5, 0.5, 0.2)), T.ToTensorV2()])(
        image=image, mask=np.zeros((1, 1), dtype=np.uint8))
    assert out["image"].shape == (3, 1, 1)
    assert out["mask"].dtype == torch.int64
    torch.testing.assert_close(out["image"].flatten(), torch.tensor([1.0, -1.0, 1.0]))


def test_read_image_returns_writable_rgb():
    image = read_image(next((CAMVID / "train").iterdir()))
    assert image.shape == (90, 120, 3)
    assert image.flags.writeable


def test_cifar10_dataset_runs_nothing_in_a_downloaded_batch(tmp_path: Path) -> None:
    """A batch file is a pickle; one naming a callable must be refused, never called."""
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in ("data_batch_1", "test_batch"):
        (root / name).write_bytes(pickle.dumps({b"data": Payload(), b"labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch refers to io\.open, which a CIFAR batch never holds"):
        CIFAR10Dataset(tmp_path, split="test")
    assert not marker.exists()


def _folder(root: Path, per_class: dict[str, int]) -> Path:
    from PIL import Image

    for name, count in per_class.items():
        (root / "train" / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(root / "train" / name / f"{i:03d}.png")
    return root


@pytest.mark.parametrize("hold_out", [6, 0.3])
def test_a_held_out_validation_part_is_stratified_disjoint_and_deterministic(tmp_path: Path, hold_out: float) -> None:
    root = _folder(tmp_path, {"cat": 10, "dog": 10})
    rest = ImageFolderDataset(root, split="train", hold_out=hold_out, hold_out_seed=3)
    held = ImageFolderDataset(root, split="train", hold_out=hold_out, part="held_out", hold_out_seed=3)
    everything = ImageFolderDataset(root, split="train")
    assert len(held) == 6
    assert len(rest) == 14
    assert sorted(label for _, label in held.samples) == [0, 0, 0, 1, 1, 1]  # the same share of every class
    assert not set(held.samples) & set(rest.samples)
    assert sorted(held.samples + rest.samples) == sorted(everything.samples)
    again = ImageFolderDataset(root, split="train", hold_out=hold_out, part="held_out", hold_out_seed=3)
    other_seed = ImageFolderDataset(root, split="train", hold_out=hold_out, part="held_out", hold_out_seed=4)
    assert again.samples == held.samples
    assert other_seed.samples != held.samples


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"hold_out": 20}, r"hold_out=20 must be a count below the 20 images or a fraction in \(0, 1\)"),
    ({"hold_out": 1.5}, r"hold_out=1.5 must be a count below"),
    ({"hold_out": -1}, r"hold_out=-1 must be"),
    ({"hold_out": 2, "part": "val"}, r"part='val' must be 'rest' or 'held_out'"),
    ({"part": "held_out"}, r"part='held_out' needs hold_out > 0"),
])
def test_bad_hold_out_settings_name_the_fix(tmp_path: Path, kwargs: dict, message: str) -> None:
    root = _folder(tmp_path, {"cat": 10, "dog": 10})
    with pytest.raises(ValueError, match=message):
        ImageFolderDataset(root, split="train", **kwargs)
