"""A workload: the requests (and tool chains) that arrive, with their arrival times resolved."""

from __future__ import annotations

from dataclasses import dataclass

from formulations.request import Request, ToolChain


@dataclass(frozen=True)
class Workload:
    name: str
    requests: tuple[Request, ...]  # single-call requests, sorted by arrival
    chains: tuple[ToolChain, ...] = ()  # tool-calling agents; their rounds arrive as they go
    num_dropped: int = 0  # dropped by context-length filtering

    @property
    def num_items(self) -> int:
        """Requests plus chains: what an arrival rate counts."""
        return len(self.requests) + len(self.chains)

    @property
    def duration_s(self) -> float:
        arrivals = [r.arrival_s for r in self.requests] + [c.arrival_s for c in self.chains]
        return max(arrivals, default=0.0) - min(arrivals, default=0.0)
