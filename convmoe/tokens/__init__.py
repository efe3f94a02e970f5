"""Routing granularity: how a feature map becomes routed tokens."""

from __future__ import annotations

from convmoe.registry import Registry
from convmoe.tokens.base import Tokenizer
from convmoe.tokens.grid import GridTokens
from convmoe.tokens.image import ImageTokens
from convmoe.tokens.patch import PatchTokens
from convmoe.tokens.pixel import PixelTokens

TOKENS: Registry[Tokenizer] = Registry("tokens")
"""Tokenizers by name: ``"pixel"``, ``"grid"``, ``"patch"`` and ``"image"``; ``create_tokens`` parses specs.

Example:
    >>> TOKENS.names()
    ['grid', 'image', 'patch', 'pixel']
"""
TOKENS.register("pixel")(PixelTokens)
TOKENS.register("grid")(GridTokens)
TOKENS.register("patch")(PatchTokens)
TOKENS.register("image")(ImageTokens)


def _parse_int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"cannot read tokens spec {spec!r}: {text!r} is not an integer; "
                         "write e.g. 'grid:3x3' or 'patch:8'.") from None


def create_tokens(spec: str | type[Tokenizer] | Tokenizer) -> Tokenizer:
    """Build a tokenizer from ``"pixel"``, ``"grid:GxG"`` (or ``"grid:RxC"``), ``"patch:P"``,
    ``"image"``, a user name registered in ``TOKENS``, a class or an instance.

    Example:
        >>> create_tokens("grid:3x3")
        grid:3x3
    """
    if not isinstance(spec, str):
        return TOKENS.create(spec)
    name, _, arg = spec.partition(":")
    cls = TOKENS.get(name)
    if not arg:
        return cls()
    if name == "grid":
        rows, sep, cols = arg.lower().partition("x")
        return cls(_parse_int(rows, spec), _parse_int(cols if sep else rows, spec))
    return cls(_parse_int(arg, spec))


__all__ = ["TOKENS", "GridTokens", "ImageTokens", "PatchTokens", "PixelTokens", "Tokenizer", "create_tokens"]
