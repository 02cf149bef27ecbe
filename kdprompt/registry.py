"""One registry per extensible concept (data sources, prompt methods, objectives, adaptations, projectors).

An entry is registered under a name with a decorator; entries a recipe picks by name carry their own
recipe config (a pydantic model, as the entry's ``Config`` attribute or the entry itself), so adding a
concept is one new file that registers itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from kdprompt.errors import KdpromptError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping whose lookup errors list what is available."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests and plugins that register temporary entries)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        """Return the object registered as ``name``."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise KdpromptError(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        """``unknown <kind> 'x'; available: a, b`` (what every lookup error says)."""
        return f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._items)

    def in_order(self) -> list[str]:
        """Registered names in registration order (built-ins first, in the order their package lists them)."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
