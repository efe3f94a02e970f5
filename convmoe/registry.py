"""Named registries of built-in parts, so configs can name them and users can add their own."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from convmoe.formatting import did_you_mean

T = TypeVar("T")
_PLAIN_DATA = (Mapping, list, tuple, set, int, float, complex, bytes)
"""Values that can never be a part (``bool`` is an ``int``)."""


class Registry(Generic[T]):
    """A name -> class table for one family of parts (routers, experts, ...).

    A name, a registered or user class, or a ready instance is accepted wherever a part is
    configurable; ``create`` turns any of them into an instance.

    Args:
        kind: What the entries are, used in error messages ("router").

    Example:
        >>> ROUTERS = Registry("router")
        >>> @ROUTERS.register("mine")
        ... class MyRouter:
        ...     def __init__(self, num_experts: int) -> None:
        ...         self.num_experts = num_experts
        >>> ROUTERS.create("mine", num_experts=4).num_experts
        4
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Class decorator that registers ``cls`` under ``name``; a duplicate name is an error."""

        def decorator(cls: type[T]) -> type[T]:
            if name in self._entries and self._entries[name] is not cls:
                raise ValueError(f"{self.kind} name {name!r} is already registered to "
                                 f"{self._entries[name].__qualname__}; pick another name.")
            self._entries[name] = cls
            return cls

        return decorator

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def get(self, name: str) -> type[T]:
        """The class registered under ``name``.

        Raises:
            ValueError: Unknown name; the message lists the choices and the closest match.
        """
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
                             f"{did_you_mean(name, self._entries)}")
        return self._entries[name]

    def name_of(self, cls: type) -> str | None:
        """The name ``cls`` is registered under, or None."""
        for name, entry in self._entries.items():
            if entry is cls:
                return name
        return None

    def check_spec(self, spec: object, where: str) -> None:
        """Refuse plain data (a dict, list, number, ...) given where a part is configured: it is neither a
        name, a class nor an instance, and would otherwise fail only when the part is first called.

        Args:
            spec: The configured value.
            where: What it configures, for the message (``"MoEConfig.dispatcher"``).

        Raises:
            TypeError: ``spec`` is plain data.
        """
        if isinstance(spec, _PLAIN_DATA):
            raise TypeError(f"{where}={spec!r} is plain data ({type(spec).__name__}); give a registered {self.kind} "
                            f"name ({', '.join(self.names())}), a class or an instance.")

    def create(self, spec: str | type[T] | T, **kwargs: Any) -> T:
        """Instantiate ``spec``: a registered name, a class, or an instance (returned unchanged).

        Raises:
            TypeError: ``spec`` is plain data (``check_spec``).
        """
        self.check_spec(spec, self.kind)
        if isinstance(spec, str):
            return self.get(spec)(**kwargs)
        if isinstance(spec, type):
            return spec(**kwargs)
        return spec

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
