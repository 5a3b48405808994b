"""Formulations by name, so that a config string picks one.

Built-in formulations register themselves when their module is imported; `create` imports the
built-in modules on first use. A user's own formulation can be named as `package.module:ClassName`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from formulations.interface import Formulation

F = TypeVar("F", bound=type[Formulation])

_REGISTRY: dict[str, type[Formulation]] = {}

# Modules that define built-in formulations; a module that is not there yet is skipped.
_BUILTIN_MODULES = (
    "formulations.baselines.vllm",
    "formulations.baselines.sarathi",
    "formulations.baselines.edf",
    "formulations.baselines.distserve",
    "formulations.slos_dp",
    "formulations.cpsat",
)
_loaded = False


def register(name: str) -> Callable[[F], F]:
    def decorate(cls: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"formulation {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    _loaded = True


def available() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def formulation_class(name: str) -> type[Formulation]:
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        cls = getattr(importlib.import_module(module), attr, None)
        if isinstance(cls, type) and issubclass(cls, Formulation):
            return cls
    raise ValueError(f"unknown formulation {name!r} (known: {', '.join(available())})")


def create(name: str, **params: Any) -> Formulation:
    cls = formulation_class(name)
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for formulation {name!r}: {exc}") from None
