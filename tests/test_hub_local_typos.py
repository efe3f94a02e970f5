"""A path into a local folder that does not exist is a typo, not a Hub id: it fails at once, without a
request (which would retry for half a minute offline), and names the closest folder there."""

from __future__ import annotations

from pathlib import Path

import pytest

from convmoe.hub_files import resolve_file


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    for name in ("upernet-lite0-moe8-camvid", "upernet-lite0-dense-camvid"):
        (tmp_path / "zoo" / name).mkdir(parents=True)
        (tmp_path / "zoo" / name / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)


def test_a_misspelt_folder_in_a_local_folder_is_not_sent_to_the_hub(zoo, no_network):
    with pytest.raises(FileNotFoundError, match=r"no folder 'zoo/upernet-lite0-moe9-camvid': 'zoo' is a local folder "
                                                r"of checkpoints \(did you mean 'zoo/upernet-lite0-moe8-camvid'\?\); write "
                                                r"'hf-hub:zoo/upernet-lite0-moe9-camvid' for the Hub repo"):
        resolve_file("zoo/upernet-lite0-moe9-camvid", "config.json")


def test_the_existing_folder_still_resolves(zoo):
    assert resolve_file("zoo/upernet-lite0-moe8-camvid", "config.json").is_file()


@pytest.mark.parametrize("owner", ["someorg", "convmoe"])  # no folder, or a folder of no checkpoints (the package)
def test_an_id_whose_owner_is_no_folder_of_checkpoints_still_goes_to_the_hub(zoo, monkeypatch, no_network, owner):
    (Path.cwd() / "convmoe" / "tokens").mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=f"No local folder '{owner}/model' exists either"):
        resolve_file(f"{owner}/model", "config.json")
