"""Engines by name, so that a flag or a config string picks one (the same kind of registry as
`formulations.registry` and `planner_svc.router`).

A built-in engine registers a builder `build(options) -> Engine` when its module is imported;
`create` imports only the module of the engine asked for (formulations/named.py), so that the sim
engine never imports torch or vLLM. A user's own engine can be named as `package.module:builder`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine_adapters.engine import Engine
from formulations.named import Registry


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
    output_lengths: str | None = None  # a replay's true lengths (engine_adapters/sim_lengths.py)
    # torch and vllm
    model_dir: str | None = None
    draft_dir: str | None = None
    kv_memory_gb: float = 0.25
    # torch
    num_threads: int | None = None  # torch CPU threads (None: torch's default, all cores)
    device: str = "cpu"
    vllm_args: tuple[str, ...] = ()  # NAME=VALUE engine arguments


Builder = Callable[[EngineOptions], Engine]

ENGINES: Registry[Builder] = Registry(
    "engine",
    {
        "sim": "engine_adapters.sim_engine",
        "torch": "engine_adapters.torch_engine.engine",
        "vllm": "engine_adapters.vllm.engine",
    },
)
register = ENGINES.register


def available() -> list[str]:
    return ENGINES.available()


def create(name: str, options: EngineOptions | None = None) -> Engine:
    return ENGINES.get(name)(options or EngineOptions())
