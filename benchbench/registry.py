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
        self._origins: dict[str, str] = {}
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

    def _add(self, name: str, obj, origin: str | None = None) -> None:
        if name in self._entries and self._entries[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        if origin is None:
            target = obj if isinstance(obj, str) else f"{obj.__module__}:{getattr(obj, '__qualname__', obj)}"
            origin = f"{'built-in' if target.startswith('benchbench.') else 'registered'} ({target})"
        self._origins[name] = origin

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=f"benchbench.{self.kind}s"):
            dist = ep.dist.name if ep.dist is not None else "unknown distribution"
            if ep.name in self._entries:  # a plugin never shadows what is already registered
                self._origins[ep.name] += f"; plugin {dist} also offers {ep.value} (ignored)"
                continue
            self._entries[ep.name] = ep.value
            self._origins[ep.name] = f"plugin {dist} ({ep.value})"

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def origin(self, name: str) -> str:
        """Where an entry comes from: ``built-in (module:attr)`` or ``plugin DIST (module:attr)``."""
        self._load_entry_points()
        return self._origins.get(name, "unknown")

    def check(self, name: str) -> str | None:
        """None when the entry loads, else the error message (naming the plugin); never raises."""
        try:
            self.get(name)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break the listing
            return str(e)
        return None

    def require(self, name: str) -> None:
        """``KeyError`` listing known names (with "did you mean") unless ``name`` is registered;
        nothing is imported (a command line is checked in milliseconds)."""
        self._load_entry_points()
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}")

    def get(self, name: str) -> T:
        """The registered object; ``KeyError`` listing known names (with "did you mean") otherwise."""
        self.require(name)
        obj = self._entries[name]
        if isinstance(obj, str):
            module, _, attr = obj.partition(":")
            try:
                obj = getattr(importlib.import_module(module), attr)
            except Exception as e:  # noqa: BLE001 - any import-time error of a plugin is reported the same way
                raise ImportError(f"{self.kind} {name!r} from {self._origins.get(name, 'unknown')} fails to load: "
                                  f"{type(e).__name__}: {e}") from e
            self._entries[name] = obj
        return obj

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._entries
