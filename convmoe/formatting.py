"""How convmoe writes numbers and names for people: one rule for every table, card and error message."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

_PREFIXES = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3))


def format_count(value: float | None) -> str:
    """A count with a metric prefix and 2 decimals: ``27.14M``, ``-2.05K``, ``950`` (``n/a`` for None).

    Below 1,000 a whole number is written without decimals, anything else with 3 significant digits.

    Example:
        >>> format_count(27_135_823), format_count(-2048), format_count(950), format_count(0.5), format_count(None)
        ('27.14M', '-2.05K', '950', '0.5', 'n/a')
    """
    if value is None:
        return "n/a"
    for unit, scale in _PREFIXES:
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


def listing(items: list[str], quote: bool = True, limit: int = 8) -> str:
    """Up to ``limit`` items joined for a message, with a count of the rest.

    Example:
        >>> listing(["a", "b", "c"], limit=2)
        "'a', 'b' (+1 more)"
    """
    shown = [repr(item) if quote else item for item in items[:limit]]
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(shown) + more


def did_you_mean(name: Any, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to a misspelt ``name`` (difflib's ratio >= ``cutoff``),
    else ``""``.

    Example:
        >>> did_you_mean("max_epoch", ["max_epochs", "seed"])
        " (did you mean 'max_epochs'?)"
        >>> did_you_mean("zzz", ["max_epochs"])
        ''
    """
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""
