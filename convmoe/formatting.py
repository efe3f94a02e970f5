"""How convmoe writes a count (parameters, MACs, FLOPs, tokens) for people: one rule for every table and card."""

from __future__ import annotations

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
