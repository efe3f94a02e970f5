"""Progress bars read what they show exactly once.

tqdm.auto's bar calls ``iter()`` on its iterable in its constructor and again when iterated
(tqdm#1598): a DataLoader then starts its workers twice and draws its shuffle order and worker
seeds twice, so the bar changes which batches a seeded loader yields.
"""

from __future__ import annotations

import pytest
import torch
from iteration_helpers import CountingIterable
from torch.utils.data import DataLoader

from convmoe.progress import progress_bar


@pytest.mark.parametrize("enabled", [True, False])
def test_the_bar_iterates_once_and_yields_every_item_in_order(enabled: bool, capsys) -> None:
    items = CountingIterable(list(range(5)))
    bar = progress_bar(items, description="test", enabled=enabled)
    assert list(bar) == [0, 1, 2, 3, 4]
    assert items.iterations == 1
    assert bar.count == 5
    assert ("test" in capsys.readouterr().err) is enabled


def test_a_seeded_shuffled_loader_yields_its_own_order_under_the_bar() -> None:
    def loader() -> DataLoader:
        return DataLoader(list(range(16)), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))

    plain = [batch.tolist() for batch in loader()]
    shown = [batch.tolist() for batch in progress_bar(loader(), description="test", enabled=True)]
    assert shown == plain


def test_breaking_out_closes_the_bar_and_postfix_is_shown(capsys) -> None:
    bar = progress_bar(CountingIterable(list(range(10))), description="test", enabled=True)
    for i, _ in enumerate(bar):
        if i == 3:  # as the epoch loop stops at a batch limit: item 3 is read but not used
            break
        bar.set_postfix(loss="0.5")
    bar.close()
    assert bar.count == 3
    assert "loss=0.5" in capsys.readouterr().err


def test_an_iterable_without_a_length_has_an_open_total() -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(3))

    bar = progress_bar(DataLoader(Stream(), batch_size=None), description="test", enabled=False)
    assert bar.bar.total is None
    assert [int(item) for item in bar] == [0, 1, 2]
