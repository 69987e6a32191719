"""One generic name -> object registry with a decorator."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (classes, factories). ``@reg.register("name")`` adds one."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._items:
                raise KeyError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise KeyError(f"unknown {self.kind} '{name}'{hint} (known: {', '.join(sorted(self._items))})")
        return self._items[name]

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
