"""A card says whether its MoE beats the dense twin: the difference of means against the larger seed std."""

from __future__ import annotations

import pytest

from convmoe.zoo.card_format import comparison_sentence, headline_metric, selection_split


def card(mine: float, theirs: float, std: float | None, twin_std: float | None, seeds: int = 3) -> dict:
    return {"monitor": "val/miou", "eval_split": "val", "seeds": list(range(seeds)),
            "metrics": {"val/miou": 0.51, "test/miou": mine}, "metrics_std": {"test/miou": std},
            "active_flops": 105, "latency": {"ms": 12.0, "dense_twin_ms": 10.0},
            "dense_twin": {"metrics": {"val/miou": 0.5, "test/miou": theirs}, "metrics_std": {"test/miou": twin_std},
                           "seeds": [0, 1, 2], "active_flops": 100}}


@pytest.mark.parametrize(("mine", "theirs", "std", "twin_std", "verdict"), [
    (0.520, 0.500, 0.005, 0.008, "more than the larger seed standard deviation (0.0080): this variant wins"),
    (0.505, 0.500, 0.008, 0.004, "within the larger seed standard deviation (0.0080): no win over the dense twin"),
    (0.480, 0.500, 0.008, 0.004, "(0.0080) behind: the dense twin is better"),
    (0.520, 0.500, None, 0.004, "one seed on a side has no spread to compare with, so no win is claimed"),
])
def test_the_verdict_follows_the_larger_seed_std(mine, theirs, std, twin_std, verdict):
    sentence = comparison_sentence(card(mine, theirs, std, twin_std))
    assert verdict in sentence
    assert "mIoU, test" in sentence  # the headline is the test split's when measured
    assert sentence.endswith("at 1.05x the twin's active FLOPs and 1.20x its batch-1 latency.")


def test_the_headline_is_the_monitor_without_a_test_split():
    meta = card(0.52, 0.5, 0.005, 0.008)
    meta["metrics"].pop("test/miou")
    assert headline_metric(meta) == "val/miou"
    assert "mIoU, val" in comparison_sentence(meta)


def test_no_sentence_without_a_twin():
    meta = card(0.52, 0.5, 0.005, 0.008)
    meta["dense_twin"] = None
    assert comparison_sentence(meta) is None


def test_a_win_above_the_equal_cost_limits_says_so():
    meta = card(0.52, 0.5, 0.005, 0.008)
    meta["active_flops"], meta["latency"]["ms"] = 164, 20.7
    sentence = comparison_sentence(meta)
    assert sentence.endswith("this variant wins, at 1.64x the twin's active FLOPs and 2.07x its batch-1 latency "
                             "(above the equal-cost limits of 1.10x FLOPs and 1.25x latency).")


@pytest.mark.parametrize(("val_dataset", "name"), [
    ({"split": "train", "hold_out": 5000, "part": "held_out"}, "held-out"),  # images set aside from train: not "train"
    ({"split": "val"}, "val"),
    ({"split": "test"}, "test"),
    (None, "val"),
])
def test_the_selection_split_is_named_for_what_it_is(val_dataset, name):
    assert selection_split(val_dataset) == name
