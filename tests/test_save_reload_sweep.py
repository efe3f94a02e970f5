"""Save/reload sweep: patched timm, smp and torchvision models built with non-default keywords reload
into the same network (max abs difference 0), whether their recipe was recorded by
``convmoe.create_model`` or inferred from a model built by the library directly; a model whose
keywords cannot be recovered is refused at save time, never reloaded into something else.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import timm
import torch
from torch import Tensor, nn

import convmoe
from convmoe import MoEConfig
from convmoe.hub import read_config
from convmoe.recipe_check import output_tensors

smp = pytest.importorskip("segmentation_models_pytorch")
torchvision = pytest.importorskip("torchvision")

CONFIG = MoEConfig(num_experts=3, top_k=2, tokens="pixel")

# (library, name, keywords, input size): every case differs from the library's defaults.
TIMM_CASES = [
    ("resnet18", {"num_classes": 10, "global_pool": "max"}, 64),
    ("resnet18", {"act_layer": "silu"}, 64),
    ("resnet18", {"output_stride": 16, "num_classes": 4}, 64),
    ("tresnet_m", {"num_classes": 5}, 64),
    ("test_efficientnet", {"in_chans": 1, "num_classes": 3, "drop_rate": 0.2}, 32),
    ("test_convnext", {"num_classes": 6, "global_pool": "max"}, 32),
    ("test_byobnet", {"num_classes": 7}, 32),
    ("test_efficientnet_gn", {"num_classes": 4, "drop_rate": 0.3}, 32),
    ("mobilenetv3_small_050", {"num_classes": 6, "global_pool": "avgmax"}, 64),
    ("regnetx_002", {"in_chans": 1, "num_classes": 8}, 64),
    ("efficientnet_lite0", {"num_classes": 10, "drop_path_rate": 0.1}, 64),
]
SMP_CASES = [
    ("Unet", {"encoder_name": "resnet18", "encoder_depth": 4, "decoder_channels": [64, 32, 16, 8], "classes": 2}),
    ("FPN", {"encoder_name": "mit_b0", "classes": 3}),
    ("Linknet", {"encoder_name": "mobilenet_v2", "in_channels": 1, "classes": 2}),
    ("DeepLabV3Plus", {"encoder_name": "tu-test_resnet", "classes": 4, "encoder_output_stride": 8}),
]
TORCHVISION_CASES = [
    ("resnet18", {"num_classes": 10}),
    ("mobilenet_v3_small", {"num_classes": 7, "dropout": 0.5}),
    ("lraspp_mobilenet_v3_large", {"num_classes": 3, "weights_backbone": None}),
    ("deeplabv3_mobilenet_v3_large", {"num_classes": 4, "aux_loss": True, "weights_backbone": None}),
]


def _randomize(model: nn.Module) -> nn.Module:
    """Random weights and BN statistics, so equal outputs mean equal networks, not equal initialisations."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():  # not the non-persistent buffers, which are not saved
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.2 + 0.9 if tensor.ndim == 1
                             else tensor + 0.05 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def _assert_reload_is_exact(model: nn.Module, tmp_path, x: Tensor) -> dict[str, Any]:
    convmoe.patch(model, targets="last", config=CONFIG)
    _randomize(model)
    folder = convmoe.save_pretrained(model, tmp_path / "ckpt")
    reloaded = convmoe.from_pretrained(folder)
    with torch.no_grad():
        expected, got = list(output_tensors(model(x))), list(output_tensors(reloaded(x)))
    assert len(expected) == len(got) > 0
    for a, b in zip(expected, got, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() == 0.0
    return read_config(folder)["base"]


def _build(make: Callable[[], nn.Module]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


@pytest.mark.parametrize("created_by", ["convmoe", "timm"])
@pytest.mark.parametrize(("name", "kwargs", "size"), TIMM_CASES, ids=[f"{n}-{'-'.join(k)}" for n, k, _ in TIMM_CASES])
def test_timm_models_with_keywords_reload_exactly(tmp_path, name, kwargs, size, created_by):
    torch.manual_seed(0)
    if created_by == "convmoe":
        model = _build(lambda: convmoe.create_model(f"timm:{name}", **kwargs))
    else:
        model = _build(lambda: timm.create_model(name, **kwargs))
    x = torch.randn(2, kwargs.get("in_chans", 3), size, size)
    base = _assert_reload_is_exact(model, tmp_path, x)
    assert (base["library"], base["name"]) == ("timm", name)
    recorded = {k: v for k, v in kwargs.items() if k != "drop_path_rate"}
    # Inference recovers every keyword that changes the computation at eval time, and the classifier's
    # drop rate, which timm keeps on the model; create_model records every keyword.
    expected = kwargs if created_by == "convmoe" else recorded
    assert {k: base["kwargs"].get(k) for k in expected} == expected


@pytest.mark.parametrize(("arch", "kwargs"), SMP_CASES, ids=[f"{a}-{k['encoder_name']}" for a, k in SMP_CASES])
def test_smp_models_reload_exactly(tmp_path, arch, kwargs):
    torch.manual_seed(0)
    model = _build(lambda: smp.create_model(arch, encoder_weights=None, **kwargs))
    base = _assert_reload_is_exact(model, tmp_path, torch.randn(2, kwargs.get("in_channels", 3), 64, 64))
    assert (base["library"], base["name"]) == ("smp", arch)
    assert {k: base["kwargs"][k] for k in kwargs} == kwargs


@pytest.mark.parametrize("created_by", ["convmoe", "torchvision"])
@pytest.mark.parametrize(("name", "kwargs"), TORCHVISION_CASES, ids=[n for n, _ in TORCHVISION_CASES])
def test_torchvision_models_reload_exactly(tmp_path, name, kwargs, created_by):
    torch.manual_seed(0)
    if created_by == "convmoe":
        model = _build(lambda: convmoe.create_model(f"torchvision:{name}", **kwargs))
    else:
        model = _build(lambda: torchvision.models.get_model(name, weights=None, **kwargs))
    base = _assert_reload_is_exact(model, tmp_path, torch.randn(2, 3, 64, 64))
    assert (base["library"], base["name"]) == ("torchvision", name)
    # dropout is invisible in eval mode; the weights are never recorded by inference (the file brings them).
    inferred = {k: v for k, v in kwargs.items() if k not in ("dropout", "weights_backbone")}
    assert {k: base["kwargs"].get(k) for k in (kwargs if created_by == "convmoe" else inferred)} == (
        kwargs if created_by == "convmoe" else inferred)


def test_a_model_changed_after_creation_is_refused_with_the_fix(tmp_path):
    # The recorded recipe no longer describes the model: saving must refuse, not reload something else.
    model = convmoe.create_model("timm:test_resnet", num_classes=10)
    model.global_pool.pool_type = "max"  # same tensors and classes, other computation
    model.global_pool.pool = nn.AdaptiveMaxPool2d(1)
    with pytest.raises(ValueError, match=r"rebuilds this model's tensors but not its (structure|outputs).*base="):
        convmoe.save_pretrained(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_unknown_builders_get_the_fix_for_their_own_library(tmp_path):
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x)

    with pytest.raises(ValueError, match=r"cannot tell how to rebuild this Custom: pass base='my_pkg\.nets:build'"):
        convmoe.save_pretrained(Custom(), tmp_path / "custom")
    model = torchvision.models.resnet18(num_classes=3)
    model.fc = nn.Linear(512, 3, bias=False)  # no torchvision builder makes this
    with pytest.raises(ValueError, match=r"no guessed recipe rebuilds it \(tried torchvision:resnet101, .*"
                                         r"'library': 'torchvision', 'name': 'BUILDER'"):
        convmoe.save_pretrained(model, tmp_path / "tv")
