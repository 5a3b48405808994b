"""One kind of registry for everything chosen by name from a config string or a flag: the
formulations, the routers (planner_svc/router.py) and the engines (engine_adapters/registry.py).

An entry registers itself with the `register(name)` decorator when its module is imported. Built-in
entries may be listed by module (`builtins`: name -> module, imported on first use of that name or
of `available()`), so that choosing one never imports another's heavy dependencies. A name of the
form `package.module:attr` reaches a user's own entry without registering it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, builtins: Mapping[str, str] | None = None) -> None:
        self.kind = kind  # what the entries are, for messages
        self._builtins = dict(builtins or {})
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return decorate

    def available(self) -> list[str]:
        for name in self._builtins:
            self._load(name, quiet=True)
        return sorted({*self._builtins, *self._entries})

    def get(self, name: str, accept: Callable[[object], bool] = callable) -> T:
        """The entry called `name`; a ValueError naming the known ones when there is none.
        `accept` checks what a `module:attr` name reaches."""
        if name not in self._entries and name in self._builtins:
            self._load(name, quiet=False)
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            module, _, attr = name.partition(":")
            found = getattr(importlib.import_module(module), attr, None)
            if found is not None and accept(found):
                return found
        raise ValueError(f"unknown {self.kind} {name!r} (known: {', '.join(self.available())})")

    def _load(self, name: str, quiet: bool) -> None:
        """Import the module of a built-in entry. `quiet`: a missing optional dependency only
        leaves it unlisted (e.g. torch for the torch engine)."""
        module = self._builtins[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            if quiet:
                return
            raise ValueError(f"the {self.kind} {name!r} is not available: {exc}") from None
