"""Named registries: noise schedules, objectives, samplers, attention backends, LR schedules.

A registry's names (and each entry's traits) are *declared* in a torch-free catalogue, so configs
validate and launch code reasons about entries without importing torch; the implementation
registers itself with the decorator when its module is imported, and ``get`` imports that module
on demand:

    OBJECTIVES = Registry("objective")                                   # torch-free catalogue
    OBJECTIVES.declare("ar", "megadiff.diffusion.objectives", traits=ObjectiveTraits(...))
    OBJECTIVES.traits("ar").is_autoregressive                            # no torch import

    @OBJECTIVES.register("ar")                                           # in megadiff/diffusion/objectives.py
    class Autoregressive: ...
    OBJECTIVES.get("ar")  # -> class; unknown names raise with the allowed list
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, TypeVar

from megadiff import MegadiffError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._where: dict[str, str] = {}  # declared name -> module that registers it
        self._traits: dict[str, Any] = {}

    def declare(self, name: str, where: str, traits: Any = None) -> None:
        """Announce ``name`` (implemented in module ``where``) with its traits, without importing it."""
        if name in self._where:
            raise ValueError(f"{self.kind} {name!r} declared twice")
        self._where[name] = where
        self._traits[name] = traits

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            if self._where and name not in self._where:
                raise ValueError(f"{self.kind} {name!r} is not declared in its catalogue; declare it with its "
                                 f"traits next to the other {self.kind} entries")
            self._items[name] = obj
            return obj

        return deco

    def _unknown(self, name: Any) -> MegadiffError:
        return MegadiffError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}")

    def get(self, name: str) -> T:
        if name not in self._items and name in self._where:
            importlib.import_module(self._where[name])
        try:
            return self._items[name]
        except KeyError:
            raise self._unknown(name) from None

    def traits(self, name: str) -> Any:
        """The declared traits of ``name`` (no import of the implementation)."""
        if name not in self._where:
            raise self._unknown(name)
        return self._traits[name]

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._where))

    def __contains__(self, name: Any) -> bool:
        return name in self._items or name in self._where
