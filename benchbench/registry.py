"""One generic registry for methods, tasks and backbones (after lm-evaluation-harness's).

Entries are registered with a decorator, or lazily as a ``"module:attr"`` string that is imported
on first use, so a contributor's package can register a method without the core importing it.
Third-party entries are also read from the ``benchbench.<kind>s`` entry-point group.
"""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object (or ``"module:attr"`` placeholder resolved on first :meth:`get`)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T | str] = {}
        self._entry_points_loaded = False

    def register(self, name: str, obj: T | str | None = None) -> Callable[[T], T] | T:
        """``@REG.register("name")`` on a class/function, or ``REG.register("name", "pkg.mod:Cls")``."""
        if obj is not None:
            self._add(name, obj)
            return obj

        def deco(o: T) -> T:
            self._add(name, o)
            return o

        return deco

    def _add(self, name: str, obj) -> None:
        if name in self._entries and self._entries[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=f"benchbench.{self.kind}s"):
            self._entries.setdefault(ep.name, ep.value)

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The registered object; ``KeyError`` listing known names (with "did you mean") otherwise."""
        self._load_entry_points()
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}")
        obj = self._entries[name]
        if isinstance(obj, str):
            module, _, attr = obj.partition(":")
            try:
                obj = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ImportError(f"{self.kind} {name!r} points at {self._entries[name]!r}, which fails: {e}") from e
            self._entries[name] = obj
        return obj

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._entries
