"""Datasets from standard layouts and joint image/mask augmentations."""

from convmoe.data import transforms
from convmoe.data.class_weights import dataset_masks, median_frequency_weights
from convmoe.data.classification import CIFAR10_CLASSES, CIFAR10Dataset, ImageFolderDataset, read_cifar_batch
from convmoe.data.io import read_image, read_mask
from convmoe.data.prepare import (
    PreparedData,
    check_camvid,
    prepare_camvid,
    prepare_cifar10,
    read_cifar10_split,
)
from convmoe.data.safe_pickle import load_cifar_pickle
from convmoe.data.segmentation import (
    CAMVID_CLASSES,
    CAMVID_IGNORE_INDEX,
    CamVidDataset,
    RandomCropSegmentationDataset,
    read_pairs_csv,
    write_pairs_csv,
)

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_IGNORE_INDEX",
    "CIFAR10_CLASSES",
    "CIFAR10Dataset",
    "CamVidDataset",
    "ImageFolderDataset",
    "PreparedData",
    "RandomCropSegmentationDataset",
    "check_camvid",
    "dataset_masks",
    "load_cifar_pickle",
    "median_frequency_weights",
    "prepare_camvid",
    "prepare_cifar10",
    "read_cifar10_split",
    "read_cifar_batch",
    "read_image",
    "read_mask",
    "read_pairs_csv",
    "transforms",
    "write_pairs_csv",
]
