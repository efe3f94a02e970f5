"""save_pretrained / from_pretrained: round trips, the Hub cache offline, and every error's message.

All offline: Hub tests build a cache laid out as huggingface_hub documents it
(``models--ORG--NAME/{blobs, refs/main, snapshots/<commit>/...}``) and block sockets.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_hub_cache
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import convmoe
from convmoe import MoEConfig
from convmoe.atomic_files import file_sha256
from convmoe.factory import BaseRecipe, create_model, get_recipe
from convmoe.hub import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    from_pretrained,
    read_config,
    save_pretrained,
)
from convmoe.recipe_inference import infer_recipe
from convmoe.trust import UntrustedCodeError

CONFIG = MoEConfig(num_experts=4, top_k=2, tokens="grid:2x2")
REPO_ID = "convmoe-test/tiny-resnet"

FACTORY_MODULE = '''
from torch import nn


def build(width=4, classes=5):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(width, classes, 1))


def tied(width=4):
    model = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))
    model[2].weight = model[0].weight
    return model
'''


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    """Move every float parameter and buffer off its init, so a fresh rebuild cannot match by chance."""
    generator = torch.Generator().manual_seed(seed)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    return model


def tiny_patched_resnet(num_classes: int = 10) -> nn.Module:
    model = create_model("timm:test_resnet", num_classes=num_classes)
    convmoe.patch(model, targets="layer4.*.conv2", config=CONFIG)
    return perturb(model).eval()


def assert_same_model(loaded: nn.Module, original: nn.Module, x: torch.Tensor) -> None:
    expected = original.state_dict()
    actual = loaded.state_dict()
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), original.eval()(x), atol=1e-6, rtol=0)


def rewrite_weights(folder: Path, mutate) -> None:
    """Re-write model.safetensors with the same metadata after ``mutate(tensors)``, and unpin its hash
    (as a folder saved without one), so the checks behind the hash are reached."""
    path = folder / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    mutate(tensors)
    save_file(tensors, str(path), metadata=metadata)
    config = json.loads((folder / CONFIG_NAME).read_text())
    del config["weights_sha256"]
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module ``convmoe_test_nets`` with base-model builders."""
    (tmp_path / "convmoe_test_nets.py").write_text(textwrap.dedent(FACTORY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "convmoe_test_nets"


# -- round trips ---------------------------------------------------------------------------------------


def test_round_trip_patched_timm_model(tmp_path):
    model = tiny_patched_resnet()
    folder = save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    config = read_config(folder)
    assert config["base"] == {"library": "timm", "name": "test_resnet", "kwargs": {"num_classes": 10}}
    assert config["format_version"] == FORMAT_VERSION
    assert config["patch"] == convmoe.patch_spec(model)

    loaded = from_pretrained(folder)
    assert not loaded.training
    blocks = dict(convmoe.moe_blocks(loaded))
    assert sorted(blocks) == ["layer4.0.conv2"]
    assert blocks["layer4.0.conv2"].config == CONFIG
    assert_same_model(loaded, model, torch.randn(2, 3, 64, 64))


def test_round_trip_patched_smp_model_with_inferred_recipe(tmp_path):
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.Unet("tu-test_resnet", encoder_weights=None, classes=2, decoder_channels=[16, 8, 8, 8, 8])
    convmoe.patch(model, targets="decoder.blocks.3.conv*.0", config=CONFIG)
    perturb(model).eval()
    folder = save_pretrained(model, tmp_path)  # recipe from smp's init config, no base= needed
    base = read_config(folder)["base"]
    assert (base["library"], base["name"], base["kwargs"]["encoder_name"]) == ("smp", "Unet", "tu-test_resnet")
    loaded = from_pretrained(folder)
    assert type(loaded) is type(model)
    assert_same_model(loaded, model, torch.randn(2, 3, 64, 64))


def test_inferred_timm_recipe_and_resave_without_base(tmp_path):
    import timm

    model = timm.create_model("test_resnet", num_classes=7)  # no convmoe.create_model: pretrained_cfg is used
    assert infer_recipe(model) == BaseRecipe("timm", "test_resnet", {"num_classes": 7})
    convmoe.patch(model, targets="layer4.*.conv2", config=CONFIG)
    perturb(model).eval()
    loaded = from_pretrained(save_pretrained(model, tmp_path / "a"))
    assert get_recipe(loaded) == BaseRecipe("timm", "test_resnet", {"num_classes": 7})
    again = from_pretrained(save_pretrained(loaded, tmp_path / "b"))  # the loaded model knows its recipe
    assert_same_model(again, model, torch.randn(1, 3, 64, 64))


def test_user_factory_recipe_given_as_base(tmp_path, factory_module):
    from convmoe_test_nets import build

    model = build(width=6)
    convmoe.patch(model, targets="2", config=CONFIG)
    perturb(model).eval()
    with pytest.raises(ValueError, match=r"cannot tell how to rebuild this Sequential: pass base="):
        save_pretrained(model, tmp_path / "no-base")
    base = {"library": "factory", "name": f"{factory_module}:build", "kwargs": {"width": 6}}
    folder = save_pretrained(model, tmp_path / "ckpt", base=base)
    assert read_config(folder)["base"] == base
    # A factory outside the allow-list is code: loading it needs the explicit opt-in.
    with pytest.raises(UntrustedCodeError, match=rf"'{factory_module}:build', which is not in convmoe's allow-list"):
        from_pretrained(folder)
    assert_same_model(from_pretrained(folder, trust_remote_code=True), model, torch.randn(2, 3, 9, 9))
    # An importable function works as base too, and create_model records "module:function" recipes.
    save_pretrained(model, tmp_path / "fn", base=BaseRecipe.parse(build, width=6))
    recorded = create_model(f"{factory_module}:build", width=6)
    assert get_recipe(recorded) == BaseRecipe("factory", f"{factory_module}:build", {"width": 6})


def test_shared_tensors_are_stored_once_and_restored(tmp_path, factory_module):
    model = perturb(create_model(f"{factory_module}:tied", width=4)).eval()
    assert model[0].weight is model[2].weight
    folder = save_pretrained(model, tmp_path)
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as handle:
        stored = set(handle.keys())
    assert stored == {"0.weight", "0.bias", "2.bias"}  # "2.weight" is an alias of "0.weight"
    assert_same_model(from_pretrained(folder, trust_remote_code=True), model, torch.randn(2, 4, 7, 7))


def test_map_location_and_strict_false(tmp_path):
    model = tiny_patched_resnet()
    folder = save_pretrained(model, tmp_path)
    rewrite_weights(folder, lambda tensors: tensors.update({"extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected 'extra\.weight'.*pass strict=False"):
        from_pretrained(folder)
    loaded = from_pretrained(folder, strict=False, map_location=torch.device("cpu"))
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert_same_model(loaded, model, torch.randn(1, 3, 64, 64))


# -- the Hub cache, offline ----------------------------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network) -> tuple[Path, str, nn.Module]:
    """A cache under tmp with REPO_ID at one commit; HF_HUB_CACHE points to it and HF_HUB_OFFLINE=1."""
    model = tiny_patched_resnet()
    checkpoint = save_pretrained(model, tmp_path / "upload")
    cache = tmp_path / "hf-cache"
    commit = make_hub_cache(cache, REPO_ID, checkpoint, (CONFIG_NAME, WEIGHTS_NAME))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HOME", raising=False)
    return cache, commit, model


def test_hub_cache_layout_is_the_one_huggingface_hub_reads(hub_cache):
    from huggingface_hub import scan_cache_dir

    cache, commit, _ = hub_cache
    info = scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    (revision,) = repo.revisions
    assert (repo.repo_id, repo.repo_type, revision.commit_hash, revision.refs) == (REPO_ID, "model", commit, {"main"})
    assert sorted(f.file_name for f in revision.files) == [CONFIG_NAME, WEIGHTS_NAME]


def test_from_pretrained_hub_id_offline_from_hf_hub_cache(hub_cache):
    _, commit, model = hub_cache
    x = torch.randn(1, 3, 64, 64)
    assert_same_model(from_pretrained(REPO_ID), model, x)
    assert_same_model(from_pretrained(f"hf-hub:{REPO_ID}", revision=commit), model, x)
    assert_same_model(from_pretrained(REPO_ID, revision="main"), model, x)


def test_from_pretrained_hub_id_offline_from_hf_home(hub_cache, tmp_path, monkeypatch):
    cache, _, model = hub_cache
    home = tmp_path / "hf-home"
    home.mkdir()
    cache.rename(home / "hub")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert_same_model(from_pretrained(REPO_ID), model, torch.randn(1, 3, 64, 64))


def test_hub_id_not_in_cache_offline_names_the_id(hub_cache):
    with pytest.raises(FileNotFoundError, match=r"'convmoe-test/absent'.*not in the Hub cache.*offline \(HF_HUB_OFFLINE=1\)"):
        from_pretrained("convmoe-test/absent")
    with pytest.raises(FileNotFoundError, match=r"No local folder 'convmoe-test/absent' exists either"):
        from_pretrained("convmoe-test/absent")
    with pytest.raises(FileNotFoundError, match=r"revision 'v2'.*offline"):
        from_pretrained(REPO_ID, revision="v2")


def test_hub_snapshot_without_weights_names_the_file(tmp_path, monkeypatch, no_network):
    checkpoint = save_pretrained(tiny_patched_resnet(), tmp_path / "upload")
    make_hub_cache(tmp_path / "cache", "convmoe-test/config-only", checkpoint, files=(CONFIG_NAME,))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors of Hub repo 'convmoe-test/config-only'"):
        from_pretrained("convmoe-test/config-only", cache_dir=tmp_path / "cache")


# -- errors that name the problem and the fix ----------------------------------------------------------


@pytest.fixture
def saved(tmp_path) -> tuple[Path, nn.Module]:
    model = tiny_patched_resnet()
    return save_pretrained(model, tmp_path / "ckpt"), model


def test_weights_that_do_not_match_the_config(saved):
    folder, _ = saved

    def swap_block_for_dense_conv(tensors):
        for name in [n for n in tensors if n.startswith("layer4.0.conv2.")]:
            del tensors[name]
        tensors["layer4.0.conv2.weight"] = torch.zeros(8, 8, 3, 3)

    rewrite_weights(folder, swap_block_for_dense_conv)
    with pytest.raises(ValueError, match=r"do not match config: missing 'layer4\.0\.conv2\.experts\.weight'.*"
                                         r"unexpected 'layer4\.0\.conv2\.weight'"):
        from_pretrained(folder)


def test_weights_with_a_wrong_shape(saved):
    folder, _ = saved
    rewrite_weights(folder, lambda tensors: tensors.update({"fc.weight": torch.zeros(3, tensors["fc.weight"].shape[1])}))
    with pytest.raises(ValueError, match=r"shape mismatch 'fc\.weight': checkpoint \(3, \d+\) vs model \(10, \d+\)"):
        from_pretrained(folder, strict=False)  # a shape mismatch is never skipped


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_or_truncated_weights(saved, damage):
    folder, _ = saved
    path = folder / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(b"this is not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file.*corrupt or truncated"):
        from_pretrained(folder)


def test_weights_changed_in_place_are_refused_by_their_pinned_hash(saved):
    # A flipped byte inside a tensor keeps the file's size and still parses: only the hash can tell.
    folder, _ = saved
    path = folder / WEIGHTS_NAME
    assert read_config(folder)["weights_sha256"] == file_sha256(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors has sha256 .* but .*config\.json pins .*corrupt or were "
                                         r"modified after saving"):
        from_pretrained(folder)
    edit_config(folder, weights_sha256="not-a-hash")
    with pytest.raises(ValueError, match=r"pins weights_sha256='not-a-hash', which is not a sha256"):
        from_pretrained(folder)


KILLED_SAVE = """
import os, signal, sys
import safetensors.torch
import torch
import convmoe

torch.manual_seed(0)
model = convmoe.create_model("timm:test_resnet", num_classes=10)
convmoe.save_pretrained(model, sys.argv[1])                 # a good pair
real_save_file = safetensors.torch.save_file

def killed_midway(tensors, filename, metadata=None):
    real_save_file(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as file:                      # half written when the process dies
        file.truncate(os.path.getsize(filename) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.save_file = killed_midway
torch.manual_seed(1)
convmoe.save_pretrained(convmoe.create_model("timm:test_resnet", num_classes=10), sys.argv[1])
"""


def test_a_save_killed_midway_keeps_the_old_pair_and_the_next_save_cleans_up(tmp_path):
    import signal
    import subprocess
    import sys

    folder = tmp_path / "ckpt"
    keep = folder / "notes.tmp"
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(folder)], capture_output=True, timeout=120,
                            check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    stale = list(folder.glob(f".{WEIGHTS_NAME}.*.tmp"))
    assert len(stale) == 1  # the killed save's partial copy
    from_pretrained(folder)  # the previous pair is intact and consistent
    keep.write_text("the user's own file")
    save_pretrained(tiny_patched_resnet(), folder)
    assert not stale[0].exists()
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, "notes.tmp"]


def test_config_from_a_newer_format_version(saved):
    folder, _ = saved
    edit_config(folder, format_version=FORMAT_VERSION + 1, convmoe_version="9.0.0")
    with pytest.raises(ValueError, match=rf"format_version {FORMAT_VERSION + 1}, written by convmoe 9\.0\.0.*"
                                         r"pip install -U convmoe"):
        from_pretrained(folder)


def test_not_a_convmoe_config(saved):
    folder, _ = saved
    (folder / CONFIG_NAME).write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match=r"not a convmoe checkpoint config"):
        from_pretrained(folder)


@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME])
def test_missing_file(saved, name):
    folder, _ = saved
    (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{name.replace('.', r'[.]')} is missing"):
        from_pretrained(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"neither an existing folder nor a Hub repo id"):
        from_pretrained(tmp_path / "nowhere" / "ckpt")
    with pytest.raises(ValueError, match=r"revision='main' applies to Hub repos only"):
        from_pretrained(tmp_path, revision="main")


def test_files_from_two_saves_are_refused(tmp_path):
    first = save_pretrained(tiny_patched_resnet(), tmp_path / "first")
    second = save_pretrained(tiny_patched_resnet(), tmp_path / "second")
    (first / CONFIG_NAME).write_bytes((second / CONFIG_NAME).read_bytes())
    with pytest.raises(ValueError, match=r"come from different saves"):
        from_pretrained(first)


def test_wrong_inferred_recipe_is_caught_at_save(tmp_path):
    import timm

    model = timm.create_model("test_resnet")
    model.fc = nn.Linear(model.fc.in_features, 3)  # num_classes still says 1000
    with pytest.raises(ValueError, match=r"does not rebuild this model's tensors.*'fc\.weight': model \(3, \d+\) "
                                         r"vs recipe \(1000, \d+\).*base="):
        save_pretrained(model, tmp_path / "wrong")
    assert not (tmp_path / "wrong" / CONFIG_NAME).exists()
    folder = save_pretrained(model, tmp_path / "right", base={"library": "timm", "name": "test_resnet",
                                                               "kwargs": {"num_classes": 3}})
    assert_same_model(from_pretrained(folder), model.eval(), torch.randn(1, 3, 64, 64))


def test_recipe_errors():
    with pytest.raises(ValueError, match=r"needs a library prefix: 'timm:resnet18'"):
        BaseRecipe.parse("resnet18")
    with pytest.raises(ValueError, match=r"library 'keras' is not supported"):
        BaseRecipe.from_dict({"library": "keras", "name": "x"})
    with pytest.raises(ValueError, match=r"argument act_layer=.*cannot be written to config\.json"):
        BaseRecipe.parse("timm:test_resnet", act_layer=nn.ReLU)
    with pytest.raises(ValueError, match=r"not a lambda, a local function"):
        BaseRecipe.parse(lambda: nn.Identity())
    model = create_model("timm:test_resnet", act_layer=nn.ReLU)  # builds; only saving needs base=
    with pytest.raises(ValueError, match=r"recipe was not recorded.*act_layer.*pass base="):
        save_pretrained(model, "unused")


# -- atomic writes -------------------------------------------------------------------------------------


def test_save_keeps_other_files_and_leaves_no_temporary_files(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "README.md").write_text("model card")
    save_pretrained(tiny_patched_resnet(), folder)
    save_pretrained(tiny_patched_resnet(), folder)  # overwrite in place
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    assert (folder / "README.md").read_text() == "model card"
    assert (folder / CONFIG_NAME).stat().st_mode & 0o777 == 0o644


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    old_model = tiny_patched_resnet()
    folder = save_pretrained(old_model, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # a partial write, then the process "dies"
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(tiny_patched_resnet(), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary file left either
    monkeypatch.undo()
    assert_same_model(from_pretrained(folder), old_model, torch.randn(1, 3, 64, 64))


def test_library_builders_given_as_functions_are_library_recipes(tmp_path):
    """A recipe made from smp's, timm's or torchvision's own builder names the library, so the folder loads without
    trust_remote_code (the zoo publishes recipes whose `_target_` is `segmentation_models_pytorch.UPerNet`)."""
    import segmentation_models_pytorch as smp
    import timm
    import torchvision

    assert BaseRecipe.parse(smp.Unet, encoder_name="resnet18", classes=2) == BaseRecipe(
        "smp", "Unet", {"encoder_name": "resnet18", "classes": 2})
    assert BaseRecipe.parse(timm.create_model, model_name="test_resnet", num_classes=3) == BaseRecipe(
        "timm", "test_resnet", {"num_classes": 3})
    assert BaseRecipe.parse(torchvision.models.resnet18, num_classes=3) == BaseRecipe(
        "torchvision", "resnet18", {"num_classes": 3})
    model = smp.Unet(encoder_name="resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 4),
                     classes=2)
    save_pretrained(model, tmp_path / "unet", base=BaseRecipe.parse(
        smp.Unet, encoder_name="resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=[16, 8, 4], classes=2))
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(from_pretrained(tmp_path / "unet")(x), model.eval()(x))
