"""Named registries: noise schedules, objectives, samplers, attention backends, LR schedules.

    SCHEDULES = Registry("noise schedule")
    @SCHEDULES.register("loglinear")
    class LogLinear: ...
    SCHEDULES.get("loglinear")  # -> class; unknown names raise with the allowed list
"""

from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from megadiff import MegadiffError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise MegadiffError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: Any) -> bool:
        return name in self._items
