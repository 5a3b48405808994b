"""The engine contract that the adapter loop drives: `sim`, `torch` and `vllm` implement it.

The adapter loop (receive plan -> execute -> report) calls `add_request` for new requests a plan
carries, `execute` once per plan step, and `abort` / `preempt` when the planner says so. `execute`
must either run the step exactly as planned or run none of it and return a report with `error`
set (for example when KV blocks run out); it never raises for a bad plan.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from formulations.perf_model import PerfModel
from formulations.plan import Step
from wire.protocol import EngineRequest, StepReport


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What an engine tells the planner in READY."""

    num_total_blocks: int
    block_size: int
    perf_model: PerfModel | None  # None: the planner uses the model its config names
    max_spec_tokens: int = 0  # 0: no draft model
    max_model_len: int = 1 << 20
    name: str = "engine"
    # Keeps a tool chain's KV after a round finishes when EngineRequest.retain_kv asks, attaches it
    # to the chain's next round (EngineRequest.num_cached_tokens) and honours `release_kv`;
    # reports evictions and misses in StepReport.kv_evicted / kv_misses (docs/AGENTS.md).
    kv_retention: bool = False
    # Host memory for kept KV, in blocks (0: none), and the time to copy one token's KV back in:
    # an engine with host memory also honours EngineRequest.retain_kv "host" (docs/AGENTS.md).
    kv_host_blocks: int = 0
    kv_swap_s_per_token: float = 0.0


class Engine(ABC):
    @abstractmethod
    def info(self) -> EngineInfo: ...

    @abstractmethod
    def add_request(self, request: EngineRequest) -> None:
        """Register a request; it computes nothing until a step names it."""

    @abstractmethod
    def execute(self, step: Step, step_id: int) -> StepReport:
        """Run one plan step; see the module docstring for the all-or-nothing rule."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Forget a request and free its KV blocks (unknown ids are ignored)."""

    @abstractmethod
    def preempt(self, request_id: str) -> None:
        """Drop a request's KV cache; its tokens are recomputed when a later step names it."""

    def release_kv(self, chain_id: str) -> None:
        """Drop a chain's kept KV (unknown chains are ignored). An engine whose info() says
        `kv_retention=False` keeps nothing, so there is nothing to drop."""
        return None

    @property
    @abstractmethod
    def num_free_blocks(self) -> int: ...
