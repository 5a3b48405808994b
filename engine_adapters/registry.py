"""Engines by name, so that a flag or a config string picks one (the same kind of registry as
`formulations.registry` and `planner_svc.router`).

A built-in engine registers a builder `build(options) -> Engine` when its module is imported;
`create` imports only the module of the engine asked for, so that the sim engine never imports
torch or vLLM. A user's own engine can be named as `package.module:builder`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from engine_adapters.engine import Engine


@dataclass(frozen=True)
class EngineOptions:
    """What the builders read (each only its own fields): the `slos-serve engine` flags."""

    # sim
    perf_model: str = "opt-13b-h100"  # the truth's base: a preset name
    k_context_s: float = 0.0
    noise_frac: float = 0.0
    time_scale: float = 1.0  # sleep time_scale x the truth's step time
    num_blocks: int = 4096
    block_size: int = 16
    max_spec_tokens: int = 0
    acceptance_rate: float = 0.7
    seed: int = 0
    advertise_perf_model: bool = False
    # torch and vllm
    model_dir: str | None = None
    draft_dir: str | None = None
    kv_memory_gb: float = 0.25
    vllm_args: tuple[str, ...] = ()  # NAME=VALUE engine arguments


Builder = Callable[[EngineOptions], Engine]

# name -> module that registers it (imported on demand)
_BUILTIN_MODULES = {
    "sim": "engine_adapters.sim_engine",
    "torch": "engine_adapters.torch_engine.engine",
    "vllm": "engine_adapters.vllm.engine",
}
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"engine {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder

    return decorate


def available() -> list[str]:
    return sorted({*_BUILTIN_MODULES, *_REGISTRY})


def builder(name: str) -> Builder:
    if name not in _REGISTRY and name in _BUILTIN_MODULES:
        module = _BUILTIN_MODULES[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            extra = {"torch": "torch", "vllm": "vllm"}.get(name, "")
            hint = f" (pip install 'slos-serve[{extra}]')" if extra else ""
            raise ValueError(f"the {name} engine is not available: {exc}{hint}") from None
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        found = getattr(importlib.import_module(module), attr, None)
        if callable(found):
            return found
    raise ValueError(f"unknown engine {name!r} (known: {', '.join(available())})")


def create(name: str, options: EngineOptions | None = None) -> Engine:
    return builder(name)(options or EngineOptions())
