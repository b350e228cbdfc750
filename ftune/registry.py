"""Named registries: config names map to code, and a miss lists the valid names."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterable, TypeVar

from ftune.errors import FtuneError

T = TypeVar("T")


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """' Did you mean 'x'?' when a close valid name exists, else ''."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_name_error(kind: str, name: str, valid: Iterable[str], key: str | None = None) -> FtuneError:
    valid = sorted(valid)
    where = f"{key}: " if key else ""
    return FtuneError(
        f"{where}unknown {kind} '{name}'.{did_you_mean(name, valid)}",
        [f"valid {kind} names: {', '.join(valid)}"],
    )


class Registry(Generic[T]):
    """A mapping of unique names to objects, filled with the `register` decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str, key: str | None = None) -> T:
        if name not in self._items:
            raise unknown_name_error(self.kind, name, self._items, key)
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
