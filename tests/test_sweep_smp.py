"""Sweep over every segmentation_models_pytorch architecture: patch with several placements.

Each architecture is built on the tiny timm encoder ``tu-test_resnet`` (DPT needs a ViT:
``tu-test_vit``) with narrow decoders and random weights, and run on a 2 x 3 x 64 x 64 batch (PAN:
128, its pyramid pools four times). Placements and routing:

- ``"last"``: per-pixel top-2 of 4;
- ``"decoder_last"``: a 2 x 2 grid of tokens, top-1 of 4;
- ``"last_stage"`` (the encoder's deepest stage): per-pixel top-1 of 4 plus a shared expert;
- ``"fusion"`` (decoders with a fusion block): one token per image, top-2 of 4.

See ``patch_checks.check_patched`` for what is checked.
"""

from __future__ import annotations

import pytest
import torch
from patch_checks import check_patched, randomize_norms

import convmoe
from convmoe import MoEConfig

smp = pytest.importorskip("segmentation_models_pytorch")

CONFIGS = {
    "last": MoEConfig(num_experts=4, top_k=2),
    "decoder_last": MoEConfig(num_experts=4, top_k=1, tokens="grid:2x2"),
    "last_stage": MoEConfig(num_experts=4, top_k=1, shared_expert=True),
    "fusion": MoEConfig(num_experts=4, top_k=2, tokens="image"),
}

NARROW = (32, 16, 16, 8, 8)
# arch -> (constructor keywords, input size, placements beyond "last" and "decoder_last")
ARCHITECTURES: dict[str, tuple[dict, int, tuple[str, ...]]] = {
    "unet": ({"decoder_channels": NARROW}, 64, ("last_stage",)),
    "unetplusplus": ({"decoder_channels": NARROW}, 64, ("last_stage",)),
    "manet": ({"decoder_channels": NARROW, "decoder_pab_channels": 16}, 64, ("last_stage",)),
    "linknet": ({}, 64, ("last_stage",)),
    "fpn": ({"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}, 64, ("last_stage",)),
    "pspnet": ({"psp_out_channels": 32}, 64, ("last_stage", "fusion")),
    "deeplabv3": ({"decoder_channels": 32}, 64, ("last_stage", "fusion")),
    "deeplabv3plus": ({"decoder_channels": 32}, 64, ("last_stage", "fusion")),
    "pan": ({"decoder_channels": 32}, 128, ("last_stage",)),
    "upernet": ({"decoder_channels": 32}, 64, ("last_stage", "fusion")),
    "segformer": ({"decoder_segmentation_channels": 32}, 64, ("last_stage", "fusion")),
    "dpt": ({"decoder_intermediate_channels": (32, 32, 64, 64), "decoder_fusion_channels": 32}, 64, ("fusion",)),
}


def _create(arch: str) -> torch.nn.Module:
    kwargs, _, _ = ARCHITECTURES[arch]
    encoder = "tu-test_vit" if arch == "dpt" else "tu-test_resnet"
    torch.manual_seed(0)
    return randomize_norms(smp.create_model(arch, encoder_name=encoder, encoder_weights=None, classes=3, **kwargs))


def test_every_installed_architecture_is_swept() -> None:
    assert set(smp.MODEL_ARCHITECTURES_MAPPING) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_patch_smp(arch: str) -> None:
    _, size, extra = ARCHITECTURES[arch]
    dense = _create(arch)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    results = {}
    for placement in ("last", "decoder_last", *extra):
        results[placement] = check_patched(dense, x, placement, CONFIGS[placement])
    assert all(name.startswith("decoder.") for name in results["decoder_last"].blocks)
    if "last_stage" in results:
        assert all(name.startswith("encoder.") for name in results["last_stage"].blocks)
    if "fusion" in results:
        assert all(name.startswith("decoder.") for name in results["fusion"].blocks)


def test_dpt_vit_encoder_has_no_last_stage_conv() -> None:
    with pytest.raises(ValueError, match=r"placement 'last_stage'.*holds no k x k conv"):
        convmoe.patch(_create("dpt"), targets="last_stage")


@pytest.mark.parametrize("arch", ["unet", "fpn", "linknet", "pan", "manet", "unetplusplus"])
def test_fusion_is_refused_for_decoders_without_a_fusion_block(arch: str) -> None:
    with pytest.raises(ValueError, match=r"placement 'fusion' is defined for decoders with one fusion block.*"
                                         r"Use 'decoder_last'"):
        convmoe.patch(_create(arch), targets="fusion")


def test_smp_conv_norm_act_block_stands_for_its_conv() -> None:
    model = _create("upernet")
    dense = model.decoder.fusion_block
    assert isinstance(dense, smp.base.modules.Conv2dReLU)
    convmoe.patch(model, targets="decoder.fusion_block", config=CONFIGS["last"])
    assert isinstance(model.decoder.fusion_block[0], convmoe.MoEConv2d)
    assert model.decoder.fusion_block[0].name == "decoder.fusion_block.0"
    assert isinstance(model.decoder.fusion_block[1], torch.nn.BatchNorm2d)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["unet", "fpn", "upernet", "deeplabv3plus"])
def test_patch_smp_native_resnet18_encoder(arch: str) -> None:
    torch.manual_seed(0)
    dense = randomize_norms(smp.create_model(arch, encoder_name="resnet18", encoder_weights=None, classes=3))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    stage = check_patched(dense, x, "last_stage", CONFIGS["last_stage"])
    assert all(name.startswith("encoder.layer4.") for name in stage.blocks)
    check_patched(dense, x, "last", CONFIGS["last"])
