"""Formulations by name, so that a config string picks one.

Built-in formulations register themselves when their module is imported (formulations/named.py:
the registry kind shared with routers and engines); a user's own formulation can be named as
`package.module:ClassName`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from formulations.interface import Formulation
from formulations.named import Registry

F = TypeVar("F", bound=type[Formulation])

# Modules that define the built-in formulations, by formulation name.
_FORMULATIONS: Registry[type[Formulation]] = Registry(
    "formulation",
    {
        "vllm_fcfs": "formulations.baselines.vllm",
        "vllm_prefill_first": "formulations.baselines.vllm",
        "vllm_spec": "formulations.baselines.vllm",
        "sarathi": "formulations.baselines.sarathi",
        "edf": "formulations.baselines.edf",
        "distserve": "formulations.baselines.distserve",
        "slos_dp": "formulations.slos_dp",
        "cpsat": "formulations.cpsat",
    },
)


def register(name: str) -> Callable[[F], F]:
    def decorate(cls: F) -> F:
        cls.name = name
        return _FORMULATIONS.register(name)(cls)

    return decorate


def available() -> list[str]:
    return _FORMULATIONS.available()


def formulation_class(name: str) -> type[Formulation]:
    return _FORMULATIONS.get(name, lambda c: isinstance(c, type) and issubclass(c, Formulation))


def create(name: str, **params: Any) -> Formulation:
    cls = formulation_class(name)
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for formulation {name!r}: {exc}") from None
