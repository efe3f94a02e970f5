"""Sweep over timm architectures: patch each with two placements and check the patching contract.

Every model is built with random weights (``pretrained=False``, no download) and run on a 2 x 3 x 64
x 64 batch. ``"last"`` is patched with per-pixel top-2-of-4 routing, ``"last_stage"`` with one token
per image and top-1 of 4 (the CondConv-style mixed path). See ``patch_checks.check_patched`` for
what is checked. The default run covers a representative subset of every family; the rest of the
sweep (larger real models) is marked ``slow``.

Convs that cannot be converted are refused with a reason; ``REFUSED`` pins which architectures
hit that and why.
"""

from __future__ import annotations

import pytest
import torch
from patch_checks import check_patched, randomize_norms

import convmoe
from convmoe import MoEConfig

timm = pytest.importorskip("timm")

PIXEL_TOP2 = MoEConfig(num_experts=4, top_k=2)
IMAGE_TOP1 = MoEConfig(num_experts=4, top_k=1, tokens="image")

# (family, timm name): fast enough for the default run (a few tenths of a second for both placements).
FAST = [
    ("resnet", "test_resnet"),
    ("resnext", "resnext26ts"),
    ("regnet", "regnetx_002"),
    ("regnet", "regnety_002"),
    ("efficientnet", "test_efficientnet"),
    ("efficientnet", "test_efficientnet_gn"),
    ("efficientnet", "test_efficientnet_evos"),
    ("efficientnet", "efficientnet_lite0"),
    ("efficientnet (tf same padding)", "tf_efficientnet_lite0"),
    ("mobilenetv3", "mobilenetv3_small_050"),
    ("mobilenetv3 (tf same padding)", "tf_mobilenetv3_small_minimal_100"),
    ("lcnet", "lcnet_050"),
    ("mixnet (MixedConv2d children)", "mixnet_s"),
    ("convnext", "test_convnext"),
    ("convnext", "convnext_atto"),
    ("mambaout", "test_mambaout"),
    ("byobnet", "test_byobnet"),
    ("densenet", "densenet121"),
    ("ghostnet", "ghostnet_050"),
    ("hrnet", "hrnet_w18_small"),
    ("vovnet", "ese_vovnet19b_slim_dw"),
    ("efficientvit", "efficientvit_b0"),
    ("mobilevit", "mobilevit_xxs"),
]

# Larger real models: the same checks, opt-in (pytest -m slow).
SLOW = [
    ("resnet", "resnet18"),
    ("resnet", "resnet10t"),
    ("efficientnet", "efficientnet_b0"),
    ("efficientnet (tf same padding)", "tf_efficientnet_b0"),
    ("mixnet (tf same padding)", "tf_mixnet_s"),
    ("convnext", "test_convnext2"),
    ("skresnet", "skresnet18"),
    ("resnest", "resnest14d"),
    ("repvgg", "repvgg_a0"),
    ("mobileone", "mobileone_s0"),
    ("rexnet", "rexnet_100"),
    ("mnasnet", "mnasnet_small"),
    ("mnasnet", "semnasnet_050"),
    ("fbnet", "fbnetc_100"),
    ("tinynet", "tinynet_e"),
    ("fastvit", "fastvit_t8"),
    ("repghostnet", "repghostnet_050"),
    ("hgnet", "hgnetv2_b0"),
    ("edgenext", "edgenext_xx_small"),
    ("dla", "dla34"),
    ("cspnet", "cspresnet50"),
    ("selecsls", "selecsls42b"),
    ("dpn", "dpn48b"),
    ("regnet", "regnetz_005"),
]

# Architectures whose placements land on convs convmoe refuses, with the reason the error gives.
REFUSED = [
    ("test_nfnet", "ScaledStdConv2d", "standardises its weight"),
    ("efficientnet_cc_b0_4e", "CondConv2d", "per-sample expert kernels"),
]


def _create(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_norms(timm.create_model(name, pretrained=False, num_classes=10))


def _sweep(name: str) -> None:
    dense = _create(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    last = check_patched(dense, x, "last", PIXEL_TOP2)
    assert len(last.blocks) == 1
    stage = check_patched(dense, x, "last_stage", IMAGE_TOP1)
    if isinstance(getattr(dense, "conv_stem", None), timm.layers.Conv2dSame):
        assert "timm_conv2d_same" in stage.converters


@pytest.mark.parametrize(("family", "name"), FAST, ids=[name for _, name in FAST])
def test_patch_timm_fast(family: str, name: str) -> None:
    _sweep(name)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "name"), SLOW, ids=[name for _, name in SLOW])
def test_patch_timm_slow(family: str, name: str) -> None:
    _sweep(name)


def test_sweep_covers_twenty_models_of_twelve_distinct_network_classes() -> None:
    # What the fast sweep really builds (on the meta device: no memory), not what its list says.
    with torch.device("meta"):
        built = {name: timm.create_model(name, pretrained=False, num_classes=10) for _, name in FAST}
    assert len(built) >= 20
    classes = {f"{type(model).__module__}.{type(model).__qualname__}" for model in built.values()}
    assert len(classes) >= 12, sorted(classes)  # the family labels say 15; mobilenetv3/lcnet, regnet and
    # resnext26ts (a ByobNet) share classes
    convs = {name: sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) for name, model in built.items()}
    assert all(count > 0 for count in convs.values()), convs


def test_tf_same_padding_convs_are_converted_dynamically() -> None:
    dense = _create("tf_efficientnet_lite0")
    same = [name for name, module in dense.named_modules() if isinstance(module, timm.layers.Conv2dSame)]
    assert same, "tf_efficientnet_lite0 should hold Conv2dSame convs"
    # Odd sizes make TF 'SAME' padding asymmetric; a static padding would shift the output.
    x = torch.randn(2, 3, 67, 61, generator=torch.Generator().manual_seed(1))
    result = check_patched(dense, x, same, PIXEL_TOP2)
    assert result.converters == {"timm_conv2d_same"}
    assert sorted(result.blocks) == sorted(same)


@pytest.mark.parametrize(("name", "kind", "reason"), REFUSED, ids=[name for name, _, _ in REFUSED])
def test_exotic_convs_are_refused_with_the_reason(name: str, kind: str, reason: str) -> None:
    model = _create(name)
    with pytest.raises(ValueError, match="cannot convert") as error:
        convmoe.patch(model, targets="last_stage", config=PIXEL_TOP2)
    assert kind in str(error.value)
    assert reason in str(error.value)
    assert not convmoe.patch.patched_blocks(model), "a refused patch must leave the model untouched"
